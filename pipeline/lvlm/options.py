"""LVLM options: one dataclass filled from flags and the environment.

The api key is read from OPENAI_API_KEY, never from a flag (flags show up in `ps` and in job
graphs' display data), is excluded from repr and from public_dict(), and is never logged.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

ENV_ENDPOINT = "MG_GEO_LVLM_ENDPOINT"
ENV_MODEL = "MG_GEO_LVLM_MODEL"
ENV_API_KEY = "OPENAI_API_KEY"
# Small enough for a CPU worker, a real instruct VLM with a chat template (Idefics3 architecture,
# loads with AutoModelForImageTextToText). Pass --lvlm-model for a stronger one.
DEFAULT_TRANSFORMERS_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
BACKENDS = ("auto", "openai", "transformers")


@dataclass
class LvlmOptions:
    backend: str = "auto"                  # "openai" | "transformers" | "auto" (endpoint -> openai)
    endpoint: Optional[str] = None         # env MG_GEO_LVLM_ENDPOINT; "http://host:8000" gets /v1
    model: Optional[str] = None            # env MG_GEO_LVLM_MODEL; openai: None = the one /models lists
    api_key: Optional[str] = field(default=None, repr=False)  # env OPENAI_API_KEY
    concurrency: int = 32                  # requests in flight per backend instance
    rpm: Optional[float] = None            # requests-per-minute cap (token bucket); None = no cap
    max_attempts: int = 5                  # HTTP attempts per answer (429/5xx/timeout/connection)
    timeout_s: float = 60.0                # per HTTP attempt
    cache_dir: Optional[str] = None        # FileSystems path (gs:// works); None = no cache
    temperature: float = 0.0
    max_tokens: int = 512
    seed: Optional[int] = 0
    reasks: int = 1                        # re-asks after an invalid / schema-invalid answer
    retry_failed: bool = False             # ask again where the cache holds a final failure
    # Backoff between retries: full jitter, uniform(0, min(cap, base * 2**n)); Retry-After wins
    # (capped by retry_after_cap_s). Tests shrink these; production keeps the defaults.
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    retry_after_cap_s: float = 60.0
    device: str = "auto"                   # transformers: "auto" (cuda if present) | "cpu" | "cuda"
    generation_batch_size: int = 8         # transformers: prompts per generate() call

    def __post_init__(self):
        if self.endpoint is None:
            self.endpoint = os.environ.get(ENV_ENDPOINT) or None
        if self.model is None:
            self.model = os.environ.get(ENV_MODEL) or None
        if self.api_key is None:
            self.api_key = os.environ.get(ENV_API_KEY) or None
        if self.backend not in BACKENDS:
            raise ValueError(f"lvlm backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.concurrency < 1 or self.max_attempts < 1 or self.reasks < 0:
            raise ValueError("lvlm concurrency and max_attempts must be >= 1, reasks >= 0")

    def __getstate__(self):
        # The options are pickled into the Beam job graph, which runners upload and show: the key
        # never travels with it. Each worker reads OPENAI_API_KEY from its own environment.
        state = dict(self.__dict__)
        state["api_key"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.api_key = os.environ.get(ENV_API_KEY) or None

    def base_url(self) -> Optional[str]:
        """The endpoint as the openai client wants it: an OpenAI-compatible root ending in /v1
        when the user gave only scheme://host:port."""
        if not self.endpoint:
            return None
        parts = urlsplit(self.endpoint.rstrip("/"))
        path = parts.path if parts.path not in ("", "/") else "/v1"
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    def sampling(self, overrides: Optional[dict] = None) -> dict:
        """The sampling parameters of one request: options' defaults, then the request's own."""
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        params.update(overrides or {})
        return {k: v for k, v in sorted(params.items()) if v is not None}

    def public_dict(self) -> dict:
        """For reports and logs: every option except the api key (only whether one is set)."""
        out = dataclasses.asdict(self)
        out["api_key"] = "set" if self.api_key else None
        return out


def add_lvlm_arguments(parser: argparse.ArgumentParser) -> None:
    d = LvlmOptions.__dataclass_fields__
    g = parser.add_argument_group("LVLM (clue and dialogue parts)")
    g.add_argument("--lvlm-backend", choices=BACKENDS, default="auto",
                   help="openai: an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, OpenAI); "
                        "transformers: in-process model; auto: openai when an endpoint is set")
    g.add_argument("--lvlm-endpoint", default=None,
                   help=f"OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (env {ENV_ENDPOINT}); "
                        f"the api key comes from env {ENV_API_KEY} only")
    g.add_argument("--lvlm-model", default=None,
                   help=f"served model name, or hub id / local path for transformers (env {ENV_MODEL}; "
                        f"transformers default {DEFAULT_TRANSFORMERS_MODEL})")
    g.add_argument("--lvlm-concurrency", type=int, default=d["concurrency"].default)
    g.add_argument("--lvlm-rpm", type=float, default=None, help="requests-per-minute cap per worker")
    g.add_argument("--lvlm-max-attempts", type=int, default=d["max_attempts"].default)
    g.add_argument("--lvlm-timeout", type=float, default=d["timeout_s"].default, help="seconds per request")
    g.add_argument("--lvlm-cache-dir", default=None,
                   help="response cache (FileSystems path); default OUT/_cache/lvlm")
    g.add_argument("--lvlm-temperature", type=float, default=d["temperature"].default)
    g.add_argument("--lvlm-max-tokens", type=int, default=d["max_tokens"].default)
    g.add_argument("--lvlm-seed", type=int, default=d["seed"].default)
    g.add_argument("--lvlm-reasks", type=int, default=d["reasks"].default,
                   help="re-asks after an answer that is not valid JSON for the schema")
    g.add_argument("--lvlm-retry-failed", action="store_true",
                   help="ask again for requests whose answer stayed invalid in an earlier run (the cache "
                        "keeps such final failures, so by default a rerun does not pay for them twice)")


def options_from_args(args: argparse.Namespace) -> LvlmOptions:
    cache_dir = args.lvlm_cache_dir
    out = getattr(args, "out", None)
    if cache_dir is None and out:
        from apache_beam.io.filesystems import FileSystems
        cache_dir = FileSystems.join(str(out), "_cache", "lvlm")
    return LvlmOptions(
        backend=args.lvlm_backend, endpoint=args.lvlm_endpoint, model=args.lvlm_model,
        concurrency=args.lvlm_concurrency, rpm=args.lvlm_rpm, max_attempts=args.lvlm_max_attempts,
        timeout_s=args.lvlm_timeout, cache_dir=cache_dir, temperature=args.lvlm_temperature,
        max_tokens=args.lvlm_max_tokens, seed=args.lvlm_seed, reasks=args.lvlm_reasks,
        retry_failed=args.lvlm_retry_failed,
    )
