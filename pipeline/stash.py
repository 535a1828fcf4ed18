"""Keep image bytes out of the shuffles: after the image stage, each clean JPEG is written once to
OUT/_tmp/images/KEY.jpg and the record carries only its path until the writer reads it back.

Dedupe and split wait on side inputs and the writer groups by shard, so a runner materialises the
records between those steps; with the bytes inside, a local run's memory grew with the corpus
(bench/bench_memory.py). Without them a record is a few KB of labels. The directory is removed
with OUT/_tmp when the build ends.
"""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from pipeline.record import Record

STASH_DIR = "_tmp/images"


def stash(record: Record, out: str) -> Record:
    if record.image_bytes is None:
        return record
    path = FileSystems.join(out, STASH_DIR, f"{record.key}.jpg")
    # Same key, same bytes: a retried bundle simply writes the file again.
    with FileSystems.create(path) as stream:
        stream.write(record.image_bytes)
    return record.replace(image_bytes=None, image_ref=path)


def unstash(record: Record) -> Record:
    """The record with its JPEG bytes back (for a stage that needs the pixels, e.g. the LVLM parts)."""
    if record.image_bytes is not None or not record.image_ref:
        return record
    return record.replace(image_bytes=jpeg_of(record))


def jpeg_of(record: Record) -> bytes:
    if record.image_bytes is not None:
        return record.image_bytes
    with FileSystems.open(record.image_ref) as stream:
        return stream.read()
