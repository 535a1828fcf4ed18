"""--exclude: benchmark images (exact copies, and re-encoded resized copies) never enter the corpus.

The build reads the real camera photos of exif-samples/gps; the benchmark holds exact copies of
two of them and re-encoded (quality 70), resized (60%) copies of two others, plus an unrelated
picture and a broken file. Exactly those four inputs must be ledger rows (exclude,
benchmark_overlap); every other input ends as it does in a build without --exclude."""
from __future__ import annotations

import io
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli
from pipeline.beam.run import BuildConfig, run_build
from pipeline.core.record import Record, Reject
from pipeline.core.stage import run_stage
from pipeline.stages.exclude import Benchmarks, ExcludeStage, load_benchmarks
from pipeline.stages.image import ImageStage

EXACT = ("DSCN0010.jpg", "DSCN0025.jpg")      # one a copied JPEG in the image stage, one re-encoded
REENCODED = ("DSCN0021.jpg", "DSCN0038.jpg")


def _reencoded(path: Path) -> bytes:
    im = Image.open(path).convert("RGB")
    small = im.resize((int(im.width * 0.6), int(im.height * 0.6)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=70)
    return out.getvalue()


def _noise() -> bytes:
    rng = np.random.default_rng(5)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def make_benchmark(root: Path, gps: Path) -> list[str]:
    """A benchmark folder (nested) and a csv list beside it; returns the --exclude paths."""
    folder = root / "bench" / "images"
    (folder / "a" / "b").mkdir(parents=True)
    shutil.copy(gps / EXACT[0], folder / "a" / "b" / "exact0.jpg")
    (folder / "re0.jpg").write_bytes(_reencoded(gps / REENCODED[0]))
    (folder / "other.jpg").write_bytes(_noise())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listed = root / "bench" / "listed"
    listed.mkdir()
    shutil.copy(gps / EXACT[1], listed / "exact1.jpg")
    (listed / "re1.jpg").write_bytes(_reencoded(gps / REENCODED[1]))
    (root / "bench" / "list.csv").write_text("path,label\nlisted/exact1.jpg,x\nlisted/re1.jpg,y\n")
    return [str(folder), str(root / "bench" / "list.csv")]


def _outcomes(out: Path) -> dict:
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    ledger = pq.read_table(out / "rejected.parquet").to_pylist()
    places = Counter([r["input_id"] for r in manifest] + [r["input_id"] for r in ledger])
    assert all(n == 1 for n in places.values())
    return ({r["input_id"]: ("sample", r["split"]) for r in manifest}
            | {r["input_id"]: (r["stage"], r["reason"], r["detail"]) for r in ledger})


@pytest.fixture(scope="module")
def builds(tmp_path_factory, exif_samples):
    root = tmp_path_factory.mktemp("exclude")
    gps = exif_samples / "gps"
    exclude = make_benchmark(root, gps)
    spec = f"exif:{gps}"
    plain = run_build(BuildConfig(sources=[spec], out=str(root / "plain")), [])
    excluded = run_build(BuildConfig(sources=[spec], out=str(root / "excluded"), exclude=tuple(exclude)), [])
    return plain, excluded, _outcomes(root / "plain"), _outcomes(root / "excluded")


def test_build_drops_exactly_the_benchmark_copies(builds):
    plain, excluded, before, after = builds
    planted = {*EXACT, *REENCODED}
    assert planted <= {i for i, o in before.items() if o[0] == "sample"}  # they were samples before
    dropped = {i: o for i, o in after.items() if o[:2] == ("exclude", "benchmark_overlap")}
    assert set(dropped) == planted
    assert {i: o for i, o in after.items() if i not in planted} == \
        {i: o for i, o in before.items() if i not in planted}
    assert "exact0.jpg" in dropped[EXACT[0]][2] and "same bytes" in dropped[EXACT[0]][2]
    assert "exact1.jpg" in dropped[EXACT[1]][2]
    assert "re0.jpg" in dropped[REENCODED[0]][2] and "hamming" in dropped[REENCODED[0]][2]
    assert "re1.jpg" in dropped[REENCODED[1]][2]
    assert excluded["benchmark_overlap"] == {"excluded_inputs": 4, "benchmark_images": 5,
                                             "unreadable_benchmark_images": 1}
    assert plain["benchmark_overlap"]["excluded_inputs"] == 0
    assert excluded["conservation_ok"] and plain["conservation_ok"]
    assert excluded["inputs_total"] == plain["inputs_total"]


def test_hashes_are_the_image_stage_own(exif_samples):
    """A benchmark file hashes exactly as the same bytes do as a record in the image stage."""
    path = exif_samples / "gps" / EXACT[1]
    bench = load_benchmarks([str(path)], ImageStage())
    record = ImageStage().process(Record(key="k", source="s", input_id="i", image_bytes=path.read_bytes()))
    assert bench.sha256 == {record.image["sha256"]: 0}
    assert bench.phashes == [int(record.image["phash"], 16)]


def test_band_index_finds_what_a_full_scan_finds():
    """15k benchmark hashes, queries near some of them: the stage's answer equals brute force."""
    rng = random.Random(3)
    hashes = [rng.getrandbits(64) for _ in range(15_000)]
    bench = Benchmarks(names=[f"b{i}.jpg" for i in range(len(hashes))], phashes=hashes)
    stage = ExcludeStage(bench, radius=4)
    queries = []
    for i in range(300):
        value = hashes[rng.randrange(len(hashes))]
        for _ in range(rng.randrange(0, 8)):  # 0..7 flipped bits: inside and outside radius 4
            value ^= 1 << rng.randrange(64)
        queries.append(value)
    queries += [rng.getrandbits(64) for _ in range(100)]
    records = [Record(key=f"q{i}", source="s", input_id=f"q{i}", image={"sha256": f"{i:064x}", "phash": f"{q:016x}"})
               for i, q in enumerate(queries)]
    kept, rejected = run_stage(stage, records)
    want = {f"q{i}" for i, q in enumerate(queries) if min(bin(q ^ h).count("1") for h in hashes) <= 4}
    assert {r.key for r in rejected} == want
    assert 50 < len(want) < 300
    assert len(kept) + len(rejected) == len(records)


def test_stage_survives_pickling_and_matches_sha():
    import pickle
    bench = Benchmarks(names=["x.jpg"], sha256={"ab" * 32: 0}, phashes=[None])
    stage = pickle.loads(pickle.dumps(ExcludeStage(bench, radius=2)))
    stage.setup()
    out = stage.process(Record(key="k", source="s", input_id="i", image={"sha256": "ab" * 32, "phash": "0" * 16}))
    assert isinstance(out, Reject) and out.reason == "benchmark_overlap" and "x.jpg" in out.detail


@pytest.mark.parametrize("make", [
    lambda tmp: str(tmp / "nowhere"),
    lambda tmp: (tmp / "list.csv").write_bytes(b"\xff\xfe\x00bad") and str(tmp / "list.csv"),
    lambda tmp: (tmp / "list.parquet").write_bytes(b"x") and str(tmp / "list.parquet"),
])
def test_bad_exclude_path_is_one_line_and_exit_2(tmp_path, exif_samples, capsys, make):
    path = make(tmp_path)
    rc = cli.main(["build", "--source", f"exif:{exif_samples / 'gps'}", "--out", str(tmp_path / "out"),
                   "--exclude", path])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("mg-geo build: error: --exclude") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_lists_name_paths_relative_to_themselves(tmp_path):
    from pipeline.stages.exclude import benchmark_files
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.txt").write_text("# benchmark\n\na.jpg\nimgs/b.png\n")
    assert benchmark_files(str(tmp_path / "sub" / "list.txt")) == [
        ("a.jpg", str(tmp_path / "sub" / "a.jpg")), ("imgs/b.png", str(tmp_path / "sub" / "imgs" / "b.png"))]
    (tmp_path / "plain.csv").write_text("x/1.jpg,label\nx/2.jpg,label\n")  # no header: first column
    assert [name for name, _ in benchmark_files(str(tmp_path / "plain.csv"))] == ["x/1.jpg", "x/2.jpg"]
    (tmp_path / "named.csv").write_text("label,image\nq,y/1.jpg\n")
    assert [name for name, _ in benchmark_files(str(tmp_path / "named.csv"))] == ["y/1.jpg"]
    bench = load_benchmarks([str(tmp_path / "plain.csv")], ImageStage())  # listed files are missing
    assert (len(bench), bench.unreadable) == (0, 2)
