"""`mg-geo download` + `mg-geo build`: a URL table served from a loopback HTTP server (real photos,
a 404, an answer slower than --timeout, text served as image/jpeg, a redirect) ends with every row
as exactly one sample or one ledger row, each failure with its own reason.

One download (through the CLI, two shards, two processes) and one build (through the exact command
the download prints) are shared by the tests of this module."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from http_photo_server import PhotoServer, photo, redirect, status, text_as_jpeg
from pipeline.cli import main
from pipeline.io.download import (AUTO_SHARDS, MAX_AUTO_SHARD_ROWS, failure_reason, remove_previous_shards,
                               shard_size, sibling_parquet, write_url_list)
from pipeline.io.sources import parse_source

TUSCANY = (43.4667, 11.8833)
GPS_PHOTOS = ["DSCN0010", "DSCN0012", "DSCN0021", "DSCN0025", "DSCN0027", "DSCN0029", "DSCN0038", "DSCN0040"]
# id -> (served path, lat, lon, country, expected outcome)
ROWS = {
    **{f"tuscany-{i}": (f"/gps/{name}.jpg", f"{TUSCANY[0] + i / 1000:.4f}", f"{TUSCANY[1]:.4f}", "IT", "ok")
       for i, name in enumerate(GPS_PHOTOS)},
    "moved": ("/moved/DSCN0042.jpg", "43.4700", "11.8800", "IT", "ok"),          # 302 -> a photo
    "turned": ("/orientation/landscape_6.jpg", "48.8566", "2.3522", "FR", "ok"),  # EXIF orientation 6
    "windhoek": ("/misc/no_exif.jpg", "-22.5609", "17.0658", "NA", "ok"),       # Namibia: "NA" is text
    "gone": ("/gone.jpg", "40.4168", "-3.7038", "ES", "http_404"),
    "slow": ("/slow.jpg", "41.9028", "12.4964", "IT", "download_timeout"),
    "error-page": ("/error-page.jpg", "52.5200", "13.4050", "DE", "not_image"),
    "no-lat": ("/orientation/portrait_1.jpg", "", "139.6917", "JP", "coords_missing"),  # never fetched
    "no-url": ("", "35.6895", "139.6917", "JP", "image_missing"),
}
SAMPLES_PER_SHARD = 8  # 16 rows: two shards, so the printed pattern is a brace range
TIMEOUT_S = 2  # generous: a loaded 2-core CI box must not time out the real photos


@pytest.fixture(scope="module")
def run(tmp_path_factory, exif_samples):
    root = tmp_path_factory.mktemp("download")
    routes = {"/moved/DSCN0042.jpg": redirect("/gps/DSCN0042.jpg"),
              "/gone.jpg": status(404),
              # slower than the client's timeout (the server drops it when it stops)
              "/slow.jpg": photo(exif_samples / "misc" / "Canon_40D.jpg", delay_s=4 * TIMEOUT_S),
              "/error-page.jpg": text_as_jpeg("<html><body>503 Service Unavailable</body></html>\n")}
    folders = {f"/{d}/": exif_samples / d for d in ("gps", "orientation", "misc")}
    table = root / "photos.csv"
    dl, corpus = root / "dl", root / "dl-corpus"  # the suggested --out
    with PhotoServer(routes, folders) as server:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            # "key" is a name img2dataset reserves: it must reach the sample as table_key.
            writer.writerow(["id", "image_url", "latitude", "lng", "country", "key"])
            for row_id, (path, lat, lon, country, _) in ROWS.items():
                writer.writerow([row_id, server.url(path) if path else "", lat, lon, country, f"k-{row_id}"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["download", "--source", f"table:{table}", "--out", str(dl), "--processes", "2",
                       "--threads", "8", "--timeout", str(TIMEOUT_S), "--samples-per-shard",
                       str(SAMPLES_PER_SHARD)])
        hits = server.hits
    assert rc == 0, out.getvalue()
    printed = out.getvalue()
    next_line = next(line for line in printed.splitlines() if line.startswith("next: "))
    build_argv = shlex.split(next_line[len("next: "):])
    assert build_argv[:2] == ["mg-geo", "build"]
    build_argv = build_argv[1:]
    assert build_argv[build_argv.index("--out") + 1] == str(corpus)
    assert main(build_argv) == 0
    return {"root": root, "dl": dl, "corpus": corpus, "hits": hits, "printed": printed,
            "build_argv": build_argv, "report": json.loads((corpus / "report.json").read_text())}


def _row_ids(dl: Path) -> dict:
    """build input id (shard/KEY) -> table id, from img2dataset's own per-shard parquet."""
    ids = {}
    for parquet in sorted(dl.glob("[0-9]*.parquet")):
        for row in pq.read_table(parquet, columns=["key", "id"]).to_pylist():
            ids[f"{parquet.stem}.tar/{row['key']}"] = row["id"]
    return ids


def _outcomes(run) -> dict:
    """table id -> list of outcomes ("ok" or the ledger reason) after download + build."""
    ids = _row_ids(run["dl"])
    outcome: dict = {}
    for r in pq.read_table(run["corpus"] / "manifest.parquet").to_pylist():
        outcome.setdefault(ids[r["input_id"]], []).append("ok")
    for r in pq.read_table(run["corpus"] / "rejected.parquet").to_pylist():
        outcome.setdefault(ids[r["input_id"]], []).append(r["reason"])
    return outcome


def _samples(run) -> dict:
    """table id -> (sample json, jpg bytes) for every sample of the built corpus."""
    out = {}
    for shard in sorted((run["corpus"] / "meta").rglob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            out[meta["provenance"]["id"]] = (meta, sample["jpg"])
    return out


def test_every_url_ends_as_exactly_one_sample_or_one_ledger_row(run):
    report = run["report"]
    outcome = _outcomes(run)
    assert sorted(outcome) == sorted(ROWS)  # every row of the table, none invented
    assert all(len(v) == 1 for v in outcome.values()), outcome
    manifest = pq.read_table(run["corpus"] / "manifest.parquet").num_rows
    ledger = pq.read_table(run["corpus"] / "rejected.parquet").num_rows
    assert manifest + ledger == len(ROWS) == report["inputs_total"]
    assert report["conservation_ok"] and all(v["ok"] for v in report["conservation"].values())
    # img2dataset wrote one parquet row per table row, and our download summary said so
    printed = run["printed"]
    summary = json.loads(printed[printed.index("{"):printed.index("\nnext: ")])
    assert summary["rows"] == len(ROWS)
    assert summary["downloaded"] + sum(summary["failed"].values()) == len(ROWS)


def test_each_failure_gets_its_own_reason(run):
    outcome = {row_id: reasons[0] for row_id, reasons in _outcomes(run).items()}
    assert outcome == {row_id: row[4] for row_id, row in ROWS.items()}
    ledger = {r["reason"]: r for r in pq.read_table(run["corpus"] / "rejected.parquet").to_pylist()}
    assert "/gone.jpg" in ledger["http_404"]["detail"] and "404" in ledger["http_404"]["detail"]
    assert "/slow.jpg" in ledger["download_timeout"]["detail"]


def test_redirect_is_followed_and_rows_without_coordinates_are_not_fetched(run):
    hits = run["hits"]
    assert hits["/moved/DSCN0042.jpg"] == 1 and hits["/gps/DSCN0042.jpg"] == 1
    assert hits["/orientation/portrait_1.jpg"] == 0  # coords_missing: rejected before any request
    # nothing fetched but the table's URLs (and the redirect's target), each once (--retries 0)
    fetched = {path for path, _, _, _, want in ROWS.values() if path and want != "coords_missing"}
    assert set(hits) == fetched | {"/gps/DSCN0042.jpg"} and set(hits.values()) == {1}


def test_original_bytes_are_kept_and_our_image_stage_applies_the_orientation(run, exif_samples):
    served = (exif_samples / "orientation" / "landscape_6.jpg").read_bytes()
    assert Image.open(io.BytesIO(served)).size == (450, 600)  # stored sideways, tag 6 says turn it
    ids = {v: k for k, v in _row_ids(run["dl"]).items()}
    shard, key = ids["turned"].split("/")
    with tarfile.open(run["dl"] / shard) as tar:
        downloaded = tar.extractfile(f"{key}.jpg").read()
    assert downloaded == served  # img2dataset did not re-encode (EXIF and orientation tag intact)
    meta, jpg = _samples(run)["turned"]
    assert meta["image"]["sha256"] == hashlib.sha256(served).hexdigest()
    assert meta["image"]["orientation"] == 6
    upright = Image.open(io.BytesIO(jpg))
    assert upright.size == (600, 450) and not upright.getexif()  # turned upright, metadata gone
    reference = np.asarray(Image.open(exif_samples / "orientation" / "landscape_1.jpg").convert("RGB"), float)
    assert np.abs(np.asarray(upright.convert("RGB"), float) - reference).mean() < 8


def test_coordinates_and_id_columns_reach_the_sample_json_as_text(run):
    samples = _samples(run)
    assert sorted(samples) == sorted(k for k, row in ROWS.items() if row[4] == "ok")
    for row_id, (meta, _) in samples.items():
        path, lat, lon, country, _ = ROWS[row_id]
        assert (meta["lat"], meta["lon"]) == (float(lat), float(lon))
        prov = meta["provenance"]
        assert prov["id"] == row_id and prov["country"] == country and prov["table_key"] == f"k-{row_id}"
        assert prov["url"].endswith(path)
    namibia, _ = samples["windhoek"]
    assert namibia["provenance"]["country"] == "NA" and namibia["location"]["country_code"] == "NA"


def test_printed_command_names_every_shard(run):
    pattern = run["build_argv"][run["build_argv"].index("--source") + 1]
    assert pattern == f"wds:{run['dl']}/{{00000..00001}}.tar"
    assert sorted(p.name for p in run["dl"].glob("*.tar")) == ["00000.tar", "00001.tar"]


# --- pieces, without img2dataset --------------------------------------------------------------------

@pytest.mark.parametrize("status_, message, skip, reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", None, "http_503"),
    ("failed_to_download", "timed out", None, "download_timeout"),
    ("failed_to_download", "<urlopen error timed out>", None, "download_timeout"),
    ("failed_to_download", "The read operation timed out", None, "download_timeout"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", None, "connection_refused"),
    ("failed_to_download", "unknown url type: 'gs'", None, "url_unsupported"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", None, "robots_disallowed"),
    ("failed_to_resize", "Image decoding error", None, "download_decode_failed"),
    ("failed_to_download", "unknown url type: ''", "coords_missing: row 3: empty", "coords_missing"),
    ("failed_to_download", "something new", None, "download_failed"),
])
def test_failure_reasons(status_, message, skip, reason):
    assert failure_reason(status_, message, skip)[0] == reason


def test_sibling_parquet():
    assert sibling_parquet("/dl/00003.tar") == "/dl/00003.parquet"
    assert sibling_parquet("gs://b/dl/00003.tar.gz") == "gs://b/dl/00003.parquet"
    assert sibling_parquet("/dl/notes.txt") is None


def test_url_list_keeps_every_column_as_text(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("key,url,lat,lon,cc,status\nNA,http://h/a.jpg,-22.5,17.0,NA,x\n"
                     "b,photos/b.jpg,1.5,2.5,NA,y\n,,,,,\nragged,row\n", encoding="utf-8")
    write_url_list(parse_source(f"table:{table}"), str(tmp_path / "urls.parquet"))
    rows = pq.read_table(tmp_path / "urls.parquet").to_pylist()
    assert rows[0] == {"url": "http://h/a.jpg", "lat": "-22.5", "lon": "17.0", "download_skip": "",
                       "table_key": "NA", "cc": "NA", "table_status": "x"}
    assert rows[1]["url"] == (tmp_path / "photos" / "b.jpg").as_uri()  # a local path, as a file URL
    assert rows[2]["url"] == "" and rows[2]["download_skip"].startswith("image_missing: ")
    assert rows[3]["url"] == "" and rows[3]["download_skip"].startswith("row_malformed: ")


def test_overwrite_removes_only_img2dataset_files(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "notes.txt", "mine.parquet"):
        (tmp_path / name).write_text("x")
    assert remove_previous_shards(str(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.parquet", "notes.txt"]


def test_download_refuses_a_source_that_is_not_a_table(tmp_path, capsys):
    assert main(["download", "--source", f"exif:{tmp_path}", "--out", str(tmp_path / "dl")]) == 2
    assert "table:FILE" in capsys.readouterr().err


def test_an_unreadable_failure_list_of_a_finished_shard_is_one_ledger_row(tmp_path):
    from pipeline.io.sources.wds import WdsSource

    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "000000000", "jpg": b"\xff\xd8", "json": b'{"lat": 1, "lon": 2}'})
    (tmp_path / "00000.parquet").write_bytes(b"cut short")
    source = WdsSource("wds:x", str(tmp_path / "00000.tar"), {})
    assert [reject for _, reject in source.records(str(tmp_path / "00000.tar"))] == [None]  # not img2dataset's
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset's mark of a finished shard
    rejects = [reject for _, reject in source.records(str(tmp_path / "00000.tar"))]
    assert rejects[0] is None and rejects[1].reason == "download_parquet_corrupt" and len(rejects) == 2


def test_build_with_download_fetches_url_tables_itself(tmp_path, exif_samples):
    """`mg-geo build --download`: the same accounting as download-then-build, in one command, and a
    rerun resumes from OUT/_download without fetching again."""
    rows = {"ok": ("/gps/DSCN0010.jpg", "43.4667", "11.8833", "ok"),
            "gone": ("/gone.jpg", "40.4168", "-3.7038", "http_404"),
            "no-lat": ("/gps/DSCN0012.jpg", "", "11.88", "coords_missing")}
    table, out = tmp_path / "urls.csv", tmp_path / "corpus"
    with PhotoServer({"/gone.jpg": status(404)}, {"/gps/": exif_samples / "gps"}) as server:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "url", "lat", "lon"])
            for row_id, (path, lat, lon, _) in rows.items():
                writer.writerow([row_id, server.url(path), lat, lon])
        argv = ["build", "--source", f"table:{table}", "--out", str(out), "--download",
                "--download-timeout", str(TIMEOUT_S)]
        assert main(argv) == 0
        first_hits = server.hits
        assert first_hits["/gps/DSCN0010.jpg"] == 1 and "/gps/DSCN0012.jpg" not in first_hits
        assert main(argv) == 0
        assert server.hits == first_hits  # the rerun found the finished shards in OUT/_download
    ids = _row_ids(out / "_download" / "table-0")
    outcome = {ids[r["input_id"]]: "ok" for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    outcome.update({ids[r["input_id"]]: r["reason"] for r in pq.read_table(out / "rejected.parquet").to_pylist()})
    assert outcome == {row_id: want for row_id, (*_, want) in rows.items()}
    assert json.loads((out / "report.json").read_text())["conservation_ok"]


def test_shard_size_spreads_a_table_over_several_shards_unless_told():
    # One shard would mean one downloading process and one building worker.
    assert shard_size(2004) == 251 and -(-2004 // shard_size(2004)) == AUTO_SHARDS
    assert shard_size(20_000) == 2500
    assert shard_size(40) == 100  # tiny tables: one shard, not eight of five rows
    assert shard_size(10_000_000) == MAX_AUTO_SHARD_ROWS
    assert shard_size(2004, 50) == 50  # asked for: as asked
    assert shard_size(2004) == shard_size(2004)  # from the rows alone: a rerun resumes the same shards


def test_download_cuts_a_table_into_shards_by_default(tmp_path, exif_samples):
    """No --samples-per-shard: 240 rows -> 3 shards of 100, 100, 40, each a build unit."""
    table, dl = tmp_path / "urls.csv", tmp_path / "dl"
    with PhotoServer({}, {"/gps/": exif_samples / "gps"}) as server:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "url", "lat", "lon"])
            for i in range(240):
                writer.writerow([f"r{i}", server.url("/gps/DSCN0010.jpg"), "43.4667", "11.8833"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["download", "--source", f"table:{table}", "--out", str(dl), "--processes", "2",
                         "--threads", "8", "--timeout", str(TIMEOUT_S)]) == 0
    printed = out.getvalue()  # img2dataset's progress lines, then our summary, then "next: ..."
    summary = json.loads(printed[printed.index("\n{\n") + 1:printed.index("\nnext: ")])
    assert summary["downloaded"] == 240 and summary["wds_pattern"] == f"{dl}/{{00000..00002}}.tar"
    assert [len(pq.read_table(dl / f"{i:05d}.parquet")) for i in range(3)] == [100, 100, 40]


def _shard_contents(dl: Path) -> tuple[list, list]:
    """(sorted (member, sha256) of every shard, sorted (key, status, id) of every parquet row):
    what a download made, without the order img2dataset's threads finished in."""
    members = []
    for shard in sorted(dl.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):
                    data = json.dumps(json.loads(data), sort_keys=True).encode()
                members.append((shard.name, m.name, hashlib.sha256(data).hexdigest()))
    rows = [(p.name, r["key"], r["status"], r["id"]) for p in sorted(dl.glob("*.parquet"))
            for r in pq.read_table(p, columns=["key", "status", "id"]).to_pylist()]
    return sorted(members), sorted(rows)


def test_img2dataset_processes_download_every_row_in_a_fresh_process(tmp_path, exif_samples):
    """`mg-geo download` in a process of its own with img2dataset's 2 worker processes (its own
    process handling): every row is in a shard's parquet, the photos in the shards. Local paths:
    urllib fetches them as file:// URLs, one is missing."""
    from fresh_process import child_env, run_mg_geo

    table = tmp_path / "photos.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "lat", "lon"])
        for i, name in enumerate(GPS_PHOTOS):
            writer.writerow([name, exif_samples / "gps" / f"{name}.jpg", f"{TUSCANY[0] + i / 1000:.4f}", TUSCANY[1]])
        writer.writerow(["missing", tmp_path / "not-there.jpg", "43.0", "11.0"])
    dl = tmp_path / "dl"
    run_mg_geo(["download", "--source", f"table:{table}", "--image-column", "path", "--out", str(dl),
                "--processes", "2", "--threads", "4", "--samples-per-shard", "5"],
               child_env(NO_ALBUMENTATIONS_UPDATE="1"))
    members, rows = _shard_contents(dl)
    assert len(members) == 2 * len(GPS_PHOTOS) and len(rows) == len(GPS_PHOTOS) + 1
    assert [status for _, _, status, row_id in rows if row_id == "missing"] == ["failed_to_download"]


def test_a_url_table_downloads_by_default_and_no_download_keeps_the_table(tmp_path, exif_samples, capsys):
    """Before, `build --source table:urls.csv` without --download rejected every row
    (url_not_downloaded) and exited 0 with an empty corpus."""
    table = tmp_path / "urls.csv"
    with PhotoServer({}, {"/gps/": exif_samples / "gps"}) as server:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "url", "lat", "lon"])
            writer.writerow(["ok", server.url("/gps/DSCN0010.jpg"), "43.4667", "11.8833"])
        argv = ["build", "--source", f"table:{table}", "--download-timeout", str(TIMEOUT_S)]
        assert main([*argv, "--out", str(tmp_path / "auto")]) == 0
        assert server.hits["/gps/DSCN0010.jpg"] == 1
        assert "lists image URLs: downloading them" in capsys.readouterr().err
        assert [r["reason"] for r in pq.read_table(tmp_path / "auto" / "rejected.parquet").to_pylist()] == []
        assert main([*argv, "--out", str(tmp_path / "kept"), "--no-download"]) == 0
        assert server.hits["/gps/DSCN0010.jpg"] == 1
    assert [r["reason"] for r in pq.read_table(tmp_path / "kept" / "rejected.parquet").to_pylist()] == [
        "url_not_downloaded"]
