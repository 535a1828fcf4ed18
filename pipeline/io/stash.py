"""Keep whole records out of the shuffles: after the per-record stages, each record (clean JPEG,
labels, samples) is written once under OUT/_tmp/records/ and only a thin copy flows on.

Dedupe and split wait on side inputs and the writer groups by shard, so a runner materialises the
elements between those steps (Beam's local runner holds them in memory, a distributed one ships
them through its shuffle). A thin copy is what those steps read, ~0.4 KB encoded instead of the
~2 KB of labels and QA text (and ~75 KB of JPEG) of the record: key, source, input_id, lat/lon,
the image facts (hashes, sizes), the country code (count-balanced selection), the split and the
parts present. `unstash` gives the whole record back, with the decisions taken since (the split).
The directory goes with OUT/_tmp when the build ends.

The build stashes through `BundleStash`: one file per bundle, records appended to it, the thin
copy's stash_ref naming "FILE#OFFSET:LENGTH": a file per record cost more to create and delete
than pickling the record, appending costs a tenth of that. Readers only come after a shuffle or a side input, when the bundle (and its file) is
complete; a retried bundle writes a new file, and the thin copies of the failed attempt are
discarded with it. `stash()` writes one file per record, for a whole record that reaches the
writer unstashed (a library caller's).

The files hold pickles of our own Records, written and read by the same build's workers only.
"""
from __future__ import annotations

import pickle
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.beam.wrapper import METRIC_PREFIX, BundleCounts
from pipeline.core.record import Record

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


class BundleStash(beam.DoFn):
    """Whole records -> thin copies, each bundle's records appended to one stash file. Timed and
    counted like a stage (mg_geo.<name>.micros), since it is our work."""

    def __init__(self, out: str, name: str = "stash"):
        self.out, self.name = out, name

    def setup(self):
        self.counts = BundleCounts(METRIC_PREFIX + self.name)

    def start_bundle(self):
        self.stream, self.path, self.offset = None, None, 0

    def process(self, record: Record):
        start = time.perf_counter()
        self.counts.add("in")
        if record.stash_ref is None:
            data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            if self.stream is None:
                self.path = FileSystems.join(self.out, STASH_DIR, f"{uuid.uuid4().hex}.records")
                self.stream = FileSystems.create(self.path, compression_type=CompressionTypes.UNCOMPRESSED)
            self.stream.write(data)
            record = thin_copy(record, f"{self.path}#{self.offset}:{len(data)}")
            self.offset += len(data)
        self.counts.add_micros_since(start)
        yield record

    def finish_bundle(self):
        if self.stream is not None:
            start = time.perf_counter()
            self.stream.close()
            self.stream = None
            self.counts.add_micros_since(start)
        self.counts.flush()


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


def load(stash_ref: str, split: str | None) -> Record:
    """The whole record a stash_ref names ("FILE" or "FILE#OFFSET:LENGTH"), with the split
    decided since."""
    path, span = _parse_ref(stash_ref)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
        return _read(stream, span, split)


def _parse_ref(stash_ref: str) -> tuple[str, str]:
    path, _, span = stash_ref.rpartition("#") if "#" in stash_ref else (stash_ref, "", "")
    return path, span


def _read(stream, span: str, split: str | None) -> Record:
    if span:
        offset, length = (int(v) for v in span.split(":"))
        stream.seek(offset)
        data = stream.read(length)
    else:
        data = stream.read()
    whole: Record = pickle.loads(data)
    whole.split = split  # a fresh object no one else holds: set, not dataclasses.replace's copy
    return whole


class StashReader:
    """`load` for many records, each bundle file opened once: the writer reads a shard's ~250
    records from a handful of bundle files instead of opening one for each record. Close it when
    done (a context manager)."""

    def __init__(self):
        self.streams: dict = {}

    def load(self, stash_ref: str, split: str | None) -> Record:
        path, span = _parse_ref(stash_ref)
        if not span:
            return load(stash_ref, split)  # a file per record: nothing to keep open
        stream = self.streams.get(path)
        if stream is None:
            stream = self.streams[path] = FileSystems.open(
                path, compression_type=CompressionTypes.UNCOMPRESSED)
        return _read(stream, span, split)

    def close(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.close()

    def __enter__(self) -> "StashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def jpeg_of(record: Record) -> bytes:
    """The clean JPEG of a whole record or of a thin copy (read from its stash file)."""
    if record.image_bytes is not None:
        return record.image_bytes
    return unstash(record).image_bytes
