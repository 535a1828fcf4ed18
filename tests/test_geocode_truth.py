"""The truth the corpus' text claims: region and city always of the record's own country, bounded
distances, antimeridian twins alike, everyday names. Checked on generated border, coastal,
antimeridian and polar points (GWS15k's coordinates are not available offline)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.record import Record, Reject
from pipeline.geo.names import clean_region, country_name
from pipeline.geo.places import haversine_km, load_places
from pipeline.stages.geocode import GeocodeStage
from test_geocode import rec, stage  # noqa: F401 - the geocode stage fixture and a record maker


def loc_of(stage, lat, lon) -> dict:
    out = stage.process(rec(lat, lon))
    assert isinstance(out, Record), out
    return out.location


# Points a few km either side of land borders, on coasts, on the antimeridian and near the poles.
BORDER = [(42.30, -83.03), (42.97, -82.40), (48.58, 7.75), (48.57, 7.80), (47.56, 7.59), (46.20, 6.15),
          (32.54, -117.03), (32.52, -117.04), (31.75, -106.48), (31.69, -106.42), (45.03, -74.73),
          (49.00, -122.75), (50.87, 5.97), (51.44, 6.02), (41.90, 12.45), (43.73, 7.42),
          (-22.53, -55.73), (-25.60, -54.58), (1.45, 103.77), (1.35, 103.82), (35.1, -111.6)]
COASTAL = [(-22.995, -43.21), (36.85, -75.97), (43.29, 5.36), (-33.95, 18.38), (35.44, 139.65),
           (64.15, -21.95), (-41.29, 174.78), (21.30, -157.86), (53.55, 9.99), (55.95, -3.19)]
ANTIMERIDIAN = [(-16.8, -180.0), (-16.8, 180.0), (-16.8, 179.99), (-16.8, -179.99), (65.0, -180.0),
                (65.0, 180.0), (-18.1, 178.45), (51.8, -176.6), (-21.2, -175.2), (-13.8, -171.77)]
POLAR = [(-90.0, 0.0), (-90.0, 180.0), (-89.99, 139.0), (-77.85, 166.67), (-64.8, -64.05),
         (78.22, 15.65), (82.5, -62.3), (76.53, -68.7), (71.29, -156.79), (69.65, 18.96)]


def generated_points(n_random: int = 1500, seed: int = 11) -> list:
    """The fixed points above, plus places of the GeoNames list jittered by up to ~0.5 degrees."""
    rng = np.random.default_rng(seed)
    rows = load_places().rows
    picks = rng.integers(len(rows), size=n_random)
    jitter = rng.normal(0, 0.25, size=(n_random, 2))
    random = [(float(np.clip(rows[i].lat + a, -90, 90)), float(((rows[i].lon + b + 180) % 360) - 180))
              for i, (a, b) in zip(picks, jitter)]
    return BORDER + COASTAL + ANTIMERIDIAN + POLAR + random


def test_region_and_city_always_lie_in_the_records_country_and_within_bounds(stage):
    places = load_places()
    codes_of = {}
    for p in places.rows:
        codes_of.setdefault((p.name, p.lat, p.lon), p.cc)
    records = [rec(a, b, f"g{i}") for i, (a, b) in enumerate(generated_points())]
    kept = 0
    disagreements = 0
    for out in stage.process_batch(records):
        if isinstance(out, Reject):
            continue
        kept += 1
        loc = out.location
        disagreements += loc["country_disagreement"]
        if not loc["truth_city"] and not loc["truth_region"]:
            continue
        claimed_cc = codes_of[(loc["truth_city"] or _name_at(places, loc), loc["truth_place_lat"],
                               loc["truth_place_lon"])]
        from pipeline.stages.geocode import _place_codes
        from pipeline.geo.polygons import countries_by_code
        country = countries_by_code().get(loc["country_code"])
        allowed = set(_place_codes(country)) if country else {loc["country_code"]}
        assert claimed_cc in allowed, (out.lat, out.lon, loc)
        km = haversine_km(out.lat, out.lon, loc["truth_place_lat"], loc["truth_place_lon"])
        assert km == pytest.approx(loc["truth_place_km"], abs=0.01)
        if loc["truth_city"]:
            assert km <= stage.near_city_km
            assert loc["truth_city_near"] == (km > stage.max_city_km)
            assert (loc["truth_level"] == "city") == (not loc["truth_city_near"])
        if loc["truth_region"]:
            assert km <= stage.max_region_km
    assert kept > 1000 and disagreements > 0  # the set does hold cross-border reverse_geocoder labels


def _name_at(places, loc):
    for p in places.rows:
        if (p.lat, p.lon) == (loc["truth_place_lat"], loc["truth_place_lon"]):
            return p.name
    raise AssertionError("no place at the truth coordinates")


@pytest.mark.parametrize("lat, lon, country, region, not_region", [
    (42.30, -83.03, "CA", "Ontario", "Michigan"),            # Windsor, ON
    (48.58, 7.75, "FR", "Alsace", "Baden-Wuerttemberg"),  # Strasbourg (GeoNames keeps the old region)
    (32.52, -117.04, "MX", "Baja California", "California"),  # Tijuana
])
def test_border_towns_get_their_own_countrys_region(stage, lat, lon, country, region, not_region):
    loc = loc_of(stage, lat, lon)
    assert loc["country_code"] == country
    assert loc["truth_region"] == region and loc["truth_region"] != not_region


def test_antimeridian_twins_get_the_same_truth(stage):
    keys = ("country_code", "country", "truth_region", "truth_city", "truth_city_near", "truth_level",
            "truth_place_km")
    for lat in (-16.8, 65.0, -90.0, 0.0, 52.0):
        outs = [stage.process(rec(lat, lon)) for lon in (-180.0, 180.0)]
        assert type(outs[0]) is type(outs[1])
        if isinstance(outs[0], Record):
            assert [outs[0].location[k] for k in keys] == [outs[1].location[k] for k in keys]
    # Across the line the nearest place is found: Fiji's Vanua Levu side, not Sigave 341 km away.
    loc = loc_of(stage, -16.8, -180.0)
    assert loc["truth_place_km"] < 100 and loc["country_code"] == "FJ"


def test_south_pole_is_antarctica_without_a_city(stage):
    loc = loc_of(stage, -90.0, 0.0)
    assert loc["country_code"] == "AQ" and loc["continent"] == "Antarctica"
    assert loc["truth_city"] == "" and loc["truth_level"] in ("country", "region")
    assert loc["city"] == "Grytviken"  # reverse_geocoder's label is kept as it is, for agreement only


def test_far_city_is_near_then_absent(stage):
    # The Tenere desert: no place of Niger within 100 km -> country only.
    loc = loc_of(stage, 21.0, 14.0)
    assert (loc["truth_city"], loc["truth_region"], loc["truth_level"]) == ("", "", "country")
    tight = GeocodeStage(max_city_km=1, near_city_km=500, max_region_km=1000)
    loc = tight.process(rec(21.0, 14.0)).location
    assert loc["truth_city"] and loc["truth_city_near"] and loc["truth_level"] == "region"


def test_everyday_names():
    assert country_name("TZ", "United Republic of Tanzania") == "Tanzania"
    assert country_name("US", "United States of America") == "United States"
    assert country_name("FR", "France") == "France"  # unlisted: the fallback
    assert clean_region("Shanxi Sheng", "CN") == "Shanxi"
    assert clean_region("Muhafazat Matruh", "EG") == "Matruh"
    assert clean_region("Saga Prefecture", "JP") == "Saga"
    assert clean_region("Eastern Province", "CD") == "Eastern Province"  # not a droppable word there
    assert clean_region("Sheng", "CN") == "Sheng"


def test_geocoded_names_are_everyday_names(stage):
    assert loc_of(stage, -6.8, 39.28)["country"] == "Tanzania"  # Dar es Salaam
    loc = loc_of(stage, 37.87, 112.55)  # Taiyuan
    assert loc["truth_region"] == "Shanxi" and loc["admin1"] == "Shanxi Sheng"
    assert loc_of(stage, 40.71, -74.0)["country"] == "United States"


def test_options_pickle_and_are_checked():
    import pickle
    back = pickle.loads(pickle.dumps(GeocodeStage(max_city_km=10, max_region_km=80)))
    assert (back.max_city_km, back.near_city_km, back.max_region_km) == (10.0, 20.0, 80.0)
    with pytest.raises(ValueError):
        GeocodeStage(max_city_km=10, near_city_km=5)


def test_every_everyday_name_and_alias_is_understood_by_the_country_matcher():
    """The corpus writes the names of prompts/names/ ("Chagos Islands", "Réunion", "DPRK"); the
    matcher that scores answers (Clue quality, Dialogue, eval) read only Natural Earth's names."""
    from pipeline.geo.names import country_aliases
    from pipeline.stages.quality import country_names

    matcher = country_names()
    missed = [(code, name) for code, names in country_aliases().items() for name in names
              if code not in matcher.codes(name)]
    assert missed == []
