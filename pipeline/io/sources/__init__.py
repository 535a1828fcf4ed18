"""Input sources. A source spec is `KIND:LOCATION`; each kind turns its location into records.

Sources work in two steps so Beam can spread the work: `units()` lists cheap, picklable units
(files, tables, shards) and `records(unit)` turns one unit into (record, reject-or-None) pairs.
`check()` runs before the pipeline starts: a bad *argument* stops the run at once.
"""
from __future__ import annotations

from pipeline.io.sources.base import Source, SourceError
from pipeline.io.sources.exif import ExifSource
from pipeline.io.sources.osv5m import Osv5mSource
from pipeline.io.sources.table import TableSource
from pipeline.io.sources.wds import WdsSource

KINDS = {"exif": ExifSource, "table": TableSource, "wds": WdsSource, "osv5m": Osv5mSource}


def parse_source(spec: str, options=None) -> Source:
    kind, sep, location = spec.partition(":")
    if not sep or not location:
        raise SourceError(f"source {spec!r} is not KIND:LOCATION (kinds: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise SourceError(f"unknown source kind {kind!r} in {spec!r} (kinds: {', '.join(KINDS)})")
    return KINDS[kind](spec, location, options or {})


__all__ = ["KINDS", "Source", "SourceError", "parse_source"]
