"""Parquet files written in pieces and merged once, through Beam's FileSystems (local or gs://).

The manifest (a piece per shard) and the ledger (a piece per bundle) are written this way instead
of by a single-file `WriteToParquet`, which groups every row on one key and holds them all
(bench/bench_memory.py). Each file is written under a temporary name and renamed, so no reader
sees half of one.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.io.outdir import atomic_write


def write_rows(path: str, rows: list[dict], schema: pa.Schema) -> str:
    """Rows -> one parquet file at `path`, written under a temporary name and renamed."""
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda stream: pq.write_table(table, stream))
    return path


def merge_files(pieces: list[str], path: str, schema: pa.Schema) -> str:
    """Parquet pieces (in any order) -> one file at `path`, in piece-name order, one row group
    per piece; holds one piece at a time. No pieces give an empty file with the schema."""

    def write(stream):
        with pq.ParquetWriter(stream, schema) as parquet:
            for piece in sorted(set(pieces), key=lambda p: p.rsplit("/", 1)[-1]):
                with FileSystems.open(piece) as source:
                    table = pq.read_table(pa.BufferReader(source.read()), schema=schema)
                parquet.write_table(table, row_group_size=max(1, table.num_rows))
            if not pieces:
                parquet.write_table(schema.empty_table())

    atomic_write(path, write)
    return path
