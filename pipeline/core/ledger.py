"""The ledger: one row for every input that did not become a sample, from the stage that refused
it to OUT/rejected.parquet.

A stage returns a `Reject` (pipeline.core.record); the stage wrapper (pipeline.beam.wrapper), the
source step, dedupe and the writer turn it into a `Rejection` with `Rejection.of`; each step's
rejections become parquet pieces where they are made (`write_piece`, one per bundle) and the pieces
are merged once, when the job ends (`merge`). The report and the plots read the merged file
(`read_rows`). The Beam steps that call these are `WriteLedger` in pipeline/beam/graph.py.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pyarrow as pa

from pipeline.core.record import Record, Reject

LEDGER_FILE = "rejected.parquet"
PIECES_DIR = "_tmp/ledger"
PIECE_ROWS = 50_000  # a bundle's rows are written in pieces of at most this many
COLUMNS = ("source", "input_id", "key", "stage", "reason", "detail", "part")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])
DETAIL_CHARS = 500


@dataclass(frozen=True)
class Rejection:
    """One row of rejected.parquet: an input that did not become a sample, and why."""
    source: str
    input_id: str
    key: str
    stage: str
    reason: str
    detail: str
    part: str = ""  # "" = the record left every part; "clue"/"dialogue" = only that part lacks it

    @classmethod
    def of(cls, record: Record, stage: str, reject: Reject, part: str = "") -> "Rejection":
        return cls(record.source, record.input_id, record.key, stage, reject.reason,
                   reject.detail[:DETAIL_CHARS], part)

    def row(self) -> dict:
        return {name: getattr(self, name) for name in COLUMNS}


def ledger_path(out: str) -> str:
    from pipeline.io import outdir
    return outdir.join(out, LEDGER_FILE)


def write_piece(out: str, rows: list[dict]) -> str:
    """Ledger rows -> one parquet piece under OUT/_tmp/ledger (a unique name); returns its path."""
    from pipeline.io import outdir, parquet_pieces
    path = outdir.join(out, PIECES_DIR, f"{uuid.uuid4().hex}.parquet")
    return parquet_pieces.write_rows(path, rows, SCHEMA)


def merge(pieces: list[str], out: str) -> str:
    """Every piece of the job -> OUT/rejected.parquet (no pieces: an empty file with the columns)."""
    from pipeline.io import parquet_pieces
    return parquet_pieces.merge_files(pieces, ledger_path(out), SCHEMA)


def read_rows(out: str) -> list[dict]:
    """OUT/rejected.parquet as rows ([] when the build wrote none)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    path = ledger_path(out)
    if not FileSystems.exists(path):
        return []
    with FileSystems.open(path) as stream:
        return pq.read_table(pa.BufferReader(stream.read()), schema=SCHEMA).to_pylist()
