"""osv5m: source on a small tree in OSV-5M's layout, built end to end with the real pipeline.

Rows sit at real places; "their" labels are reverse_geocoder's own answer (as OSV-5M labelled its
images), except a few planted wrong ones and Windsor, Ontario, which reverse_geocoder puts in
Detroit, US while the country polygon says CA. The report's agreement must count exactly those."""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import reverse_geocoder
from PIL import Image

from pipeline.report.agreement import label_agreement
from pipeline.beam.run import BuildConfig, run_build
from pipeline.geo.places import load_places
from pipeline.global_steps.split import assign_splits
from pipeline.core.record import Record
from pipeline.io.sources import SourceError, parse_source
from pipeline.io.sources.osv5m import Osv5mSource

FULL_COLUMNS = ["id", "latitude", "longitude", "thumb_original_url", "country", "sequence", "captured_at",
                "lon_bin", "lat_bin", "cell", "land_cover", "road_index", "drive_side", "climate", "soil",
                "dist_sea", "quadtree_10_5000", "quadtree_10_25000", "quadtree_10_1000", "quadtree_10_50000",
                "quadtree_10_12500", "quadtree_10_500", "quadtree_10_2500", "unique_region",
                "unique_sub-region", "unique_city", "unique_country", "creator_username", "creator_id",
                "region", "sub-region", "city"]
MIN_COLUMNS = ["id", "latitude", "longitude", "country", "region", "sub-region", "city"]  # test.csv
LABELS = ("country", "region", "sub-region", "city")
WINDSOR = (42.2941, -83.0545)  # Windsor, Ontario: reverse_geocoder's nearest place is Detroit, US

# (id, split, place (name, cc) or exact coordinates, planted change to their labels, has image)
PLAN = [
    ("1001", "train", ("Paris", "FR"), {}, True),
    ("1002", "train", ("Berlin", "DE"), {}, True),
    ("1003", "train", ("Warsaw", "PL"), {}, True),
    ("1004", "train", ("Rome", "IT"), {}, True),
    ("1005", "train", ("Vienna", "AT"), {}, True),
    ("1006", "train", ("Prague", "CZ"), {}, True),
    ("1007", "train", ("Budapest", "HU"), {}, True),
    ("1008", "train", ("Oslo", "NO"), {}, True),
    ("1009", "train", ("Helsinki", "FI"), {}, True),
    ("1010", "train", ("Athens", "GR"), {}, True),
    ("1011", "train", ("Windhoek", "NA"), {}, True),  # "NA" must stay text, not a null
    ("1012", "train", WINDSOR, {}, True),  # their US = reverse_geocoder's; our polygon: CA
    ("1013", "train", ("Madrid", "ES"), {"country": "PT"}, True),  # wrong country
    ("1014", "train", ("Nairobi", "KE"), {"region": "Coast", "city": "Mombasa"}, True),  # wrong region, city
    ("1015", "train", ("Lisbon", "PT"), {k: "" for k in LABELS}, True),  # no labels: not compared
    ("1016", "train", ("Mexico City", "MX"), {}, False),  # image missing -> missing_file
    ("1017", "train", ("Santiago", "CL"), {}, True),  # latitude cell emptied below -> coords_missing
    ("2001", "test", ("Brasilia", "BR"), {}, True),
    ("2002", "test", ("Tokyo", "JP"), {}, True),
    ("2003", "test", ("Canberra", "AU"), {}, True),
    ("2004", "test", ("Ottawa", "CA"), {}, True),
]
NO_COORDS = "1017"
ORPHANS = {"train": ["9001"], "test": ["9002", "9003"]}  # images without a csv row


def _point(where) -> tuple[float, float]:
    if isinstance(where[0], float):
        return where
    place = next(p for p in load_places().rows if (p.name, p.cc) == where)
    return round(place.lat + 0.003, 5), round(place.lon + 0.002, 5)  # near, not on, the place


def _jpeg(seed: int) -> bytes:
    rng = random.Random(seed)  # noise: every picture distinct, so dedupe keeps them all
    image = Image.new("RGB", (96, 72))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(96 * 72)])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tree(root: Path) -> dict:
    """Writes the tree; returns {id: their labels} and the expected outcome per row."""
    points = {row_id: _point(where) for row_id, _, where, _, _ in PLAN}
    found = reverse_geocoder.search([points[row_id] for row_id, *_ in PLAN], mode=1)
    their, rows = {}, {"train": [], "test": []}
    for n, ((row_id, split, where, change, has_image), rg) in enumerate(zip(PLAN, found)):
        labels = {"country": rg["cc"], "region": rg["admin1"], "sub-region": rg["admin2"], "city": rg["name"]}
        labels |= change
        their[row_id] = labels
        lat, lon = points[row_id]
        row = {c: f"x{n}" for c in FULL_COLUMNS} | labels | {"id": row_id, "latitude": repr(lat), "longitude": repr(lon)}
        row["creator_username"] = f"Doe, J.\n\"{n}\""  # comma, quotes and a newline inside one cell
        if row_id == NO_COORDS:
            row["latitude"] = ""
        rows[split].append(row)
        if has_image:
            _write(root / "images" / split / f"{n % 3:02d}" / f"{row_id}.jpg", _jpeg(n))
    for split, ids in ORPHANS.items():
        for row_id in ids:
            _write(root / "images" / split / "01" / f"{row_id}.jpg", _jpeg(int(row_id)))
    for split, columns in (("train", FULL_COLUMNS), ("test", MIN_COLUMNS)):
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows[split])
    return their


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("osv5m")
    their = make_tree(root / "osv5m")
    spec = f"osv5m:{root / 'osv5m'}"
    out = root / "out"
    # Small units, so both csvs are cut into several chunks (and a quoted newline may straddle a cut).
    report = run_build(BuildConfig(sources=[spec], out=str(out), source_options={"chunk_bytes": 200}), [])
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    ledger = pq.read_table(out / "rejected.parquet").to_pylist()
    return spec, their, out, report, manifest, ledger


def test_every_row_ends_in_one_place_and_orphans_are_no_inputs(built):
    spec, _, _, report, manifest, ledger = built
    places = Counter(r["input_id"] for r in manifest) + Counter(r["input_id"] for r in ledger)
    assert set(places) == {f"{split}/{row_id}" for row_id, split, *_ in PLAN}
    assert all(n == 1 for n in places.values())
    assert report["inputs"] == {spec: len(PLAN)} and report["conservation_ok"]
    outcome = {r["input_id"]: (r["stage"], r["reason"]) for r in ledger}
    assert outcome == {"train/1016": ("source", "missing_file"), "train/1017": ("validate", "coords_missing")}
    assert {r["source"] for r in manifest} == {spec} and len(manifest) == len(PLAN) - 2


def test_their_labels_kept_as_provenance(built):
    _, their, out, _, manifest, _ = built
    samples = {}
    for tar in out.glob("meta/*/*.tar"):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    body = json.loads(t.extractfile(member).read())
                    samples[body["input_id"]] = body
    assert len(samples) == len(manifest)
    for input_id, body in samples.items():
        labels = their[input_id.split("/")[1]]
        assert body["provenance"] == {f"osv5m_{k}": labels[k] for k in LABELS}
    assert samples["train/1011"]["provenance"]["osv5m_country"] == "NA"
    row = next(r for r in manifest if r["input_id"] == "train/1014")
    assert (row["label_country"], row["label_region"], row["label_subregion"], row["label_city"]) == \
        ("KE", "Coast", their["1014"]["sub-region"], "Mombasa")


def test_agreement_counts_what_was_planted(built):
    _, their, _, report, manifest, _ = built
    agreement = report["label_agreement"]
    key = {r["input_id"].split("/")[1]: r["key"] for r in manifest}
    sampled = [row_id for row_id, *_ in PLAN if row_id in key and row_id != "1015"]  # 1015: no labels
    assert agreement["samples"] == len(sampled) == 18
    windsor = next(r for r in manifest if r["input_id"] == "train/1012")
    assert (windsor["country_code"], windsor["nearest_country_code"], windsor["city"]) == ("CA", "US", "Detroit")
    country = agreement["country"]
    assert {k: country[k] for k in ("compared", "agree", "polygon_correction", "other_disagreement",
                                     "agree_nearest")} == {
        "compared": 18, "agree": 16, "polygon_correction": 1, "other_disagreement": 1, "agree_nearest": 17}
    assert country["examples"] == {
        "polygon_correction": [{"key": key["1012"], "theirs": "US", "ours": "CA", "nearest": "US"}],
        "other_disagreement": [{"key": key["1013"], "theirs": "PT", "ours": "ES", "nearest": "ES"}]}
    for level, wrong in (("region", {"1014": "Coast"}), ("city", {"1014": "Mombasa"})):
        assert (agreement[level]["compared"], agreement[level]["agree"], agreement[level]["disagree"]) == (18, 17, 1)
        assert [e["theirs"] for e in agreement[level]["examples"]["disagree"]] == list(wrong.values())
    # Sub-region: reverse_geocoder has none for many capitals; only the labelled ones are compared.
    with_subregion = [row_id for row_id in sampled if their[row_id]["sub-region"]]
    assert len(with_subregion) >= 5
    assert (agreement["sub-region"]["compared"], agreement["sub-region"]["agree"],
            agreement["sub-region"]["disagree"]) == (len(with_subregion), len(with_subregion), 0)


def test_units_cut_rows_whole_and_log_orphan_images(built, caplog):
    spec, _, _, _, _, _ = built
    location = spec.split(":", 1)[1]
    small, whole = Osv5mSource(spec, location, {"chunk_bytes": 100}), Osv5mSource(spec, location, {})
    small.check()
    with caplog.at_level(logging.INFO, logger="pipeline.io.sources.osv5m"):
        small_units = list(small.units())
    log = caplog.text
    assert "osv5m train: 17 rows" in log and "1 images have no csv row" in log
    assert "osv5m test: 4 rows" in log and "2 images have no csv row" in log
    whole_units = list(whole.units())
    # Every train row is over 100 bytes and spans two lines: a cut at a line end would split it.
    assert len(whole_units) == 2
    assert Counter(u.split for u in small_units) == {"train": 17, "test": 2}
    pairs = lambda src, units: [(r, rej) for u in units for r, rej in src.records(u)]  # noqa: E731
    got, want = pairs(small, small_units), pairs(whole, whole_units)
    assert [(r, rej) for r, rej in got] == [(r, rej) for r, rej in want]
    assert not any(rej and rej.reason == "row_malformed" for _, rej in got)
    record = next(r for r, _ in got if r.input_id == "train/1012")
    assert record.coords_raw == {"kind": "table", "lat": "42.2941", "lon": "-83.0545"}
    assert record.image_path.startswith(location) and record.image_path.endswith("/1012.jpg")


def test_repeated_ids_stay_distinct_inputs(tmp_path):
    _write(tmp_path / "images" / "test" / "00" / "7.jpg", _jpeg(7))
    (tmp_path / "test.csv").write_text("id,latitude,longitude\n7,48.85,2.35\n\n7,48.86,2.36\n,1,2\n8,1,2\n")
    for chunk_bytes in (1, 10_000):
        source = parse_source(f"osv5m:{tmp_path}", {"chunk_bytes": chunk_bytes})
        source.check()
        got = [(r.input_id, rej.reason if rej else None) for u in source.units() for r, rej in source.records(u)]
        assert got == [("test/7#row0", None), ("test/7#row1", None), ("test/row2", "id_missing"),
                       ("test/8", "missing_file")]


def test_bad_arguments_stop_at_check(tmp_path):
    with pytest.raises(SourceError, match="neither train.csv nor test.csv"):
        parse_source(f"osv5m:{tmp_path}").check()
    (tmp_path / "test.csv").write_text("id,lat_bin,longitude\n1,2,3\n")
    with pytest.raises(SourceError, match="no latitude column"):
        parse_source(f"osv5m:{tmp_path}").check()
    (tmp_path / "test.csv").write_text("id,latitude,longitude\n1,2,3\n")
    _write(tmp_path / "images" / "test" / "00.zip", b"PK")
    with pytest.raises(SourceError, match="unzip them"):
        parse_source(f"osv5m:{tmp_path}").check()


def test_agreement_reads_records_too():
    location = {"country_code": "CA", "nearest_country_code": "US", "admin1": "Michigan",
                "admin2": "Wayne County", "city": "Detroit"}
    labelled = Record(key="a", source="s", input_id="a", location=location,
                      provenance={"osv5m_country": "us", "osv5m_region": "Michigan", "osv5m_city": "Windsor"})
    unlabelled = Record(key="b", source="s", input_id="b", location=location)
    result = label_agreement([labelled, unlabelled])
    assert result["samples"] == 1
    assert (result["country"]["polygon_correction"], result["region"]["agree"], result["city"]["disagree"],
            result["sub-region"]["compared"]) == (1, 1, 1, 0)


def test_their_test_split_stays_our_test_split(built):
    """test.csv rows land in test shards whatever their unit draws; train.csv rows are split by
    their geographic units as before (they are far from every test row here)."""
    _, _, out, _, manifest, _ = built
    by_id = {r["input_id"]: r for r in manifest}
    points = {row_id: _point(where) for row_id, _, where, _, _ in PLAN}
    test_ids = [f"test/{row_id}" for row_id, split, *_ in PLAN if split == "test"]
    assert all(by_id[i]["split"] == "test" and by_id[i]["shard"].startswith("meta-test-") for i in test_ids)
    # The fixing matters: left to their geographic units, some of these would not be test.
    drawn = assign_splits([points[i.split("/")[1]] for i in test_ids])
    assert any(split != "test" for split in drawn)
    train_ids = [i for i in by_id if i.startswith("train/")]
    want = assign_splits([points[i.split("/")[1]] for i in train_ids])
    assert [by_id[i]["split"] for i in train_ids] == want
    test_members = {m for tar in out.glob("meta/test/*.tar") for m in tarfile.open(tar).getnames()}
    assert {by_id[i]["key"] for i in test_ids} <= {m.split(".")[0] for m in test_members}
