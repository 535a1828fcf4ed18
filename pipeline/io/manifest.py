"""OUT/manifest.parquet: one row per sample, written as pieces per shard and merged once.

The writer writes the rows of each shard it finishes to `OUT/_tmp/manifest/<shard>.parquet`
(under a temporary name, then renamed, like the shard); when every shard is written, one step
merges the pieces in shard order into manifest.parquet, a piece (row group) at a time
(pipeline.io.parquet_pieces). Rows never go through a shuffle: a single-file `WriteToParquet`
grouped every row of the run on one key and then held them all as Python dicts in its row-group
buffer (bench/bench_memory.py). A rerun writes the same
pieces under the same names, so the manifest comes out in the same order every time.
"""
from __future__ import annotations

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline.report.agreement import manifest_labels
from pipeline.io.parquet_pieces import merge_files, write_rows
from pipeline.core.record import Record

MANIFEST_FILE = "manifest.parquet"
PIECES_DIR = "_tmp/manifest"

MANIFEST_SCHEMA = pa.schema([
    ("part", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()),
    ("source", pa.string()), ("input_id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()),
    ("continent", pa.string()), ("country_code", pa.string()), ("country", pa.string()),
    ("sovereign_code", pa.string()), ("admin1", pa.string()), ("admin2", pa.string()),
    ("city", pa.string()), ("city_id", pa.string()), ("nearest_country_code", pa.string()),
    ("country_disagreement", pa.bool_()), ("sha256", pa.string()), ("phash", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()),
    # Labels a source brought (OSV-5M's), null otherwise: pipeline.report.agreement compares them with ours.
    ("label_country", pa.string()), ("label_region", pa.string()), ("label_subregion", pa.string()),
    ("label_city", pa.string()),
])


def manifest_row(record: Record, part: str, shard: str | None = None) -> dict:
    loc = record.location or {}
    img = record.image or {}
    return {
        "part": part, "split": record.split, "shard": shard, "key": record.key,
        "source": record.source, "input_id": record.input_id, "lat": record.lat, "lon": record.lon,
        "continent": loc.get("continent"), "country_code": loc.get("country_code"),
        "country": loc.get("country"), "sovereign_code": loc.get("sovereign_code"),
        "admin1": loc.get("admin1"), "admin2": loc.get("admin2"), "city": loc.get("city"),
        "city_id": loc.get("city_id"), "nearest_country_code": loc.get("nearest_country_code"),
        "country_disagreement": loc.get("country_disagreement"),
        "sha256": img.get("sha256"), "phash": img.get("phash"),
        "width": img.get("width"), "height": img.get("height"),
        **manifest_labels(record),  # a source's own labels (OSV-5M), for the report's agreement
    }


def write_piece(out: str, shard: str, rows: list[dict]) -> str:
    """One shard's rows -> OUT/_tmp/manifest/<shard stem>.parquet; returns its path."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    return write_rows(FileSystems.join(out, PIECES_DIR, f"{stem}.parquet"), rows, MANIFEST_SCHEMA)


def merge_pieces(pieces: list[str], out: str) -> str:
    """Manifest pieces (in any order) -> OUT/manifest.parquet in shard-name order."""
    return merge_files(pieces, FileSystems.join(out, MANIFEST_FILE), MANIFEST_SCHEMA)
