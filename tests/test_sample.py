"""Sample set generator: real EXIF GPS, every continent, deterministic bytes, labelled bad files."""
from __future__ import annotations

import argparse
import itertools
import json

import imagehash
import pytest
from PIL import ExifTags, Image

from pipeline.commands import sample as sample_command
from pipeline.stages.geocode import GeocodeStage
from pipeline.core.record import Record
from pipeline.io.sample_set import BAD_KINDS, CONTINENTS, EXPECTED_FILE, write_samples

N = 12


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    return out, write_samples(str(out), N, seed=0)


def read_gps(path):
    """Signed decimal degrees from the GPS IFD, read back with Pillow, or None."""
    with Image.open(path) as im:
        gps = im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    if not gps:
        return None
    def axis(tag, ref, negative):
        d, m, s = (float(v) for v in gps[tag])
        return (-1 if gps[ref] == negative else 1) * (d + m / 60 + s / 3600)
    return (axis(ExifTags.GPS.GPSLatitude, ExifTags.GPS.GPSLatitudeRef, "S"),
            axis(ExifTags.GPS.GPSLongitude, ExifTags.GPS.GPSLongitudeRef, "W"))


def test_entries_and_expected_jsonl(samples):
    out, entries = samples
    assert [e["expected"] for e in entries] == ["ok"] * N + list(BAD_KINDS)
    lines = (out / EXPECTED_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == entries
    assert sorted(p.name for p in out.iterdir()) == sorted([e["file"] for e in entries] + [EXPECTED_FILE])


def test_good_files_carry_the_written_gps(samples):
    out, entries = samples
    for e in entries[:N]:
        lat, lon = read_gps(out / e["file"])
        assert abs(lat - e["lat"]) < 1e-4 and abs(lon - e["lon"]) < 1e-4
        with Image.open(out / e["file"]) as im:
            im.load()
            assert im.format == "JPEG" and 320 <= min(im.size) and max(im.size) <= 640


def test_good_files_cover_every_continent_near_a_place(samples):
    _, entries = samples
    stage = GeocodeStage()
    outs = stage.process_batch([Record(key=e["file"], source="t", input_id=e["file"], lat=e["lat"],
                                       lon=e["lon"]) for e in entries[:N]])
    for e, out in zip(entries, outs):
        assert isinstance(out, Record), (e, out)
        assert out.location["continent"] == e["continent"]
        assert out.location["place_distance_km"] < 1.0  # jitter < 1 km from a real place
    assert {o.location["continent"] for o in outs} == set(CONTINENTS)


def test_pictures_are_not_near_duplicates(samples):
    out, entries = samples
    hashes = [imagehash.phash(Image.open(out / e["file"])) for e in entries[:N]]
    assert min(a - b for a, b in itertools.combinations(hashes, 2)) >= 10


def test_same_seed_same_bytes_other_seed_other_files(samples, tmp_path):
    out, entries = samples
    write_samples(str(tmp_path / "again"), N, seed=0)
    for name in [e["file"] for e in entries] + [EXPECTED_FILE]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    other = write_samples(str(tmp_path / "other"), N, seed=1)
    assert [e["file"] for e in other] != [e["file"] for e in entries]


def test_bad_files_are_what_they_say(samples):
    out, entries = samples
    bad = {e["expected"]: out / e["file"] for e in entries[N:]}
    with Image.open(bad["no_gps"]) as im:
        im.load()  # a good picture ...
        assert im.getexif() and read_gps(bad["no_gps"]) is None  # ... with EXIF but no GPS
    assert read_gps(bad["null_island"]) == (0.0, 0.0)
    truncated = next(e for e in entries if e["expected"] == "truncated")
    lat, lon = read_gps(bad["truncated"])  # the GPS block survives the cut ...
    assert abs(lat - truncated["lat"]) < 1e-4 and abs(lon - truncated["lon"]) < 1e-4
    with pytest.raises(OSError):  # ... the picture does not
        with Image.open(bad["truncated"]) as im:
            im.load()
    assert bad["empty"].stat().st_size == 0


def test_sample_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mg-geo")
    sample_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "--out", str(tmp_path / "s"), "--n", "6", "--seed", "2"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "s").glob("*.jpg"))) == 6 + len(BAD_KINDS)
    assert "6 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--out", str(tmp_path), "--n", "0"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = parser.parse_args(["sample", "--out", str(blocker), "--n", "1"])
    assert args.func(args) == 2
