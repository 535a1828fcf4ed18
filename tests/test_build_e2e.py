"""End to end: the shared real photos plus every kind of generated bad input, built with Beam.

Checks the issue's promises on the real outputs: shards open with plain webdataset and match the
schema; every input ends in exactly one place with the right reason; orientation is applied;
no image in two splits; reruns are byte-identical; a writer crash leaves no readable half shard;
the multi-process runner gives the same corpus."""
from __future__ import annotations

import hashlib
import json
import tarfile
import shutil
from collections import Counter
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.beam.run import BuildConfig, run_build
from pipeline.cli import main
from pipeline.core.data_files import load_json
from pipeline.io.shards import ShardLimits
from fresh_process import run_mg_geo
from made_inputs import make_inputs


def _config(inputs, out: Path, **kw) -> BuildConfig:
    return BuildConfig(sources=inputs["sources"], out=str(out), limits=ShardLimits(max_samples=8), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, exif_samples):
    root = tmp_path_factory.mktemp("e2e")
    inputs = make_inputs(root / "in", exif_samples)
    out = root / "out"
    report = run_build(_config(inputs, out), [])
    return inputs, out, report


def _manifest(out: Path):
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _ledger(out: Path):
    return pq.read_table(out / "rejected.parquet").to_pylist()


def _tar_digests(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def test_every_input_ends_in_exactly_one_place(built, exif_samples):
    inputs, out, report = built
    manifest, ledger = _manifest(out), _ledger(out)
    places = Counter((r["source"], r["input_id"]) for r in manifest) + Counter((r["source"], r["input_id"]) for r in ledger)
    assert all(n == 1 for n in places.values()), [k for k, n in places.items() if n > 1]
    # Inputs counted independently of the pipeline: files named like images, rows of the table.
    image_exts = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
    for spec in inputs["sources"]:
        kind, location = spec.split(":", 1)
        expected = (len(inputs["table_rows"]) if kind == "table"
                    else sum(1 for p in Path(location).rglob("*") if p.suffix.lower() in image_exts))
        got = sum(1 for (source, _) in places if source == spec)
        assert got == expected == report["inputs"][spec], spec
    assert report["conservation_ok"] and all(v["ok"] for v in report["conservation"].values())
    assert report["inputs_total"] == len(manifest) + len(ledger)
    # The Meta part's turn structures (v2): counted per structure, shares summing to one.
    structures = report["meta_structures"]
    assert structures and sum(v["samples"] for v in structures.values()) >= sum(1 for r in manifest if r["part"] == "meta")
    assert abs(sum(v["share"] for v in structures.values()) - 1) < 0.01


def test_the_build_leaves_only_its_outputs(built):
    _, out, _ = built
    # _tmp held the stash (every clean JPEG once more) and _work the counts; both go at the end,
    # the stash while the plots are drawn (outdir.cleaning_tmp).
    # .mg-geo marks OUT as made by mg-geo (a rerun may replace it); the lock is gone.
    assert sorted(p.name for p in out.iterdir()) == [".mg-geo", "README.md", "manifest.parquet", "meta", "plots",
                                                      "rejected.parquet", "report.json"]


def test_a_failed_cleanup_is_raised_after_the_body_ran(tmp_path, monkeypatch):
    from pipeline.io import outdir

    (tmp_path / "_tmp").mkdir()
    ran = []

    def refuse(out):
        raise PermissionError(f"cannot delete {out}/_tmp")
    monkeypatch.setattr(outdir, "cleanup_tmp", refuse)
    with pytest.raises(PermissionError, match="cannot delete"):
        with outdir.cleaning_tmp(str(tmp_path)):
            ran.append(True)
    assert ran == [True]


def test_each_bad_input_gets_its_reason(built):
    inputs, out, _ = built
    outcome = {(r["source"], r["input_id"]): "ok" for r in _manifest(out)}
    outcome.update({(r["source"], r["input_id"]): r["reason"] for r in _ledger(out)})
    wrong = {k: (outcome.get(k), want) for k, want in inputs["expect"].items() if outcome.get(k) not in want.split("|")}
    assert not wrong
    table = next(s for s in inputs["sources"] if s.startswith("table:"))
    by_id = {}
    for (source, input_id), reason in outcome.items():
        if source == table:
            by_id.setdefault(input_id.split("#")[0], []).append(reason)
    assert by_id["good-1"] == ["ok"] and by_id["namibia"] == ["ok"]
    assert by_id["no-coords"] == ["coords_missing"] and by_id["words"] == ["coords_not_numeric"]
    assert by_id["nan"] == ["not_finite"] and by_id["missing-file"] == ["missing_file"]
    assert by_id["url"] == ["url_not_downloaded"] and sorted(by_id["dup-id"]) == ["missing_file", "ok"]
    ledger = _ledger(out)
    assert all(r["stage"] and r["reason"] and r["reason"] != "internal_error" for r in ledger), \
        [r for r in ledger if r["reason"] == "internal_error"]


def test_samples_publish_image_paths_relative_to_their_source(built):
    """Before, every sample held the absolute local path (the builder's user and folder names)."""
    inputs, out, _ = built
    paths = {}
    for shard in (out / "meta").rglob("*.tar"):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            body = json.loads(sample["json"])
            paths[(body["source"], body["input_id"])] = body["image_path"]
    assert paths and str(out.parent) not in json.dumps(list(paths.values()))
    local = {k: v for k, v in paths.items() if v and "://" not in v}
    assert local and all(not v.startswith("/") for v in local.values())
    exif = {input_id: v for (source, input_id), v in local.items() if source.startswith("exif:")}
    assert exif and all(v == input_id for input_id, v in exif.items())


def test_namibia_stays_na_in_provenance(built):
    _, out, _ = built
    for shard in (out / "meta").rglob("*.tar"):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            body = json.loads(sample["json"])
            if body["input_id"] == "namibia":
                assert body["provenance"]["cc"] == "NA" and body["location"]["country_code"] == "NA"
                return
    pytest.fail("the Namibia row did not become a sample")


def test_shards_open_with_plain_webdataset_and_match_the_schema(built):
    _, out, _ = built
    validator = jsonschema.Draft202012Validator(load_json("schemas/record.schema.json"))
    manifest = _manifest(out)
    seen = []
    for shard in sorted((out / "meta").rglob("*.tar")):
        assert shard.name.startswith(f"meta-{shard.parent.name}-") and shard.parent.parent.name == "meta"
        assert (shard.parent / shard.name.replace(".tar", "_stats.json")).exists()
        for sample in wds.WebDataset(str(shard), shardshuffle=False).decode("pil"):
            body = sample["json"]
            validator.validate(body)
            assert body["split"] == shard.parent.name and body["part"] == "meta"
            assert sample["jpg"].mode == "RGB" and max(sample["jpg"].size) <= 768
            assert not sample["jpg"].getexif()  # no metadata: GPS would leak the answer
            seen.append(body["key"])
    assert sorted(seen) == sorted(r["key"] for r in manifest)
    # Merged from per-shard pieces in shard order: a row per sample, in the order of the shards.
    assert [(r["shard"], r["key"]) for r in manifest] == sorted((r["shard"], r["key"]) for r in manifest)
    assert all((out / "meta" / r["split"] / r["shard"]).exists() for r in manifest)
    assert len(manifest) > 20 and not list(out.rglob("*.partial"))
    assert "\n# MG-Geo corpus" in (out / "README.md").read_text()


def test_shard_limits_hold_and_numbers_are_contiguous(built):
    _, out, _ = built
    for split_dir in (out / "meta").iterdir():
        shards = sorted(split_dir.glob("*.tar"))
        assert [s.name for s in shards] == [f"meta-{split_dir.name}-{i:06d}.tar" for i in range(len(shards))]
        for shard in shards:
            assert 1 <= sum(1 for _ in wds.WebDataset(str(shard), shardshuffle=False)) <= 8


def test_orientation_photos_come_out_upright_and_collapse_to_one(built, exif_samples):
    """Turned upright, the 8 orientations of a photo are one picture: one sample, 7 near duplicates
    naming it. Had orientation not been applied, their hashes would differ and all 8 would stay."""
    _, out, _ = built
    manifest, ledger = _manifest(out), _ledger(out)
    for shape in ("landscape", "portrait"):
        kept = [r for r in manifest if r["input_id"].startswith(shape + "_")]
        dropped = [r for r in ledger if r["input_id"].startswith(shape + "_")]
        assert len(kept) == 1 and len(dropped) == 7, (shape, kept, dropped)
        assert all(r["reason"] in ("near_duplicate", "duplicate") and kept[0]["key"] in r["detail"] for r in dropped)
        w, h = kept[0]["width"], kept[0]["height"]
        assert (w > h) if shape == "landscape" else (h > w)


def test_no_image_in_two_splits(built):
    _, out, _ = built
    manifest = _manifest(out)
    for field in ("key", "sha256", "phash"):
        values = Counter(r[field] for r in manifest)
        assert max(values.values()) == 1, field
    splits = {r["split"] for r in manifest}
    assert splits <= {"train", "val", "test"}


def test_rerun_gives_identical_shards_and_manifest(built, tmp_path):
    inputs, out, _ = built
    before_tars, before_manifest = _tar_digests(out), _manifest(out)
    run_build(_config(inputs, tmp_path / "again"), [])
    assert _tar_digests(tmp_path / "again") == before_tars
    assert _manifest(tmp_path / "again") == before_manifest


def test_multi_process_runner_gives_the_same_corpus(built, tmp_path):
    """`mg-geo build` in its own process, as a user runs it, with Beam's 2 multi_processing workers."""
    inputs, out, _ = built
    mp = tmp_path / "mp"
    argv = ["build", "--out", str(mp), "--shard-max-samples", "8"]
    for source in inputs["sources"]:
        argv += ["--source", source]
    argv += ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    run_mg_geo(argv)
    report = json.loads((mp / "report.json").read_text())
    assert report["conservation_ok"]
    assert _tar_digests(mp) == _tar_digests(out)
    assert _manifest(mp) == _manifest(out)  # same rows in the same (shard) order
    key = lambda r: (r["source"], r["input_id"])  # noqa: E731 - ledger pieces merge in any order
    assert sorted(_ledger(mp), key=key) == sorted(_ledger(out), key=key)


def test_portable_runner_gives_the_same_corpus(built, tmp_path):
    """The portability path Flink, Spark and Dataflow use, with the SDK harness in this process."""
    inputs, out, _ = built
    run_build(_config(inputs, tmp_path / "portable"),
              ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"])
    assert _tar_digests(tmp_path / "portable") == _tar_digests(out)


def test_writer_crash_leaves_no_readable_half_shard_and_a_rerun_recovers(built, tmp_path):
    inputs, out, _ = built
    crashed = tmp_path / "crash"
    with pytest.raises(Exception, match="injected writer failure"):
        run_build(_config(inputs, crashed, fail_writer_after=2), [])
    # No half shard anywhere: a shard of at most 2 samples may have been completed (and marked by
    # its _stats.json) before the crash, in whatever order the runner wrote them; every other one
    # never left OUT/_tmp.
    for tar in crashed.rglob("*.tar"):
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        with tarfile.open(tar) as complete:
            assert stats["samples"] <= 2 and len(complete.getnames()) == 2 * stats["samples"], tar
    assert not [p for p in crashed.rglob("*") if p.suffix == ".partial" and "_tmp" not in p.parts]
    run_build(_config(inputs, crashed), [])
    assert _tar_digests(crashed) == _tar_digests(out)


@pytest.mark.parametrize("args, message", [
    (["--source", "exif:/nonexistent/photos"], "does not exist"),
    (["--source", "flickr:/x"], "unknown source kind"),
    (["--source", "exif:{samples}", "--out", "/proc/mg-geo-cannot-write"], "not writable"),
])
def test_bad_arguments_stop_at_once_with_one_message(args, message, exif_samples, tmp_path, capsys):
    args = [a.replace("{samples}", str(exif_samples / "gps")) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["build", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_a_build_where_every_input_is_rejected_still_accounts_for_all(tmp_path, exif_samples):
    """No record reaches dedupe, split or the writer: the global steps have nothing to combine
    (their side inputs fall back to empty plans) and the outputs still say where everything went."""
    photos = tmp_path / "bad"
    photos.mkdir()
    for name in ("corrupted.jpg", "misc/no_exif.jpg", "invalid/image01980.jpg"):
        shutil.copy(exif_samples / name, photos / name.replace("/", "_"))
    out = tmp_path / "out"
    report = run_build(BuildConfig(sources=[f"exif:{photos}"], out=str(out)), [])
    assert report["inputs_total"] == 3 and report["conservation_ok"]
    assert _manifest(out) == [] and not list(out.rglob("*.tar"))
    assert sorted(r["input_id"] for r in _ledger(out)) == ["corrupted.jpg", "invalid_image01980.jpg",
                                                          "misc_no_exif.jpg"]


def test_no_flatten_carries_whole_records(tmp_path, exif_samples):
    """Beam's local runner with 2 workers lost whole records from a Flatten of records and
    rejections (a 20k-photo wds: build counted 13,695-19,821 inputs). Inputs are now counted from a
    tagged output of the source; the one Flatten left joins the paths of the ledger's pieces."""
    import apache_beam as beam

    from pipeline.beam.graph import build_pipeline
    from pipeline.io.sources import parse_source

    inputs = make_inputs(tmp_path / "in", exif_samples)
    config = _config(inputs, tmp_path / "out")
    p = beam.Pipeline()
    build_pipeline(p, config, [parse_source(spec, {}) for spec in config.sources])
    graph = p.to_runner_api().components.transforms
    flattens = [t.unique_name for t in graph.values() if t.spec.urn == "beam:transform:flatten:v1"]
    assert flattens == ["Ledger/PiecePaths"]


def test_the_cards_load_snippets_load_exactly_the_shards(built):
    """The card named meta-train-{000000..000009} while one shard existed, and `load_dataset(OUT)`
    would have read the _stats.json files. The webdataset snippet is run; the YAML configs'
    data_files globs must match exactly the tar files."""
    import re
    import subprocess
    import sys

    import yaml

    _, out, _ = built
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    tars = {str(p.relative_to(out)) for p in out.rglob("*.tar")}
    assert len(tars) > 1 and list(out.rglob("*_stats.json"))
    matched = set()
    for config in header["configs"]:
        for files in config["data_files"]:
            found = {str(p.relative_to(out)) for p in out.glob(files["path"])}
            assert found and all(f.startswith(f"{config['config_name']}/{files['split']}/") for f in found)
            matched |= found
    assert matched == tars
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    part, split = re.search(r'WebDataset\("(\w+)/(\w+)/', code).groups()
    done = subprocess.run([sys.executable, "-c", code + "\nprint(sum(1 for _ in dataset))"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == sum(1 for r in _manifest(out) if (r["part"], r["split"]) == (part, split))
