"""A small versioned on-disk cache for the per-process geo tables (places.py, polygons.py).

Every Beam worker process builds the same two tables from the same two files; parsing them costs
seconds, reading back what an earlier process derived from them costs tens of milliseconds. A
cache file holds numpy arrays plus a JSON `meta` dict:

    MAGIC | u64 header length | header (JSON) | u32 CRC of header | payload (the arrays)

The header lists each array (dtype, shape, offset) and the payload's length and CRC, so a
truncated or damaged file is detected and rebuilt, never half-read. No pickle: loading a cache
file runs no code from it.

Where: $MG_GEO_CACHE_DIR, else $XDG_CACHE_HOME/mg-geo, else ~/.cache/mg-geo. A file's name
carries its kind, the format version of that kind and a digest of everything the content depends
on (the source file's path, size and mtime; the versions of the packages that parse it), so a
changed input or package gets a new file instead of a stale answer. Files are written under a
temporary name in the same folder and moved into place with os.replace: concurrent builders each
write a whole file and the last rename wins. Whatever goes wrong with the cache (no home, a
read-only folder, a bad file) the caller builds from the source as if there were no cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "MG_GEO_CACHE_DIR"
MAGIC = b"MGGEO\x00c1"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_logged: set = set()

T = TypeVar("T")


class CacheError(Exception):
    """A cache file that is missing, truncated, damaged or of another format."""


def cache_dir() -> Optional[Path]:
    """Where cache files live; None when no place can be named (no HOME)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mg-geo"
    try:
        return Path.home() / ".cache" / "mg-geo"
    except (RuntimeError, KeyError):
        return None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cache_path(kind: str, version: int, source: str, depends: dict) -> Optional[Path]:
    """The cache file for `kind` built from `source`; `depends` names whatever else shapes the
    content (package versions, parameters). None when there is no cache folder."""
    folder = cache_dir()
    if folder is None:
        return None
    st = os.stat(source)
    key = json.dumps({"kind": kind, "version": version, "source": os.path.realpath(source),
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns, "depends": depends},
                     sort_keys=True, default=str)
    return folder / f"{kind}-v{version}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.bin"


def write(path: Path, arrays: dict, meta: dict) -> None:
    """Write the arrays and meta atomically (temporary file in the same folder, then os.replace)."""
    table, chunks, offset = [], [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.hasobject:
            raise TypeError(f"{name}: object arrays cannot be cached")
        data = arr.tobytes()
        table.append([name, arr.dtype.str, list(arr.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)
    crc = 0
    for data in chunks:
        crc = zlib.crc32(data, crc)
    header = json.dumps({"meta": meta, "arrays": table, "payload_bytes": offset, "payload_crc": crc},
                        ensure_ascii=True, allow_nan=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _U64.pack(len(header)) + header + _U32.pack(zlib.crc32(header)))
            for data in chunks:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _header(f, size: int) -> tuple[dict, int]:
    head = f.read(len(MAGIC) + _U64.size)
    if len(head) < len(MAGIC) + _U64.size or not head.startswith(MAGIC):
        raise CacheError("not a cache file")
    (hlen,) = _U64.unpack_from(head, len(MAGIC))
    if hlen > size:
        raise CacheError("truncated header")
    raw = f.read(hlen + _U32.size)
    if len(raw) != hlen + _U32.size or _U32.unpack_from(raw, hlen)[0] != zlib.crc32(raw[:hlen]):
        raise CacheError("damaged header")
    try:
        header = json.loads(raw[:hlen])
    except ValueError as e:
        raise CacheError(f"damaged header: {e}") from None
    return header, len(head) + len(raw)


def read_meta(path: Path) -> dict:
    """Only the meta dict (the header is checked, the payload not read)."""
    with open(path, "rb") as f:
        return _header(f, os.fstat(f.fileno()).st_size)[0]["meta"]


def read(path: Path) -> tuple[dict, dict]:
    """(arrays, meta) from a cache file; the arrays are read-only views of one buffer.
    Raises OSError (FileNotFoundError: no cache yet) or CacheError (truncated, damaged)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _header(f, size)
        if size - start != header["payload_bytes"]:
            raise CacheError(f"payload is {size - start} bytes, header says {header['payload_bytes']}")
        payload = f.read()
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc"]:
        raise CacheError("damaged payload")
    arrays = {}
    for name, dtype, shape, offset, nbytes in header["arrays"]:
        dt = np.dtype(dtype)
        if dt.hasobject or offset + nbytes > len(payload) or nbytes != dt.itemsize * int(np.prod(shape)):
            raise CacheError(f"{name}: bad array entry")
        arrays[name] = np.frombuffer(payload, dtype=dt, count=nbytes // dt.itemsize, offset=offset).reshape(shape)
    return arrays, header["meta"]


def note(key, message: str, *args) -> None:
    """Log a cache problem once per process (it is never fatal)."""
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def load_or_build(path: Optional[Path], build: Callable[[], T],
                  encode: Callable[[T], tuple[dict, dict]],
                  decode: Callable[[dict, dict], T]) -> T:
    """decode(read(path)) when that works, else build() and (best effort) write encode(result)."""
    if path is not None:
        try:
            return decode(*read(path))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a cache must never break the build
            note(("bad", str(path)), "geo cache %s unusable (%r): rebuilding it", path, e)
    value = build()
    if path is not None:
        try:
            write(path, *encode(value))
            log.debug("geo cache written: %s", path)
        except Exception as e:  # noqa: BLE001
            note(("write", str(path.parent)), "geo cache not written to %s (%r): building each time",
                 path.parent, e)
    return value
