"""Shard writing: the corpus as WebDataset tars, `OUT/{part}/{split}/{part}-{split}-NNNNNN.tar`.

Pure functions plan and write one shard; `pipeline.beam.write_parts` wraps them in Beam. A shard is
written under a temporary name in `OUT/_tmp/` and renamed into place only when complete (as Beam's
fileio does), so a reader listing `*.tar` never sees half a shard. Its `_stats.json` is written
after the rename and doubles as the completion marker (as img2dataset's per-shard stats do).
Members are written with a fixed mtime and sorted keys, so the same input gives byte-identical
shards on a rerun. The tars are written by `pipeline.io.tar_writer` (the standard library's tarfile,
byte-identical to webdataset's TarWriter) so that the build never imports webdataset, and with it
torch.
"""
from __future__ import annotations

import json
from typing import Iterable

from apache_beam.io.filesystems import FileSystems

from pipeline.core.record import SAFE_KEY, Record
from pipeline.io import outdir
from pipeline.io.shard_limits import ShardLimits  # noqa: F401 - shards.ShardLimits for callers
from pipeline.io.stash import jpeg_of
from pipeline.io.tar_writer import ShardTarWriter

SPLITS = ("train", "val", "test")
JSON_OVERHEAD = 4096  # bytes a sample's json and tar headers add, for planning before encoding


def sample_body(record: Record, part: str) -> dict:
    """KEY.json's content: every field of the record except the bytes, plus the part it is in."""
    return {**record.to_json(), "part": part}


def encode_json(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")


def sample_json(record: Record, part: str) -> bytes:
    return encode_json(sample_body(record, part))


def planned_size(record: Record) -> int:
    if record.image_bytes is not None:
        return len(record.image_bytes) + JSON_OVERHEAD
    return (record.image or {}).get("jpeg_bytes", 0) + JSON_OVERHEAD


def bucket_count(n: int, total_bytes: int, limits: ShardLimits) -> int:
    """How many hash buckets a (part, split) gets. Buckets are filled to ~80% of a shard on average
    so that the random spread of a hash rarely overflows one (an overflow becomes two shards), and
    there are at least min_shards of them while each keeps min_shard_samples (ShardLimits)."""
    by_size = max(1, -(-n * 5 // (limits.max_samples * 4)), -(-total_bytes * 5 // (limits.max_bytes * 4)))
    return max(by_size, min(limits.min_shards, n // limits.min_shard_samples))


def plan_chunks(sizes: list[tuple[str, int]], limits: ShardLimits) -> list[list[str]]:
    """Sorted keys cut into shards that respect both limits. Equal-sized cuts when a bucket must
    split, so an overflow does not leave a tiny tail shard."""
    items = sorted(sizes)
    total = sum(s for _, s in items)
    n_chunks = max(1, -(-len(items) // limits.max_samples), -(-total // limits.max_bytes))
    target = -(-total // n_chunks)
    per = -(-len(items) // n_chunks)
    chunks, current, current_bytes = [], [], 0
    for key, size in items:
        if current and (len(current) >= min(per, limits.max_samples)
                        or current_bytes + size > min(max(target, size), limits.max_bytes)):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


def shard_path(out: str, part: str, split: str, number: int) -> str:
    return FileSystems.join(out, part, split, f"{part}-{split}-{number:06d}.tar")


def write_shard(out: str, path: str, records: list[Record], part: str,
                fail_after: int | None = None) -> dict | None:
    """Write one complete shard of whole records (or thin copies) to `path`; returns its stats
    (None, and no shard, for no records)."""
    samples = ((r.key, jpeg_of(r), sample_json(r, part)) for r in records)
    return write_samples(out, path, samples, part, fail_after)


def write_samples(out: str, path: str, samples: Iterable[tuple[str, bytes, bytes]], part: str,
                  fail_after: int | None = None) -> dict | None:
    """Write (key, jpg, json) samples as one complete shard at `path`, via a temporary file;
    returns its stats, or None (and no shard) when `samples` yields nothing.

    Samples are consumed one at a time, so a caller can make each from its stash as it is
    written and a shard's pixels never sit in memory together. `fail_after` exists for the crash
    test: raise after that many samples, like a worker dying."""
    total, keys = 0, []

    def write(stream):
        nonlocal total
        writer = ShardTarWriter(stream, mtime=0)  # what webdataset.TarWriter writes, without torch
        try:
            for key, jpg, body in samples:
                if fail_after is not None and len(keys) >= fail_after:
                    raise RuntimeError(f"injected writer failure after {fail_after} samples")
                if not SAFE_KEY.match(key):
                    raise ValueError(f"unsafe key {key!r} reached the writer")
                total += writer.write({"__key__": key, "jpg": jpg, "json": body})
                keys.append(key)
        finally:
            writer.close()  # on failure too: atomic_write deletes the temporary file

    # The temporary file lies in OUT/_tmp: a crash leaves nothing half-written in the part folders.
    outdir.atomic_write(path, write, tmp_dir=outdir.join(out, "_tmp"))
    if not keys:
        FileSystems.delete([path])  # every sample was refused: no shard
        return None
    stats = {"shard": path.rsplit("/", 1)[-1], "part": part, "samples": len(keys), "bytes": total,
             "first_key": keys[0], "last_key": keys[-1]}
    outdir.write_text(path[: -len(".tar")] + "_stats.json", json.dumps(stats, indent=1, sort_keys=True))
    return stats
