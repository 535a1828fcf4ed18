"""table: and wds: sources on real photos: every row or sample becomes exactly one record."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset

from pipeline.core.record import SAFE_KEY
from pipeline.io.sources import SourceError, parse_source
from pipeline.io.sources.table import TableSource
from pipeline.io.sources.wds import WdsSource

GPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "exif-samples" / "gps"
ODD_NAME = "my photo.v2 Zürich é.jpg"  # spaces, dots and non-ASCII in one file name


@pytest.fixture(autouse=True)
def _samples_present(exif_samples):
    # conftest's fixture fails with a clear message when the sample photos are missing.
    assert GPS == exif_samples / "gps"


def collect(source):
    source.check()
    return [pair for unit in source.units() for pair in source.records(unit)]


def by_id(pairs):
    return {record.input_id: (record, reject) for record, reject in pairs}


def assert_keys_safe_and_unique(pairs):
    keys = [record.key for record, _ in pairs]
    assert all(SAFE_KEY.match(k) for k in keys), keys
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------- table


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(GPS / "DSCN0010.jpg", folder / ODD_NAME)
    return folder


def table_rows(photos):
    """(id, image, lat, lon, country) rows covering every case the source must pass or reject."""
    absolute = str(GPS / "DSCN0021.jpg")
    return [
        ("a1", f"photos/{ODD_NAME}", "43.4674", "11.8851", "IT"),   # relative to the table
        ("a2", absolute, "-22.56", "17.08", "NA"),                 # Namibia: NA is not a null
        ("a3", absolute, "", "17.08", "NA"),                        # missing latitude
        ("a4", absolute, "north", "east", "XX"),                    # text: validate rejects it
        ("a5", "photos/nope.jpg", "1.0", "2.0", "XX"),              # missing file: read rejects it
        ("a6", "https://example.org/x.jpg", "1.0", "2.0", "XX"),    # URL: read rejects it
        ("a7", "", "1.0", "2.0", "XX"),                             # no image at all
        ("dup", absolute, "1.0", "2.0", "XX"),                      # the same id three times
        ("dup", absolute, "1.5", "2.5", "XX"),
        ("dup", absolute, "1.5", "2.5", "XX"),
        ("", absolute, "1.0", "2.0", "XX"),                         # no id: the row number
    ]


HEADER = ["id", "image", "lat", "lon", "country"]


def write_table(path: Path, fmt: str, header, rows):
    if fmt in ("csv", "tsv", "csv.gz"):
        opener = gzip.open if fmt == "csv.gz" else open
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerow(header)
            writer.writerows(rows)
    elif fmt == "parquet":
        pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(header, row)), ensure_ascii=False) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "csv.gz", "parquet", "jsonl"])
def test_table_rows_become_one_record_each(tmp_path, photos, fmt):
    rows = table_rows(photos)
    path = tmp_path / f"table.{fmt}"
    write_table(path, fmt, HEADER, rows)
    pairs = collect(parse_source(f"table:{path}"))

    assert len(pairs) == len(rows)
    assert_keys_safe_and_unique(pairs)
    got = by_id(pairs)
    assert set(got) == {"a1", "a2", "a3", "a4", "a5", "a6", "a7", "dup", "dup#row8", "dup#row9",
                        "row10"}

    record, reject = got["a1"]
    assert reject is None
    assert record.image_path == str(photos / ODD_NAME)
    assert Path(record.image_path).read_bytes() == (GPS / "DSCN0010.jpg").read_bytes()
    assert record.coords_raw == {"kind": "table", "lat": "43.4674", "lon": "11.8851"}
    assert record.provenance == {"country": "IT"}
    assert record.source == f"table:{path}" and record.image_bytes is None

    record, reject = got["a2"]
    assert reject is None and record.provenance["country"] == "NA"
    assert record.image_path == str(GPS / "DSCN0021.jpg")

    assert got["a3"][1].reason == "coords_missing"
    assert got["a3"][0].provenance["country"] == "NA"
    assert got["a4"][1] is None and got["a4"][0].coords_raw["lat"] == "north"
    assert got["a5"][1] is None and got["a5"][0].image_path == str(photos / "nope.jpg")
    assert got["a6"][1] is None and got["a6"][0].image_path == "https://example.org/x.jpg"
    assert got["a7"][1].reason == "image_missing"
    assert got["dup#row9"][0].coords_raw["lat"] == "1.5"
    assert got["row10"][1] is None


def test_parquet_typed_columns_become_text(tmp_path):
    # A parquet written by pandas has float coordinates, nulls and nested values.
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({
        "Image_Path": [str(GPS / "DSCN0012.jpg"), str(GPS / "DSCN0025.jpg")],
        "Latitude": pa.array([48.8566, 12.0], pa.float64()),
        "LNG": pa.array([2.3522, None], pa.float64()),
        "code": ["NA", None],
        "tags": [["a", "b"], []],
        "n": pa.array([7, 8], pa.int64()),
    }), path)
    pairs = collect(parse_source(f"table:{path}"))
    assert len(pairs) == 2
    (first, ok), (second, missing) = pairs
    assert ok is None
    assert first.coords_raw == {"kind": "table", "lat": "48.8566", "lon": "2.3522"}
    assert first.provenance == {"code": "NA", "tags": '["a", "b"]', "n": "7"}
    assert missing.reason == "coords_missing" and second.provenance["code"] == ""


def test_jsonl_keeps_number_text_and_reports_bad_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"path": "a.jpg", "lat": 1.10, "lon": -0.50, "ok": true, "extra": {"k": 2}}\n'
                    "\n"
                    "not json\n"
                    '{"path": "b.jpg", "lat": "2", "lon": "3", "late_key": null}\n', encoding="utf-8")
    pairs = collect(parse_source(f"table:{path}"))
    assert [r.input_id for r, _ in pairs] == ["row0", "row1", "row2"]
    first, bad, last = pairs
    assert first[0].coords_raw == {"kind": "table", "lat": "1.10", "lon": "-0.50"}
    assert first[0].provenance == {"ok": "true", "extra": '{"k": 2}'}
    assert bad[1].reason == "row_malformed"
    assert last[1] is None and last[0].provenance == {"late_key": ""}


def test_ragged_csv_row_is_one_ledger_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("file,lat,lon\na.jpg,1,2\nb.jpg,1\nc.jpg,1,2,extra\nd.jpg,3,4\n", encoding="utf-8")
    pairs = collect(TableSource(f"table:{path}", str(path), {}))
    assert [(r.input_id, j.reason if j else None) for r, j in pairs] == [
        ("row0", None), ("row1", "row_malformed"), ("row2", "row_malformed"), ("row3", None)]


def test_truncated_gzip_table_ends_in_one_corrupt_record(tmp_path):
    data = gzip.compress(("file,lat,lon\n" + "a.jpg,1,2\n" * 50_000).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    pairs = collect(parse_source(f"table:{path}"))
    record, reject = pairs[-1]
    assert record.input_id == "cut.csv.gz#corrupt" and reject.reason == "table_corrupt"
    assert 0 < len(pairs) - 1 < 50_000
    # The rows before the cut are whole: only the corrupt record (and maybe one cut row) reject.
    assert sum(1 for _, j in pairs[:-1] if j is not None) <= 1
    assert_keys_safe_and_unique(pairs)


def test_explicit_columns(tmp_path):
    path = tmp_path / "custom.csv"
    path.write_text(f"photo,y,x,lat,ref\n{GPS / 'DSCN0027.jpg'},10,20,999,r1\n", encoding="utf-8")
    options = {"image_column": "photo", "lat_column": "y", "lon_column": "x", "id_column": "ref"}
    [(record, reject)] = collect(parse_source(f"table:{path}", options))
    assert reject is None and record.input_id == "r1"
    assert record.coords_raw == {"kind": "table", "lat": "10", "lon": "20"}
    assert record.provenance == {"lat": "999"}


@pytest.mark.parametrize("header, options, message", [
    ("image,lat,latitude,lon", {}, "several latitude columns ['lat', 'latitude']"),
    ("image,lat,east", {}, "no longitude column"),
    ("picture,lat,lon", {}, "no image column"),
    ("image,url,lat,lon", {}, "several image columns"),
    ("image,lat,lon", {"lat_column": "y"}, "--lat-column 'y' is not a column"),
    ("image,lat,lon", {"id_column": "ref"}, "--id-column 'ref' is not a column"),
    ("image,url,lat,lon", {}, "name the right one with --image-column"),
    ("image,lat,lon,lat", {}, "column names repeat"),
])
def test_bad_columns_stop_before_the_run(tmp_path, header, options, message):
    path = tmp_path / "t.csv"
    path.write_text(header + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match="t.csv") as info:
        parse_source(f"table:{path}", options).check()
    assert message in str(info.value)
    assert header.split(",")[0] in str(info.value)  # names the columns it found


def test_bad_table_arguments(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        parse_source(f"table:{tmp_path / 'none.csv'}").check()
    (tmp_path / "t.xlsx").write_bytes(b"x")
    with pytest.raises(SourceError, match="format"):
        parse_source(f"table:{tmp_path / 't.xlsx'}").check()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="cannot read parquet table"):
        parse_source(f"table:{tmp_path / 'bad.parquet'}").check()
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match="empty"):
        parse_source(f"table:{tmp_path / 'empty.csv'}").check()
    with pytest.raises(SourceError, match="unknown --table-format"):
        parse_source(f"table:{tmp_path / 'empty.csv'}", {"format": "xls"}).check()
    # An explicit format reads a file whose name says nothing.
    (tmp_path / "rows.txt").write_text("image\tlat\tlon\na.jpg\t1\t2\n")
    [(record, _)] = collect(parse_source(f"table:{tmp_path / 'rows.txt'}", {"format": "tsv"}))
    assert record.coords_raw["lon"] == "2"


# ---------------------------------------------------------------- wds


def write_shard(path: Path, samples):
    """Written the way img2dataset's writer does: TarWriter, KEY.jpg + KEY.json (+ KEY.txt)."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def img2dataset_sample(i, photo, **meta):
    key = f"{i:09d}"
    meta = {"url": f"https://example.org/{i}.jpg", "key": key, "status": "success",
            "error_message": None, "width": 640, **meta}
    return {"__key__": key, "jpg": (GPS / photo).read_bytes(), "json": json.dumps(meta, indent=4)}


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    good = [img2dataset_sample(0, "DSCN0010.jpg", lat=43.4674, lon=11.8851),
            img2dataset_sample(1, "DSCN0012.jpg", latitude="-22.5", longitude="17.0", country="NA"),
            img2dataset_sample(2, "DSCN0021.jpg", lat=None, lon=None),      # img2dataset's null
            {**img2dataset_sample(3, "DSCN0025.jpg", lat=1, lon=2), "txt": "a caption"},
            {"__key__": "000000004", "jpg": (GPS / "DSCN0027.jpg").read_bytes()},  # no json
            {"__key__": "000000005", "json": json.dumps({"lat": 1, "lon": 2})},   # no image
            {"__key__": "000000006", "png": b"\x89PNG fake", "json": "{not json"}]
    write_shard(folder / "00000.tar", good)
    write_shard(folder / "00001.tar", [img2dataset_sample(10 + i, "DSCN0029.jpg", lat=i, lon=i)
                                       for i in range(4)])
    (folder / "00000.parquet").write_bytes(b"img2dataset writes these beside the tars")
    return folder, good


def test_wds_samples_become_one_record_each(shards):
    folder, good = shards
    pairs = collect(parse_source(f"wds:{folder}/{{00000..00001}}.tar"))
    assert len(pairs) == len(good) + 4
    assert_keys_safe_and_unique(pairs)
    got = by_id(pairs)

    record, reject = got["00000.tar/000000000"]
    assert reject is None
    assert record.image_bytes == (GPS / "DSCN0010.jpg").read_bytes() and record.image_path is None
    assert record.coords_raw == {"kind": "given", "lat": 43.4674, "lon": 11.8851}
    assert record.provenance == {"url": "https://example.org/0.jpg", "key": "000000000",
                                 "status": "success", "error_message": "", "width": "640"}

    record, reject = got["00000.tar/000000001"]
    assert reject is None and record.coords_raw["lat"] == "-22.5"
    assert record.provenance["country"] == "NA"
    assert got["00000.tar/000000002"][1].reason == "coords_missing"
    assert got["00000.tar/000000003"][0].provenance["txt"] == "a caption"
    assert got["00000.tar/000000004"][1].reason == "coords_missing"
    assert got["00000.tar/000000005"][1].reason == "image_missing"
    record, reject = got["00000.tar/000000006"]
    assert reject.reason == "coords_missing" and "cannot be parsed" in reject.detail
    assert record.image_bytes == b"\x89PNG fake"
    assert sum(1 for r in got if r.startswith("00001.tar/")) == 4


def test_wds_glob_skips_img2dataset_side_files_and_options_name_keys(shards, tmp_path):
    folder, _ = shards
    assert len(list(WdsSource("wds:x", f"{folder}/*", {}).units())) == 2
    write_shard(tmp_path / "gps.tar", [{"__key__": "k", "jpg": b"\xff\xd8",
                                        "json": json.dumps({"gps_lat": 5, "gps_lon": 6, "lat": 0})}])
    [(record, reject)] = collect(WdsSource("wds:y", str(tmp_path / "gps.tar"),
                                           {"lat_column": "gps_lat", "lon_column": "gps_lon"}))
    assert reject is None and record.coords_raw == {"kind": "given", "lat": 5, "lon": 6}
    assert record.input_id == "gps.tar/k" and record.provenance == {"lat": "0"}


def member_offsets(path: Path):
    """(name, header offset, data offset, size) of each member."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["inside_data", "at_member_boundary", "inside_header",
                                 "inside_json"])
def test_truncated_shard_keeps_samples_before_the_cut(shards, tmp_path, cut):
    folder, _ = shards
    whole = (folder / "00001.tar").read_bytes()
    members = member_offsets(folder / "00001.tar")
    third_jpg = next(m for m in members if m[0] == "000000012.jpg")
    second_json = next(m for m in members if m[0] == "000000011.json")
    at = {"inside_data": third_jpg[2] + 100,          # tarfile raises "unexpected end of data"
          "at_member_boundary": third_jpg[1],         # tarfile stops quietly here
          "inside_header": third_jpg[1] + 200,        # ... and here
          "inside_json": second_json[2] + 10}[cut]    # sample 11 has its jpg, half its json
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(whole[:at])
    pairs = collect(parse_source(f"wds:{cut_path}"))
    ids = [r.input_id for r, _ in pairs]
    record, reject = pairs[-1]
    assert record.input_id == "cut.tar#corrupt" and reject.reason == "shard_corrupt"
    # The sample being grouped when the shard broke may be incomplete (here it is whole, but the
    # reader cannot know): it goes into the corrupt record, which names it.
    assert ids[:-1] == ["cut.tar/000000010"]
    assert "1 samples read" in reject.detail and "sample 000000011 may be incomplete" in reject.detail
    if cut in ("inside_data", "inside_json"):
        assert "unexpected end of data" in reject.detail and str(cut_path) in reject.detail
    assert all(j is None for _, j in pairs[:-1])
    assert_keys_safe_and_unique(pairs)


def test_unreadable_and_compressed_shards(shards, tmp_path):
    folder, _ = shards
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
    [(record, reject)] = collect(parse_source(f"wds:{tmp_path / 'junk.tar'}"))
    assert reject.reason == "shard_corrupt" and record.input_id == "junk.tar#corrupt"

    data = gzip.compress((folder / "00001.tar").read_bytes())
    (tmp_path / "z.tar.gz").write_bytes(data)
    assert [j for _, j in collect(parse_source(f"wds:{tmp_path / 'z.tar.gz'}"))] == [None] * 4
    (tmp_path / "zcut.tar.gz").write_bytes(data[: len(data) // 2])
    pairs = collect(parse_source(f"wds:{tmp_path / 'zcut.tar.gz'}"))
    assert pairs[-1][1].reason == "shard_corrupt" and "EOFError" in pairs[-1][1].detail


def test_wds_pattern_must_match(shards, tmp_path):
    folder, _ = shards
    with pytest.raises(SourceError, match="matches no tar shard"):
        parse_source(f"wds:{tmp_path}/none-*.tar").check()
    with pytest.raises(SourceError, match="only non-tar files"):
        parse_source(f"wds:{folder}/*.parquet").check()
    with pytest.raises(SourceError, match="1 shard"):
        parse_source(f"wds:{folder}/{{00000..00002}}.tar").check()


def test_same_shard_name_in_two_folders_keeps_ids_apart(tmp_path):
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        write_shard(tmp_path / part / "00000.tar", [img2dataset_sample(0, "DSCN0038.jpg", lat=1, lon=2)])
    pairs = collect(parse_source(f"wds:{tmp_path}/*/00000.tar"))
    assert sorted(r.input_id for r, _ in pairs) == ["a/00000.tar/000000000", "b/00000.tar/000000000"]
    assert_keys_safe_and_unique(pairs)


def test_sources_and_units_pickle(shards, tmp_path):
    # Beam ships the source and its units to workers.
    import pickle
    folder, _ = shards
    path = tmp_path / "t.csv"
    write_table(path, "csv", HEADER, [("a", "x.jpg", "1", "2", "NA")])
    for spec in (f"table:{path}", f"wds:{folder}/*.tar"):
        source = pickle.loads(pickle.dumps(parse_source(spec, {"lat_column": None})))
        units = pickle.loads(pickle.dumps(list(source.units())))
        assert [r.key for u in units for r, _ in source.records(u)] == \
            [r.key for r, _ in collect(parse_source(spec))]


def test_exif_units_are_batches_that_cover_every_photo_once(exif_samples, monkeypatch):
    from pipeline.io.sources import exif as exif_module

    whole = [r.key for r, _ in collect(parse_source(f"exif:{exif_samples}", {}))]
    monkeypatch.setattr(exif_module, "UNITS_WANTED", 4)
    source = parse_source(f"exif:{exif_samples}", {})
    units = list(source.units())
    assert len(units) == 4 and all(isinstance(u, tuple) for u in units)
    assert max(map(len, units)) - min(map(len, units)) <= len(units[0])  # even batches, last one smaller
    keys = [r.key for u in units for r, _ in source.records(u)]
    assert keys == whole and len(keys) == len(set(keys)) > 30
    monkeypatch.setattr(exif_module, "MAX_PER_UNIT", 5)
    assert max(map(len, source.units())) == 5


# ---------------------------------------------------------------- issue 17: no silent loss in tables


def _csv_lines(n: int) -> list[str]:
    return [f"p{i}.jpg,{i % 80},{i % 170},note {i}" for i in range(1, n + 1)]


def test_an_unclosed_quote_loses_no_line(tmp_path):
    """Row 5 of 20 opens a quote that never closes: before, rows 6-20 folded into its last cell and
    the table counted 5 inputs. Now row 5 is one ledger row and rows 6-20 are rows again."""
    rows = _csv_lines(20)
    rows[4] = 'p5.jpg,5,5,"an unclosed note'
    path = tmp_path / "quote.csv"
    path.write_text("image,lat,lon,note\n" + "\n".join(rows) + "\n", encoding="utf-8")
    pairs = collect(parse_source(f"table:{path}"))
    assert len(pairs) == 20
    rejected = [(r.input_id, j.reason, j.detail) for r, j in pairs if j is not None]
    assert len(rejected) == 1 and rejected[0][1] == "row_malformed" and "line 6" in rejected[0][2]
    assert [r.coords_raw["lat"] for r, j in pairs if j is None][4:] == [str(i % 80) for i in range(6, 21)]
    assert_keys_safe_and_unique(pairs)


def test_a_cell_over_several_lines_is_a_ledger_row_naming_them(tmp_path):
    """A quote that closes lines later joins those lines into one row: one ledger row names them."""
    rows = _csv_lines(10)
    rows[2] = 'p3.jpg,3,3,"opens here'
    rows[5] = 'closes here"'
    path = tmp_path / "joined.csv"
    path.write_text("image,lat,lon,note\n" + "\n".join(rows) + "\n", encoding="utf-8")
    pairs = collect(parse_source(f"table:{path}"))
    joined = [j for _, j in pairs if j is not None]
    assert [j.reason for j in joined] == ["row_multiline"]
    assert "lines 4-7" in joined[0].detail
    assert len(pairs) == 10 - 3  # lines 4-7 are one row, and the ledger row says which


@pytest.mark.parametrize("n_rows", [20, 300, 5000])
def test_a_bad_byte_is_one_ledger_row_at_every_size(tmp_path, n_rows):
    """Before, a bad byte in a large file lost every row after its 8 KB chunk (one table_corrupt
    row) while in a small file it stopped the run: now it is one row_encoding row at any size."""
    bad = n_rows * 5 // 6
    body = "\n".join(_csv_lines(n_rows)).encode("utf-8").split(b"\n")
    body[bad - 1] = body[bad - 1].replace(b"note", b"caf\xe9")
    path = tmp_path / "latin.csv"
    path.write_bytes(b"image,lat,lon,note\n" + b"\n".join(body) + b"\n")
    pairs = collect(parse_source(f"table:{path}"))
    assert len(pairs) == n_rows
    [(record, reject)] = [(r, j) for r, j in pairs if j is not None]
    assert reject.reason == "row_encoding" and "--encoding latin-1" in reject.detail
    assert f"line {bad + 1}" in reject.detail
    # Named, the encoding reads every row.
    pairs = collect(parse_source(f"table:{path}", {"encoding": "latin-1"}))
    assert len(pairs) == n_rows and all(j is None for _, j in pairs)
    assert pairs[bad - 1][0].provenance["note"] == "café " + str(bad)


def test_a_bad_byte_in_the_header_or_a_bad_encoding_stops_the_run(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"image,lat,lon,not\xe9\na.jpg,1,2,x\n")
    with pytest.raises(SourceError, match="--encoding latin-1"):
        parse_source(f"table:{path}").check()
    with pytest.raises(SourceError, match="unknown --encoding"):
        parse_source(f"table:{path}", {"encoding": "klingon"}).check()
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(b'{"image": "a.jpg", "lat": 1, "lon": 2}\n{"image": "caf\xe9.jpg", "lat": 1, "lon": 2}\n')
    assert [j.reason if j else None for _, j in collect(parse_source(f"table:{jsonl}"))] == [None, "row_encoding"]


# ---------------------------------------------------------------- issue 17: no silent skip in folders


def test_every_file_named_like_a_photo_is_an_input(tmp_path):
    """Before, exif:DIR ignored .heic/.heif/.avif/.gif files, dangling and looping symlinks and
    symlinked folders without a word."""
    from PIL import Image

    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    shutil.copy(GPS / "DSCN0010.jpg", root / "a.jpg")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(root / "b.gif")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(root / "c.AVIF", "AVIF")
    (root / "d.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "e.HEIF").write_bytes(b"\x00\x00\x00\x18ftypmif1")
    (root / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    shutil.copy(GPS / "DSCN0012.jpg", elsewhere / "f.jpg")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "linked" / "up").symlink_to(root, target_is_directory=True)  # a loop back: walked once
    (root / "notes.txt").write_text("not a photo, not an input")
    got = {r.input_id: (j.reason if j else None) for r, j in collect(parse_source(f"exif:{root}"))}
    assert got == {"a.jpg": None, "b.gif": None, "c.AVIF": None, "d.heic": "unsupported_format",
                   "e.HEIF": "unsupported_format", "gone.jpg": "broken_symlink", "loop.jpg": "symlink_loop",
                   "linked/f.jpg": None}
    details = {r.input_id: j.detail for r, j in collect(parse_source(f"exif:{root}")) if j}
    assert details["d.heic"].startswith("HEIC") and details["e.HEIF"].startswith("HEIF")


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists every folder: no unreadable one can be made")
def test_an_unreadable_folder_is_a_ledger_row(tmp_path):
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    shutil.copy(GPS / "DSCN0010.jpg", root / "locked" / "a.jpg")
    (root / "locked").chmod(0)
    try:
        got = {r.input_id: j.reason for r, j in collect(parse_source(f"exif:{root}"))}
    finally:
        (root / "locked").chmod(0o755)
    assert got == {"locked": "folder_unreadable"}
