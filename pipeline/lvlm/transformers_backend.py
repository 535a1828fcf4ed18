"""The `transformers` backend: in-process generation with the model's own processor and chat
template, for workers with a GPU (cuda, bf16) or small models on CPU (fp32).

There is no response_format here, so every request with a schema carries the schema in its prompt
(answers.with_instructions), and answers are judged by the same answers.check_answer as the
openai backend: a model that writes garbage gets invalid_json / schema_invalid results, never an
exception. Answers go through the same content-addressed cache.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from pipeline.lvlm.answers import check_answer, reask_messages, schema_problem, with_instructions
from pipeline.lvlm.cache import ResponseCache, cache_key, make_entry
from pipeline.lvlm.options import DEFAULT_TRANSFORMERS_MODEL, LvlmOptions
from pipeline.lvlm.stats import LvlmStats
from pipeline.lvlm.types import LvlmBackend, LvlmRequest, LvlmResult, LvlmUnavailable, unavailable_message

log = logging.getLogger(__name__)


class _Job:
    """One request on its way through generation rounds (first ask, then re-asks)."""

    def __init__(self, index: int, request: LvlmRequest, params: dict, key: str, image):
        self.index, self.request, self.params, self.key, self.image = index, request, params, key, image
        self.messages = request.messages
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.attempts = 0


class TransformersBackend(LvlmBackend):
    name = "transformers"

    def __init__(self, options: LvlmOptions):
        self.options = options
        self.model = options.model or DEFAULT_TRANSFORMERS_MODEL
        self._stats = LvlmStats()
        self._cache = ResponseCache(options.cache_dir) if options.cache_dir else None
        self._lock = threading.Lock()  # one generate() at a time; Beam may call from several threads
        self._processor = None
        self._model = None
        self.device = None

    def load_model(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            device = self.options.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            local_only = weights_are_offline(self.model)
            try:
                processor = AutoProcessor.from_pretrained(self.model, local_files_only=local_only)
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model, dtype=dtype, local_files_only=local_only)
            except (OSError, ValueError) as exc:
                raise LvlmUnavailable(unavailable_message(
                    f"cannot load the LVLM {self.model!r} with transformers: {exc}")) from None
            tokenizer = getattr(processor, "tokenizer", processor)
            # Decoder-only generation pads on the left, so every prompt ends where its answer starts.
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._processor, self._model = processor, model.to(device).eval()
            self.device = device
            log.info("loaded LVLM %s on %s (%s)", self.model, device, str(dtype).replace("torch.", ""))

    def close(self) -> None:
        with self._lock:
            self._model = self._processor = None

    def stats(self) -> dict:
        return self._stats.as_dict()

    def run_inference(self, batch: list[LvlmRequest]) -> list[LvlmResult]:
        if not batch:
            return []
        self.load_model()
        with self._lock:
            results: list[Optional[LvlmResult]] = [None] * len(batch)
            try:
                self._run(batch, results)
            except Exception as exc:  # noqa: BLE001 - a failed request never raises out of here
                log.exception("LVLM batch failed inside the transformers backend")
                for i, result in enumerate(results):
                    if result is None:
                        results[i] = self._result(False, reason="internal_error",
                                                  detail=f"{type(exc).__name__}: {exc}")
        self._stats.add("items", len(batch))
        for result in results:
            if result.ok:
                self._stats.add("ok")
            else:
                self._stats.failure(result.reason)
        return results

    # ---- one batch ---------------------------------------------------------------------------
    def _run(self, batch: list[LvlmRequest], results: list) -> None:
        jobs: list[_Job] = []
        for i, request in enumerate(batch):
            try:
                params = self.options.sampling(request.params)
                key = cache_key(self.model, request, params)
            except Exception as exc:  # noqa: BLE001 - e.g. params that are not JSON
                results[i] = self._result(False, reason="invalid_request", detail=f"{type(exc).__name__}: {exc}")
                continue
            hit = self._from_cache(request, key)
            if hit is not None:
                results[i] = hit
                continue
            try:
                image = _decode_image(request)
            except ValueError as exc:
                results[i] = self._result(False, reason="invalid_request", detail=str(exc))
                continue
            jobs.append(_Job(i, request, params, key, image))

        for ask in range(self.options.reasks + 1):
            if not jobs:
                break
            retry: list[_Job] = []
            for group in self._groups(jobs):
                for job, text, usage, failure in self._generate(group):
                    job.attempts += 1
                    for k in job.usage:
                        job.usage[k] += usage[k]
                    if failure:
                        results[job.index] = self._result(False, reason="generation_error", detail=failure,
                                                          attempts=job.attempts, usage=job.usage)
                        continue
                    verdict = check_answer(text, job.request.schema)
                    if verdict.ok:
                        self._store(job, text, verdict.parsed)
                        results[job.index] = self._result(True, parsed=verdict.parsed, text=text,
                                                          usage=job.usage, attempts=job.attempts)
                    elif verdict.reason in ("invalid_json", "schema_invalid") and ask < self.options.reasks:
                        self._stats.add("reasks")
                        job.messages = reask_messages(job.messages, text, verdict)
                        retry.append(job)
                    else:
                        results[job.index] = self._result(False, text=text, reason=verdict.reason,
                                                          detail=verdict.detail, attempts=job.attempts,
                                                          usage=job.usage)
            jobs = retry

    def _groups(self, jobs: list[_Job]):
        """Micro-batches of jobs that can share one generate() call: same sampling parameters,
        all with an image or all without, at most generation_batch_size."""
        by_kind: dict = {}
        for job in jobs:
            by_kind.setdefault((repr(sorted(job.params.items())), job.image is not None), []).append(job)
        size = max(1, self.options.generation_batch_size)
        for same in by_kind.values():
            for start in range(0, len(same), size):
                yield same[start:start + size]

    def _generate(self, jobs: list[_Job]):
        """[(job, answer text, usage, failure detail or "")] for one micro-batch."""
        import torch

        params = jobs[0].params
        processor, model = self._processor, self._model
        tokenizer = getattr(processor, "tokenizer", processor)
        empty = {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            texts = [processor.apply_chat_template(with_instructions(job.messages, job.request.schema),
                                                   add_generation_prompt=True, tokenize=False)
                     for job in jobs]
            images = [[job.image] for job in jobs] if jobs[0].image is not None else None
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            generate_kwargs = {"max_new_tokens": int(params.get("max_tokens", 512)),
                               "pad_token_id": tokenizer.pad_token_id}
            temperature = float(params.get("temperature", 0.0))
            if temperature > 0:
                generate_kwargs.update(do_sample=True, temperature=temperature,
                                       top_p=float(params.get("top_p", 1.0)))
            else:
                generate_kwargs.update(do_sample=False)
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
            self._stats.add("requests", len(jobs))
            self._stats.enter(len(jobs))
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    output = model.generate(**inputs, **generate_kwargs)
            finally:
                self._stats.leave(len(jobs))
            elapsed_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - this micro-batch fails, the others go on
            log.warning("LVLM generation failed for %d requests: %s: %s", len(jobs), type(exc).__name__, exc)
            return [(job, None, dict(empty), f"{type(exc).__name__}: {exc}"[:300]) for job in jobs]
        prompt_len = inputs["input_ids"].shape[1]
        answers = output[:, prompt_len:]
        decoded = processor.batch_decode(answers, skip_special_tokens=True)
        out = []
        for row, job in enumerate(jobs):
            usage = {"prompt_tokens": int(inputs["attention_mask"][row].sum()),
                     "completion_tokens": int((answers[row] != tokenizer.pad_token_id).sum())}
            self._stats.add("prompt_tokens", usage["prompt_tokens"])
            self._stats.add("completion_tokens", usage["completion_tokens"])
            self._stats.latency(elapsed_ms)
            out.append((job, decoded[row], usage, ""))
        return out

    # ---- cache -------------------------------------------------------------------------------
    def _from_cache(self, request: LvlmRequest, key: str) -> Optional[LvlmResult]:
        if self._cache is None:
            return None
        entry = self._cache.get(key)
        if entry is None or entry.get("failed"):  # a final failure: this backend asks again
            return None
        parsed = entry.get("parsed")
        if request.schema is not None and (parsed is None or schema_problem(parsed, request.schema)):
            return None
        self._stats.add("cache_hits")
        return self._result(True, parsed=parsed, text=entry.get("text"), usage=entry.get("usage") or {},
                            cached=True)

    def _store(self, job: _Job, text: str, parsed: Optional[dict]) -> None:
        if self._cache is None:
            return
        stored = self._cache.put(job.key, make_entry(self.model, job.request, job.params, text, parsed, job.usage))
        self._stats.add("cache_writes" if stored else "cache_write_errors")

    def _result(self, ok: bool, parsed=None, text=None, reason=None, detail="", usage=None,
                cached=False, attempts=0) -> LvlmResult:
        return LvlmResult(ok=ok, parsed=parsed, text=text, reason=reason, detail=detail,
                          usage=dict(usage or {"prompt_tokens": 0, "completion_tokens": 0}),
                          cached=cached, attempts=attempts, backend=self.name, model=self.model)


def _decode_image(request: LvlmRequest):
    """The request's JPEG as an RGB PIL image, or None when the messages have no image part."""
    if not request.has_image():
        return None
    if not request.image_jpeg:
        raise ValueError("the messages have an image part but the request has no image_jpeg")
    from PIL import Image
    try:
        with Image.open(io.BytesIO(request.image_jpeg)) as image:
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for broken data
        raise ValueError(f"image_jpeg cannot be decoded: {type(exc).__name__}: {exc}") from None


def weights_are_offline(model: str) -> bool:
    """True when from_pretrained must not touch the hub: a local directory, HF offline mode, or
    no route to the hub (so a worker without internet fails fast instead of retrying for
    half a minute)."""
    if Path(model).is_dir():
        return True
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return True
    return not hub_reachable()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_weights(model: str) -> None:
    """Raise LvlmUnavailable unless `model` can be loaded on this machine without guessing."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:  # found without importing: torch takes seconds to import on a launcher
        raise LvlmUnavailable(unavailable_message(
            f"the transformers backend needs {' and '.join(missing)} (pip install the lvlm extra)"))
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LvlmUnavailable(unavailable_message(f"{model} has no config.json"))
        return
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise LvlmUnavailable(unavailable_message(f"no model directory at {model}"))
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return  # in the local hub cache
    except ValueError as exc:  # not a valid hub id either
        raise LvlmUnavailable(unavailable_message(f"{model!r} is neither a directory nor a hub id ({exc})")) from None
    if weights_are_offline(model):
        raise LvlmUnavailable(unavailable_message(
            f"the LVLM weights {model!r} are not on this machine and the hub cannot be reached"))

