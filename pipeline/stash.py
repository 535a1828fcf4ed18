"""Keep whole records out of the shuffles: after the per-record stages, each record (clean JPEG,
labels, samples) is written once to OUT/_tmp/records/KEY.pkl and only a thin copy flows on.

Dedupe and split wait on side inputs and the writer groups by shard, so a runner materialises the
elements between those steps (Beam's local runner holds them in memory, a distributed one ships
them through its shuffle). A thin copy is what those steps read, ~0.4 KB encoded instead of the
~2 KB of labels and QA text (and ~75 KB of JPEG) of the record: key, source, input_id, lat/lon,
the image facts (hashes, sizes), the country code (count-balanced selection), the split and the
parts present. `unstash` gives the whole record back, with the decisions taken since (the split).
The directory goes with OUT/_tmp when the build ends.

The file is a pickle of our own Record, written and read by the same build's workers only.
"""
from __future__ import annotations

import pickle

from apache_beam.io.filesystems import FileSystems

from pipeline.record import Record

STASH_DIR = "_tmp/records"


def stash(record: Record, out: str) -> Record:
    """Write the whole record; return its thin copy."""
    if record.stash_ref is not None:
        return record
    path = FileSystems.join(out, STASH_DIR, f"{record.key}.pkl")
    # Same key, same content: a retried bundle simply writes the file again.
    with FileSystems.create(path) as stream:
        stream.write(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
    return thin_copy(record, path)


# What dedupe (hashes, original size) and the writer's planning (JPEG size) read of record.image.
THIN_IMAGE_FACTS = ("sha256", "phash", "orig_width", "orig_height", "jpeg_bytes")


def thin_copy(record: Record, path: str) -> Record:
    country_code = (record.location or {}).get("country_code")
    image = None if record.image is None else {k: record.image[k] for k in THIN_IMAGE_FACTS if k in record.image}
    return Record(key=record.key, source=record.source, input_id=record.input_id,
                  lat=record.lat, lon=record.lon, image=image, split=record.split,
                  location=None if country_code is None else {"country_code": country_code},
                  stash_ref=path, stashed_parts=record.parts_present())


def unstash(record: Record) -> Record:
    """The whole record back (for a stage or the writer), with the thin copy's split."""
    if record.stash_ref is None:
        return record
    return load(record.stash_ref, record.split)


def load(path: str, split: str | None) -> Record:
    """The whole record stashed at `path`, with the split decided since."""
    with FileSystems.open(path) as stream:
        whole: Record = pickle.loads(stream.read())
    return whole.replace(split=split)


def jpeg_of(record: Record) -> bytes:
    """The clean JPEG of a whole record or of a thin copy (read from its stash file)."""
    if record.image_bytes is not None:
        return record.image_bytes
    return unstash(record).image_bytes
