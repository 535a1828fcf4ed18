"""The build's own tar writer: byte-identical to webdataset's TarWriter, and the build path never
imports webdataset or torch (webdataset imports torch, which costs every Beam worker seconds and
hundreds of MB)."""
from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.io import shards, tar_writer
from pipeline.core.record import Record, make_key
from pipeline.io.tar_writer import ShardTarWriter

REPO_ROOT = Path(__file__).resolve().parents[1]


def _samples():
    big = bytes(range(256)) * 200  # spans several tar records (10240 bytes)
    return [
        {"__key__": "a-000000000001", "jpg": b"\xff\xd8jpeg\xff\xd9", "json": b'{"lat": 1.0}'},
        {"__key__": "b-000000000002", "json": b"{}", "jpg": big, "txt": b"caption"},  # unsorted
        {"__key__": "c-000000000003", "jpg": b"", "json": bytearray(b'{"x": "\xc3\xa9"}')},
        {"__key__": "d" * 110 + "-0123456789ab", "jpg": memoryview(b"long name"), "json": b"{}"},
        {"__key__": "e-000000000005", "jpg": b"x" * 511, "json": b"y" * 513, "__url__": "skipped",
         "_meta": b"not written"},
        # more than the writer's buffer (pipeline.io.tar_writer.WRITE_BUFFER): passed on as it is
        {"__key__": "f-000000000006", "jpg": bytes(range(251)) * 6000, "json": b"{}"},
        {"__key__": "g-\u00e9t\u00e9-000000000007", "jpg": b"non-ASCII name: a PAX header", "json": b"{}"},
    ]


def _with_webdataset(samples) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    sink = wds.TarWriter(buf, mtime=0, encoder=False)
    sizes = [sink.write(dict(s)) for s in samples]
    sink.close()
    return buf.getvalue(), sizes


def _with_ours(samples) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    with ShardTarWriter(buf, mtime=0) as sink:
        sizes = [sink.write(dict(s)) for s in samples]
    assert not buf.closed  # the caller owns the stream
    return buf.getvalue(), sizes


def test_bytes_and_sizes_match_webdataset_tarwriter():
    theirs, their_sizes = _with_webdataset(_samples())
    ours, our_sizes = _with_ours(_samples())
    assert our_sizes == their_sizes
    assert ours == theirs
    assert len(ours) % 10240 == 0


class _WriteOnly:
    """An upload stream's surface: write only (no tell, no seek); remembers each write's size."""

    def __init__(self):
        self.data, self.writes = bytearray(), []

    def write(self, data) -> int:
        self.data += data
        self.writes.append(len(data))
        return len(data)


def test_write_only_stream_gets_the_same_bytes_in_large_writes():
    many = [{"__key__": f"k-{i:012x}", "jpg": bytes([i % 256]) * (40_000 + i), "json": b"{}"} for i in range(60)]
    sink = _WriteOnly()
    with ShardTarWriter(sink, mtime=0) as writer:
        for sample in many + _samples():
            writer.write(dict(sample))
    assert bytes(sink.data) == _with_webdataset(many + _samples())[0]
    assert len(sink.writes) > 2
    # Few large writes: a small one only at the end or just before a piece passed on as it is.
    big = tar_writer.WRITE_BUFFER
    assert all(size >= big or after >= big for size, after in zip(sink.writes, sink.writes[1:]))


def test_empty_shard_matches_webdataset_tarwriter():
    assert _with_ours([]) == _with_webdataset([])


def test_reads_back_with_webdataset(tmp_path):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(_with_ours(_samples())[0])
    got = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in _samples()]
    assert got[1]["jpg"] == bytes(range(256)) * 200 and got[1]["txt"] == b"caption"
    assert got[3]["jpg"] == b"long name"
    assert "_meta" not in got[4] and got[4]["json"] == b"y" * 513


def test_rejects_what_webdataset_rejects():
    with pytest.raises(ValueError, match="__key__"):
        _with_ours([{"jpg": b"x"}])
    with pytest.raises(ValueError, match="not bytes"):
        _with_ours([{"__key__": "k", "json": "text"}])


def _record(i: int) -> Record:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 30 % 256, 10, 20)).save(buf, "JPEG")
    key = make_key("exif:/x", f"photo {i}.jpg")
    return Record(key=key, source="exif:/x", input_id=f"photo {i}.jpg", image_bytes=buf.getvalue(),
                  lat=1.0 + i, lon=2.0, split="train", meta={"messages": []})


def test_write_shard_is_byte_identical_to_webdataset_tarwriter(tmp_path):
    records = [_record(i) for i in range(7)]
    path = shards.shard_path(str(tmp_path), "meta", "train", 0)
    stats = shards.write_shard(str(tmp_path), path, records, "meta")
    samples = [{"__key__": r.key, "jpg": r.image_bytes, "json": shards.sample_json(r, "meta")} for r in records]
    expected, sizes = _with_webdataset(samples)
    assert open(path, "rb").read() == expected
    assert stats["bytes"] == sum(sizes)


BUILD_PATH = ("import sys; import pipeline.beam.run, pipeline.cli; from pipeline.io.sources import parse_source; "
              "import pipeline.io.shards, pipeline.beam.write_parts, pipeline.report.plots, pipeline.report.build_report, pipeline.report.card; "
              "import pipeline.commands.build, pipeline.io.tar_writer; "
              "from apache_beam.runners.portability.fn_api_runner import FnApiRunner; "
              "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")


def test_build_path_imports_neither_webdataset_nor_torch():
    """In a fresh interpreter: the modules `mg-geo build` and its Beam workers load. A future import
    of webdataset (or anything importing torch) on this path would cost every worker again."""
    done = subprocess.run([sys.executable, "-c", BUILD_PATH], capture_output=True, text=True,
                          check=True, cwd=REPO_ROOT)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


BUILD_RUN = """
import sys
from pipeline.cli import main
code = main(['build', '--source', 'table:' + sys.argv[1], '--out', sys.argv[2]])
# Then a build that reads WebDataset shards (those just written): the wds: source's reader too.
code += main(['build', '--source', 'wds:' + sys.argv[2] + '/meta/*/*.tar', '--out', sys.argv[2] + '-again'])
print(code, sorted(m for m in ('torch', 'webdataset') if m in sys.modules), file=sys.stderr)
"""


def test_a_build_run_imports_neither_webdataset_nor_torch(tmp_path):
    """Whole small builds (in-process runner), so imports made inside functions count too: one
    from a table, one from the WebDataset shards it wrote."""
    rng = random.Random(7)
    rows = ["image,lat,lon"]
    for i in range(3):
        Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3)).save(tmp_path / f"p{i}.jpg", quality=90)
        rows.append(f"p{i}.jpg,{40 + 5 * i},{-70 + 40 * i}")
    (tmp_path / "photos.csv").write_text("\n".join(rows) + "\n")
    done = subprocess.run([sys.executable, "-c", BUILD_RUN, str(tmp_path / "photos.csv"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "out").rglob("*.tar")), done.stderr[-3000:]  # the writer ran
    assert len(list((tmp_path / "out-again").rglob("*.tar"))) >= 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "0 []", done.stderr[-3000:]
