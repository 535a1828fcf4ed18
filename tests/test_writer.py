"""The shard writer: limits, atomic rename, readable by plain webdataset, no bytes in json."""
from __future__ import annotations

import io
import json

import pytest
import webdataset as wds
from PIL import Image

from pipeline.io import shards
from pipeline.core.record import Record, make_key


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, 10, 20)).save(buf, "JPEG")
    return buf.getvalue()


def _record(i: int) -> Record:
    key = make_key("exif:/x", f"dir/photo {i}.v2.jpg")
    return Record(key=key, source="exif:/x", input_id=f"dir/photo {i}.v2.jpg", image_bytes=_jpeg(i),
                  lat=1.0 + i, lon=2.0, split="train", meta={"messages": []})


def test_plan_chunks_respects_both_limits_and_keeps_every_key():
    sizes = [(f"k{i:03d}", 100 + i) for i in range(250)]
    limits = shards.ShardLimits(max_samples=40, max_bytes=3000)
    chunks = shards.plan_chunks(sizes, limits)
    assert sorted(k for c in chunks for k in c) == sorted(k for k, _ in sizes)
    size = dict(sizes)
    for chunk in chunks:
        assert len(chunk) <= 40
        assert sum(size[k] for k in chunk) <= 3000
    # equal cuts: no tiny tail shard
    assert min(len(c) for c in chunks) >= max(len(c) for c in chunks) // 2


def test_plan_chunks_single_oversized_sample_gets_its_own_shard():
    chunks = shards.plan_chunks([("a", 10), ("b", 5000), ("c", 10)], shards.ShardLimits(10, 100))
    assert ["b"] in chunks and sorted(sum(chunks, [])) == ["a", "b", "c"]


def test_bucket_count_grows_with_data():
    limits = shards.ShardLimits(max_samples=100, max_bytes=10**9)
    assert shards.bucket_count(10, 1000, limits) == 1
    assert shards.bucket_count(1000, 1000, limits) == 13  # ~80 per bucket


def test_bucket_count_gives_readers_several_shards_but_none_tiny():
    limits = shards.ShardLimits()  # 5000 samples a shard, at least 8 shards of >= 250 samples
    assert shards.bucket_count(18_000, 10**9, limits) == 8  # by size alone: 5
    assert shards.bucket_count(1_000, 10**8, limits) == 4  # 250 each
    assert shards.bucket_count(400, 10**8, limits) == 1
    assert shards.bucket_count(100_000, 10**9, limits) == 25  # large splits: by size
    assert shards.bucket_count(18_000, 10**9, shards.ShardLimits(min_shards=1)) == 5
    with pytest.raises(ValueError):
        shards.ShardLimits(min_shards=0)


def test_written_shard_opens_with_plain_webdataset_and_is_deterministic(tmp_path):
    records = [_record(i) for i in range(5)]
    path = shards.shard_path(str(tmp_path), "meta", "train", 0)
    stats = shards.write_shard(str(tmp_path), path, records, "meta")
    assert stats["samples"] == 5 and path.endswith("meta/train/meta-train-000000.tar")
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r.key for r in records]
    body = json.loads(samples[0]["json"])
    assert body["part"] == "meta" and "image_bytes" not in body and body["input_id"] == "dir/photo 0.v2.jpg"
    assert samples[0]["jpg"] == records[0].image_bytes
    first = open(path, "rb").read()
    shards.write_shard(str(tmp_path), path, records, "meta")
    assert open(path, "rb").read() == first  # fixed mtime, sorted members: byte-identical
    assert json.loads((tmp_path / "meta/train/meta-train-000000_stats.json").read_text())["samples"] == 5


def test_crash_mid_shard_leaves_no_readable_shard(tmp_path):
    records = [_record(i) for i in range(5)]
    path = shards.shard_path(str(tmp_path), "meta", "train", 0)
    with pytest.raises(RuntimeError, match="injected"):
        shards.write_shard(str(tmp_path), path, records, "meta", fail_after=3)
    assert not list(tmp_path.rglob("*.tar"))
    assert not list(tmp_path.rglob("*_stats.json"))


def test_unsafe_key_never_reaches_a_tar(tmp_path):
    bad = _record(0).replace(key="../../etc/passwd")
    with pytest.raises(ValueError, match="unsafe key"):
        shards.write_shard(str(tmp_path), shards.shard_path(str(tmp_path), "meta", "train", 0), [bad], "meta")
    assert not list(tmp_path.rglob("*.tar"))


def _built_records(folder) -> list[Record]:
    """Whole records as the build's per-record stages make them, from real photos."""
    from pipeline.beam.graph import record_stages
    from pipeline.beam.run import BuildConfig
    from pipeline.io.sources import parse_source
    from pipeline.core.stage import run_stage

    source = parse_source(f"exif:{folder}", {})
    records = [r for unit in source.units() for r, reject in source.records(unit) if reject is None]
    for stage in record_stages(BuildConfig(sources=[], out="")):
        stage.setup()
        records, _ = run_stage(stage, records)
    return [r.replace(split="train") for r in records]


def test_write_parts_turns_a_schema_violation_into_a_ledger_row_and_loses_nothing(tmp_path, exif_samples):
    """A sample the schema refuses (our defect, not the input's) becomes a "write" ledger row; the
    others of its shard are written; a chunk of refused samples only leaves no shard behind."""
    import apache_beam as beam
    import pyarrow.parquet as pq
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline.io import manifest
    from pipeline.core.data_files import load_json
    from pipeline.beam.write_parts import RECORD_SCHEMA, SampleChecker, WriteParts

    checker = SampleChecker(load_json(RECORD_SCHEMA))
    good = _built_records(exif_samples / "gps")
    bad = good.pop().replace(lat=500.0)  # beyond the schema's latitude range
    lone = good.pop().replace(lat=-500.0, split="val")  # the only sample of its (part, split)
    assert len(good) >= 4 and all(not checker.problem(shards.sample_body(r, "meta")) for r in good)
    assert checker.problem(shards.sample_body(bad, "meta")).startswith("lat")
    out = str(tmp_path)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        pieces, rejected, _ = (p | beam.Create(good + [bad, lone])
                               | WriteParts(out, ["meta"], shards.ShardLimits(max_samples=3)))
        _ = (rejected | beam.Map(lambda r: json.dumps([r.key, r.stage, r.reason, r.part]))
             | beam.io.WriteToText(str(tmp_path / "rejected"), shard_name_template=""))
        _ = pieces | beam.combiners.ToList() | beam.Map(manifest.merge_pieces, out)
    rows = [json.loads(line) for line in (tmp_path / "rejected").read_text().splitlines()]
    assert sorted(rows) == sorted([[bad.key, "write", "schema_invalid", "meta"],
                                   [lone.key, "write", "schema_invalid", "meta"]])
    written = pq.read_table(tmp_path / "manifest.parquet").column("key").to_pylist()
    assert sorted(written) == sorted(r.key for r in good)
    tars = sorted((tmp_path / "meta").rglob("*.tar"))
    assert {t.parent.name for t in tars} == {"train"} and len(tars) >= 2  # nothing for val
    in_tars = [s["__key__"] for t in tars for s in wds.WebDataset(str(t), shardshuffle=False)]
    assert sorted(in_tars) == sorted(r.key for r in good)
    assert not list(tmp_path.rglob("*.partial"))
