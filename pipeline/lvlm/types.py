"""The LVLM interface every other stage codes against (see notes/CONTRACT.md, "LVLM interface").

A stage builds LvlmRequests, hands a batch to a backend and turns each LvlmResult into a sample or
a Reject(result.reason, result.detail). Backends never raise for one bad request: every failure
comes back as a result with ok=False and a ledger reason.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional


class LvlmUnavailable(RuntimeError):
    """No LVLM can be reached or loaded: the run cannot make the clue/dialogue parts."""


def unavailable_message(why: str) -> str:
    """LvlmUnavailable's text: what is wrong and the two ways on (a server, or Meta only)."""
    return (f"No LVLM for the clue/dialogue parts: {why}. Point --lvlm-endpoint (or env "
            f"MG_GEO_LVLM_ENDPOINT) at an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, "
            f"OpenAI), or give --lvlm-backend transformers --lvlm-model a local model directory, "
            f"or build only the Meta part with --parts meta.")


# Ledger reasons a result may carry (a stage passes them on as Reject reasons).
REASONS = (
    "http_4xx",           # the server refused the request (detail has the status)
    "invalid_json",       # the answer stayed unparseable after the allowed re-asks
    "schema_invalid",     # the answer was JSON but not valid against the schema
    "refusal",            # the model refused (API refusal field or a refusal-looking text)
    "retries_exhausted",  # 429/5xx/dropped connections until max_attempts
    "timeout",            # the last attempt timed out (after retries)
    "empty_answer",       # no text at all (no-schema requests)
    "bad_response",       # the server answered 2xx with something that is not a chat completion
    "generation_error",   # the in-process model raised while generating this batch
    "invalid_request",    # the request itself cannot be sent (e.g. an image part but no image)
    "internal_error",     # a defect in the client code; detail names the exception
)


@dataclass
class LvlmRequest:
    messages: list[dict]        # HF chat format; the image is the {"type": "image"} part
    image_jpeg: Optional[bytes]  # the resized JPEG from the image stage (not the original)
    image_sha256: str           # sha256 of image_jpeg (cache key part)
    schema: Optional[dict]      # JSON schema for structured output (from schemas/*.json)
    schema_name: str            # e.g. "clue"
    schema_version: str         # schemas/*.json "$id"/"version"
    prompt_version: str         # e.g. "clue/v1"
    params: dict = field(default_factory=dict)  # sampling: temperature, max_tokens, seed
    request_id: str = ""        # for logs (record key + purpose), never part of the cache key

    def has_image(self) -> bool:
        """Whether the messages carry the {"type": "image"} placeholder (then image_jpeg must be set)."""
        return any(isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
                   for m in self.messages)

    @staticmethod
    def sha256(data: Optional[bytes]) -> str:
        return hashlib.sha256(data).hexdigest() if data is not None else ""


@dataclass
class LvlmResult:
    ok: bool
    parsed: Optional[dict]      # JSON object when ok (validated against schema)
    text: Optional[str]         # raw answer text
    reason: Optional[str]       # ledger reason when not ok (see REASONS)
    detail: str
    usage: dict                 # {"prompt_tokens": int, "completion_tokens": int}
    cached: bool
    attempts: int               # requests sent (or generations run) for this result; 0 = cache
    backend: str                # "openai" | "transformers"
    model: str


class LvlmBackend:
    """RunInference-like: construct cheaply, load_model() once per worker, then batches."""

    name: str = ""
    model: str = ""

    def load_model(self) -> None:
        raise NotImplementedError

    def run_inference(self, batch: list[LvlmRequest]) -> list[LvlmResult]:
        """One result per request, same order. Never raises for a failed request."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters since construction; combine workers' dicts with stats.merge_stats."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the connection pool / model. Optional; the worker's exit does it too."""
