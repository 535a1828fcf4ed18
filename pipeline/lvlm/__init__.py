"""LVLM access for the clue and dialogue parts: one interface, two backends.

    options = options_from_args(args)          # or LvlmOptions(...)
    check_backend(options)                     # at launch: LvlmUnavailable if nothing is usable
    backend = shared_backend(options)          # in a stage's setup(): loaded once per process
    results = backend.run_inference(requests)  # same order; failures are results, never raises

Backends load lazily (openai pulls in httpx; transformers pulls in torch), so importing this
package costs nothing for a Meta-only run.
"""
from __future__ import annotations

import hashlib
import logging
import threading

from pipeline.lvlm.options import (DEFAULT_TRANSFORMERS_MODEL, LvlmOptions, add_lvlm_arguments,
                                   options_from_args)
from pipeline.lvlm.stats import merge_stats
from pipeline.lvlm.types import (LvlmBackend, LvlmRequest, LvlmResult, LvlmUnavailable,
                                 unavailable_message)

__all__ = ["LvlmBackend", "LvlmOptions", "LvlmRequest", "LvlmResult", "LvlmUnavailable",
           "add_lvlm_arguments", "options_from_args", "make_backend", "check_backend",
           "shared_backend", "open_backend", "reset_shared_backends", "merge_stats", "resolve_backend", "DEFAULT_TRANSFORMERS_MODEL"]
log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0


def resolve_backend(options: LvlmOptions) -> str:
    """"auto" means openai when an endpoint is set, else transformers."""
    if options.backend != "auto":
        return options.backend
    return "openai" if options.endpoint else "transformers"


def make_backend(options: LvlmOptions) -> LvlmBackend:
    """A new backend, not loaded yet (call load_model, or let run_inference do it)."""
    if resolve_backend(options) == "openai":
        from pipeline.lvlm.openai_backend import OpenAIBackend
        return OpenAIBackend(options)
    from pipeline.lvlm.transformers_backend import TransformersBackend
    return TransformersBackend(options)


_shared: dict[str, LvlmBackend] = {}
_shared_lock = threading.Lock()


def shared_backend(options: LvlmOptions) -> LvlmBackend:
    """One loaded backend per process for equal options: Beam runs several DoFn instances per
    worker process, and each must not load its own model copy or open its own `concurrency`
    connections. Thread-safe (both backends accept run_inference from several threads)."""
    fingerprint = repr(options) + hashlib.sha256((options.api_key or "").encode()).hexdigest()
    with _shared_lock:
        backend = _shared.get(fingerprint)
        if backend is None:
            backend = make_backend(options)
            backend.load_model()
            _shared[fingerprint] = backend
        return backend


def open_backend(options: LvlmOptions) -> LvlmBackend:
    """For a command that talks to one model (eval, chat): check, make and load it, or raise
    LvlmUnavailable with the reason."""
    check_backend(options)
    backend = make_backend(options)
    backend.load_model()
    return backend


def reset_shared_backends() -> None:
    """Forget this process's shared backends, so a new build run in the same process (the
    in-process runner, tests) starts with fresh counters instead of the last run's."""
    with _shared_lock:
        backends = list(_shared.values())
        _shared.clear()
    for backend in backends:
        backend.close()  # its event-loop thread and connection pool


def check_backend(options: LvlmOptions, probe: bool = True) -> None:
    """Fail at launch, not on the workers: raise LvlmUnavailable (naming --lvlm-endpoint and
    --parts meta) when no endpoint is set and no weights can be loaded. With probe, an endpoint
    must answer GET /models within a few seconds."""
    if resolve_backend(options) == "openai":
        if not options.base_url():
            raise LvlmUnavailable(unavailable_message("the openai backend has no endpoint"))
        if probe:
            _probe_endpoint(options)
        return
    from pipeline.lvlm.transformers_backend import check_weights
    try:
        check_weights(options.model or DEFAULT_TRANSFORMERS_MODEL)
    except LvlmUnavailable:
        if options.backend == "auto":
            raise LvlmUnavailable(unavailable_message(
                f"no --lvlm-endpoint is set and the default in-process model "
                f"{options.model or DEFAULT_TRANSFORMERS_MODEL!r} is not on this machine")) from None
        raise


def _probe_endpoint(options: LvlmOptions) -> None:
    import openai

    client = openai.OpenAI(base_url=options.base_url(), api_key=options.api_key or "EMPTY",
                           max_retries=0, timeout=PROBE_TIMEOUT_S)
    try:
        ids = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        raise LvlmUnavailable(unavailable_message(
            f"the LVLM endpoint {options.base_url()} refused the api key (HTTP 401); "
            f"set OPENAI_API_KEY")) from None
    except openai.APIError as exc:
        raise LvlmUnavailable(unavailable_message(
            f"the LVLM endpoint {options.base_url()} did not answer GET /models "
            f"({type(exc).__name__}: {exc})")) from None
    finally:
        client.close()
    if options.model and ids and options.model not in ids:
        # Gateways do not always list every model they route, so this is a warning only.
        log.warning("LVLM endpoint %s does not list model %r (it lists %s)", options.base_url(),
                    options.model, ids[:10])
