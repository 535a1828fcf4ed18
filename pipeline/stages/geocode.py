"""geocode stage: lat/lon -> record.location (continent, country, admin regions, city).

City and admin labels are reverse_geocoder's nearest GeoNames place, exactly as OSV-5M labelled
its images. The country comes from Natural Earth polygons instead, because the nearest place is
often across a border (see pipeline/geo/polygons.py); both codes are kept when they disagree.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pipeline.geo.places import PlaceTable, haversine_km, load_places
from pipeline.geo.polygons import CountryIndex, countries_by_code, load_country_index
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome, Stage

DEFAULT_MAX_PLACE_KM = 50.0
DEFAULT_COAST_KM = 25.0


class GeocodeStage(Stage):
    name = "geocode"
    batch_size = 256  # one KD-tree query and one polygon query per batch

    def __init__(self, max_place_km: float = DEFAULT_MAX_PLACE_KM, coast_km: float = DEFAULT_COAST_KM):
        if not max_place_km > 0 or coast_km < 0:
            raise ValueError(f"max_place_km must be > 0 and coast_km >= 0, got {max_place_km}, {coast_km}")
        self.max_place_km = float(max_place_km)
        self.coast_km = float(coast_km)
        self._places: Optional[PlaceTable] = None
        self._countries: Optional[CountryIndex] = None
        self._by_code: Optional[dict] = None

    def __getstate__(self):
        # Only the options travel with the pipeline graph; each worker loads the tables in setup().
        return {"max_place_km": self.max_place_km, "coast_km": self.coast_km}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self) -> None:
        # The loaders are cached per process, so many stage instances share one copy.
        if self._places is None:
            self._places = load_places()
            self._countries = load_country_index()
            self._by_code = countries_by_code()

    def process(self, record: Record) -> Outcome:
        self.setup()
        return self._geocode([record])[0]

    def process_batch(self, records: list[Record]) -> list[Outcome]:
        self.setup()
        try:
            return self._geocode(records)
        except Exception:  # noqa: BLE001 - redo one by one so only the record at fault is rejected
            return [self.safe_process(r) for r in records]

    def _geocode(self, records: list[Record]) -> list[Outcome]:
        outcomes: list[Outcome] = [Reject("no_coordinates", "geocode got a record without valid lat/lon")
                                   for _ in records]
        coords = [_coords(r) for r in records]
        valid = [i for i, c in enumerate(coords) if c is not None]
        if not valid:
            return outcomes
        lats = np.array([coords[i][0] for i in valid], dtype=np.float64)
        lons = np.array([coords[i][1] for i in valid], dtype=np.float64)

        place_idx = self._places.nearest(lats, lons)
        rows = self._places.rows
        place_lat = self._places.coords[place_idx, 0]
        place_lon = self._places.coords[place_idx, 1]
        place_km = haversine_km(lats, lons, place_lat, place_lon)
        located = self._countries.locate(lats, lons, self.coast_km)

        for j, i in enumerate(valid):
            place = rows[place_idx[j]]
            poly = int(located.index[j])
            country = self._countries.countries[poly] if poly >= 0 else None
            if country is not None and country.code:
                source = "polygon" if located.inside[j] else "polygon_nearby"
            else:
                # No polygon near, or a NE unit without any code (Bir Tawil, Spratly Is.).
                if country is None and place_km[j] > self.max_place_km:
                    outcomes[i] = Reject("far_from_place", (
                        f"({lats[j]:.5f}, {lons[j]:.5f}): nearest place {place.name} ({place.cc}) is "
                        f"{place_km[j]:.0f} km away (max {self.max_place_km:g} km) and no country "
                        f"polygon is within {self.coast_km:g} km"))
                    continue
                source = "nearest_place"
                country = self._by_code.get(place.cc)
            outcomes[i] = records[i].replace(location=_location(place, float(place_km[j]), country, source))
        return outcomes


def _coords(record: Record) -> Optional[tuple[float, float]]:
    """The validated coordinates, or None if validate let something unusable through."""
    try:
        lat, lon = float(record.lat), float(record.lon)
    except (TypeError, ValueError):
        return None
    if math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180:
        return lat, lon
    return None


def _location(place, place_km: float, country, source: str) -> dict:
    code = country.code if (country is not None and source != "nearest_place") else place.cc
    return {
        "continent": country.continent if country else "",
        "country_code": code,
        "country": country.name if country else "",
        "sovereign_code": country.sovereign_code if country else "",
        "sovereign": country.sovereign if country else "",
        "admin1": place.admin1,
        "admin2": place.admin2,
        "city": place.name,
        "city_id": f"{place.name}_{place.admin2}_{place.admin1}_{place.cc}",
        "place_lat": place.lat,
        "place_lon": place.lon,
        "place_distance_km": round(place_km, 3),
        "nearest_country_code": place.cc,
        "country_source": source,
        "country_disagreement": code != place.cc,
    }
