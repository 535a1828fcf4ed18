"""The one record type that flows through every stage, and the rejection that ends a record's trip.

A Record starts in a source reader (path or bytes, maybe coordinates) and gains fields stage by
stage: bytes (read), coordinates (validate), location (geocode), image facts (image), split, then
samples (meta/clue/dialogue). Every field except the bytes goes into the sample's json.

Stage names, in order: source, read, validate, geocode, image, exclude (with --exclude), meta, dedupe, split, clue,
dialogue, write. A rejection in any stage but `clue` or `dialogue` removes the record from every
part; a rejection in `clue` or `dialogue` only means that part has no sample for it (Rejection.part
says which). After meta the record is stashed and a thin copy flows on (pipeline.io.stash).
"""
from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Optional

PARTS = ("meta", "clue", "dialogue")


@dataclass
class Record:
    key: str                      # unique, safe for tar member names and file paths (see make_key)
    source: str                   # the source spec it came from, e.g. "exif:/photos"
    input_id: str                 # what the user calls the input: relative path, row id, shard/key
    image_path: Optional[str] = None    # where the reader stage loads bytes from, if not given
    image_bytes: Optional[bytes] = None  # source bytes, replaced by the clean JPEG after the image stage
    # Set on a thin copy only: where the whole record waits for the writer (pipeline.io.stash), and
    # which parts it has. The thin copy carries what the global steps read, not the samples.
    stash_ref: Optional[str] = None
    stashed_parts: Optional[tuple] = None
    lat: Optional[float] = None
    lon: Optional[float] = None
    # Raw coordinate evidence before validation: {"kind": "exif", "gps": {...}} or
    # {"kind": "table", "lat": "text", "lon": "text"}; validate turns it into lat/lon.
    coords_raw: Optional[dict] = None
    provenance: dict = field(default_factory=dict)  # extra source columns, kept as text
    location: Optional[dict] = None  # geocode stage output
    image: Optional[dict] = None     # image stage output: sizes, sha256, phash
    # Set by the split step; a source may fix it before (OSV-5M's test.csv rows: "test"), and the
    # split step then keeps it (pipeline.global_steps.split, rule 5).
    split: Optional[str] = None
    meta: Optional[dict] = None      # Meta part sample: messages + template version
    clue: Optional[dict] = None      # Clue part sample (LVLM clues + messages), when made
    dialogue: Optional[dict] = None  # Dialogue part sample (multi-turn correction), when made

    def replace(self, **changes: Any) -> "Record":
        return dataclasses.replace(self, **changes)

    def __reduce__(self):
        # Field values by position, not a dict of names: a Record is pickled whenever Beam moves
        # it between steps (and into the stash), and the 18 names were a third of a thin copy.
        return (_record_of_values, tuple(getattr(self, name) for name in _FIELD_NAMES))

    def parts_present(self) -> tuple[str, ...]:
        """The parts this record has a sample for (a thin copy remembers them)."""
        if self.stash_ref is not None:
            return self.stashed_parts or ()
        return tuple(part for part in PARTS if getattr(self, part) is not None)

    def to_json(self) -> dict:
        """Every field of the record except the bytes; this is KEY.json in a shard."""
        # A shallow view, not dataclasses.asdict: that deep-copies every message of every sample
        # and was a third of the writer's time. Callers serialise it; they must not mutate it.
        # coords_raw: evidence only, lat/lon are the answer; stash_*: the build's bookkeeping
        skip = ("image_bytes", "stash_ref", "stashed_parts", "coords_raw")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["image_path"] = public_image_path(self.source, self.image_path)
        return out


def public_image_path(source: str, path: Optional[str]) -> Optional[str]:
    """image_path as a published sample holds it: relative to its source's root (the exif: folder,
    the table's folder), so no user or folder name of the machine that built it travels with the
    corpus. URLs stay whole; a local path outside the root keeps its file name only."""
    if not path or "://" in path:
        return path
    kind, _, location = source.partition(":")
    root = location if kind == "exif" else posixpath.dirname(location)
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else posixpath.basename(path)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Record))


def _record_of_values(*values) -> Record:
    return Record(*values)


@dataclass(frozen=True)
class Reject:
    """What a stage returns instead of a record: a reason code from a small vocabulary
    (report.json counts by it) and a human detail."""
    reason: str
    detail: str = ""


_UNSAFE = re.compile(r"[^a-z0-9]+")


def make_key(source: str, input_id: str) -> str:
    """A key readable by people and safe everywhere: lowercase ASCII letters, digits, '-' and '_'.

    No dots (webdataset splits a member name at the first dot), no slashes or '..' (nothing in
    an input name may reach outside OUT). The hash of (source, input_id) makes it unique even when
    two names slug to the same text."""
    stem = input_id.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    slug = _UNSAFE.sub("_", stem.lower()).strip("_")[:40] or "x"
    digest = hashlib.sha1(f"{source}\x00{input_id}".encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}"


SAFE_KEY = re.compile(r"^[a-z0-9_]+-[0-9a-f]{12}$")
