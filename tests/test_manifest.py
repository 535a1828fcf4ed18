"""The manifest written as per-shard pieces and merged once (pipeline.io.manifest)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.io.manifest import MANIFEST_SCHEMA, merge_pieces, write_piece


def _rows(shard: str, keys: list[str]) -> list[dict]:
    return [{**{name: None for name in MANIFEST_SCHEMA.names}, "part": "meta", "split": "train",
             "shard": shard, "key": key, "lat": 1.5, "width": 7, "country_disagreement": False}
            for key in keys]


def test_pieces_merge_in_shard_order_with_every_row(tmp_path):
    out = str(tmp_path)
    # Written out of order, as workers finish them; val sorts after train, as the names do.
    pieces = [write_piece(out, "meta-val-000000.tar", _rows("meta-val-000000.tar", ["v1"])),
              write_piece(out, "meta-train-000001.tar", _rows("meta-train-000001.tar", ["c", "d"])),
              write_piece(out, "meta-train-000000.tar", _rows("meta-train-000000.tar", ["a", "b"]))]
    path = merge_pieces(pieces + pieces[:1], out)  # a retried bundle may report a piece twice
    table = pq.read_table(path)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("key").to_pylist() == ["a", "b", "c", "d", "v1"]
    assert table.column("shard").to_pylist()[2] == "meta-train-000001.tar"
    assert not list(tmp_path.rglob("*.partial"))


def test_no_pieces_give_an_empty_manifest_with_the_schema(tmp_path):
    table = pq.read_table(merge_pieces([], str(tmp_path)))
    assert table.num_rows == 0 and table.schema.equals(MANIFEST_SCHEMA)


def test_each_piece_is_one_row_group(tmp_path):
    out = str(tmp_path)
    pieces = [write_piece(out, f"meta-train-{i:06d}.tar", _rows(f"s{i}", [f"k{i}-{j}" for j in range(i + 1)]))
              for i in range(4)]
    meta = pq.ParquetFile(merge_pieces(pieces, out)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1, 2, 3, 4]


def test_a_rewritten_piece_replaces_the_old_one(tmp_path):
    out = str(tmp_path)
    write_piece(out, "meta-train-000000.tar", _rows("x", ["old"]))
    path = write_piece(out, "meta-train-000000.tar", _rows("x", ["new"]))
    assert pq.read_table(path).column("key").to_pylist() == ["new"]


def test_a_row_that_does_not_fit_the_schema_is_an_error(tmp_path):
    with pytest.raises(Exception):
        write_piece(str(tmp_path), "meta-train-000000.tar", [{**_rows("x", ["k"])[0], "lat": "north"}])
