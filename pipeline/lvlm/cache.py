"""Content-addressed cache of validated LVLM answers, one small JSON file per answer.

The key covers everything that determines the answer (model, prompt and schema versions,
sampling parameters, the messages with the image replaced by its sha256) and nothing that does
not (request_id, api key, endpoint). Files are written under a temporary name and renamed, so a
worker killed mid-write leaves no half file under a real key; a rerun or a resumed run finds every
answer it already paid for and sends no request for it. Paths go through Beam's FileSystems so
the cache can live on gs:// next to the output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Optional

from apache_beam.io.filesystems import CompressionTypes, FileSystems

from pipeline.lvlm.types import LvlmRequest

log = logging.getLogger(__name__)
KEY_FORMAT = "mg-geo-lvlm-cache/1"  # bump to invalidate every entry at once


def render_for_key(messages: list[dict], image_sha256: str) -> list[dict]:
    """Messages as the key sees them: role and content only, the image part replaced by the
    image's sha256 (the bytes themselves are not hashed twice, and a re-encoded data URL or a
    different image transport must not change the key)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "sha256": image_sha256} if part.get("type") in ("image", "image_url")
                       else part for part in content]
        out.append({"role": message.get("role"), "content": content})
    return out


def cache_key(model: str, request: LvlmRequest, params: dict) -> str:
    payload = {
        "format": KEY_FORMAT,
        "model": model,
        "prompt_version": request.prompt_version,
        "schema_name": request.schema_name,
        "schema_version": request.schema_version,
        "params": params,
        "messages": render_for_key(request.messages, request.image_sha256),
        "image_sha256": request.image_sha256,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        # Local reads and writes take microseconds: callers may do them inline. Remote ones
        # (gs://, s3://) take a network round trip and belong on a thread.
        self.is_local = FileSystems.get_scheme(self.root) in (None, "file")

    def path(self, key: str) -> str:
        # Two-character fan-out keeps directories small on local disks.
        return FileSystems.join(self.root, key[:2], key + ".json")

    def get(self, key: str) -> Optional[dict]:
        """The stored entry, or None when absent or unreadable (then the answer is asked again)."""
        path = self.path(key)
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                entry = json.loads(f.read().decode("utf-8"))
        except Exception:  # noqa: BLE001 - missing (the common case) or damaged: both mean "ask"
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            log.warning("ignoring damaged LVLM cache entry %s", path)
            return None
        return entry

    def put(self, key: str, entry: dict) -> bool:
        """Write atomically (temp name, then rename). A cache that cannot be written costs a
        repeated request later, never the answer now: errors are logged and swallowed."""
        from pipeline.io.outdir import atomic_write

        final = self.path(key)
        data = json.dumps({**entry, "key": key, "written_unix": round(time.time(), 3)},
                          ensure_ascii=False, sort_keys=True).encode("utf-8")
        try:
            atomic_write(final, lambda stream: stream.write(data))
            return True
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("could not write LVLM cache entry %s: %s", final, exc)
            return False


def make_entry(model: str, request: LvlmRequest, params: dict, text: str, parsed: Optional[dict],
               usage: dict) -> dict:
    """What is stored for one validated answer (no request_id, endpoint or credentials)."""
    return {"model": model, "prompt_version": request.prompt_version,
            "schema_name": request.schema_name, "schema_version": request.schema_version,
            "params": params, "image_sha256": request.image_sha256,
            "text": text, "parsed": parsed, "usage": usage}


def make_failure_entry(model: str, request: LvlmRequest, params: dict, text: Optional[str], reason: str,
                       detail: str, usage: dict) -> dict:
    """What is stored for an answer that stayed invalid after the re-asks (or a refusal): it was
    paid for, so a rerun gives the same failure instead of asking again, unless --lvlm-retry-failed.
    Transport failures (timeouts, 5xx, dropped connections) got no answer and are never stored."""
    return {**make_entry(model, request, params, text, None, usage), "failed": {"reason": reason, "detail": detail}}
