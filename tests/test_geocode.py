"""geocode stage: polygon countries, reverse_geocoder's exact place labels, rejections, batching."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import reverse_geocoder
import shapefile

from pipeline.geo.polygons import NE_ZIP
from pipeline.stages.geocode import GeocodeStage
from pipeline.core.record import Record, Reject
from pipeline.core.stage import run_stage

LOCATION_KEYS = {"continent", "country_code", "country", "sovereign_code", "sovereign", "admin1",
                 "admin2", "city", "city_id", "place_lat", "place_lon", "place_distance_km",
                 "nearest_country_code", "country_source", "country_disagreement",
                 "truth_region", "truth_city", "truth_city_near", "truth_place_km", "truth_place_lat",
                 "truth_place_lon", "truth_level", "names_version"}


@pytest.fixture(scope="module")
def stage() -> GeocodeStage:
    s = GeocodeStage()
    s.setup()
    return s


def rec(lat, lon, name="p") -> Record:
    return Record(key=name, source="test", input_id=name, lat=lat, lon=lon)


def locate(stage, lat, lon) -> dict:
    out = stage.process(rec(lat, lon))
    assert isinstance(out, Record), out
    assert set(out.location) == LOCATION_KEYS
    return out.location


def test_paris_is_france_in_europe(stage):
    loc = locate(stage, 48.8566, 2.3522)
    assert (loc["country_code"], loc["country"], loc["continent"]) == ("FR", "France", "Europe")
    assert (loc["city"], loc["admin1"], loc["admin2"]) == ("Paris", "Ile-de-France", "Paris")
    assert loc["city_id"] == "Paris_Paris_Ile-de-France_FR"
    assert loc["country_source"] == "polygon" and loc["country_disagreement"] is False
    # Haversine (R = 6371 km) to the matched place, not a distance in degrees.
    lat1, lon1, lat2, lon2 = map(math.radians, (48.8566, 2.3522, loc["place_lat"], loc["place_lon"]))
    a = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    assert loc["place_distance_km"] == pytest.approx(2 * 6371 * math.asin(math.sqrt(a)), abs=1e-3)


def test_countries_whose_natural_earth_iso_a2_is_minus_99(stage):
    with shapefile.Reader(NE_ZIP, encoding="utf-8") as sf:
        names = [f[0] for f in sf.fields[1:]]
        raw = {r["ADMIN"]: r["ISO_A2"] for r in (dict(zip(names, rec_)) for rec_ in sf.records())}
    assert raw["France"] == raw["Norway"] == "-99"  # the quirk this test guards against
    assert locate(stage, 59.9139, 10.7522)["country_code"] == "NO"  # Oslo
    assert locate(stage, 45.764, 4.8357)["country_code"] == "FR"   # Lyon
    assert locate(stage, 42.6629, 21.1655)["country_code"] == "XK"  # Pristina, Kosovo


def test_greenland_has_sovereign_denmark(stage):
    loc = locate(stage, 64.19, -51.69)  # Nuuk
    assert (loc["country_code"], loc["sovereign_code"], loc["sovereign"]) == ("GL", "DK", "Denmark")
    assert loc["continent"] == "North America" and loc["city"] == "Nuuk"


@pytest.mark.parametrize("lat, lon, city", [
    (42.2941, -83.0545, "Detroit"),     # Windsor, Ontario
    (42.9287, -82.3981, "Port Huron"),  # Sarnia, Ontario
])
def test_canadian_border_town_keeps_polygon_country_and_flags_disagreement(stage, lat, lon, city):
    loc = locate(stage, lat, lon)
    assert loc["city"] == city and loc["nearest_country_code"] == "US"
    assert loc["country_code"] == "CA" and loc["country"] == "Canada"
    assert loc["country_source"] == "polygon" and loc["country_disagreement"] is True
    assert loc["city_id"].endswith("_Michigan_US")  # the place label stays reverse_geocoder's
    # ... but the truth the text claims is Canadian: an Ontario town, never Michigan or Detroit.
    assert loc["truth_region"] == "Ontario" and loc["truth_city"] not in ("", city)


@pytest.mark.parametrize("lat, lon", [(-30.0, -140.0), (0.0, 0.0)])
def test_open_sea_is_far_from_place(stage, lat, lon):
    out = stage.process(rec(lat, lon))
    assert isinstance(out, Reject) and out.reason == "far_from_place"
    assert "km away" in out.detail


def test_desert_far_from_places_is_kept_when_inside_a_polygon(stage):
    loc = locate(stage, 21.0, 14.0)  # Ténéré, Niger
    assert loc["place_distance_km"] > 200 and loc["country_code"] == "NE"
    assert loc["country_source"] == "polygon"


def test_point_just_offshore_takes_the_nearby_polygon():
    # A few hundred metres off Rio de Janeiro's beaches, outside Natural Earth's coastline.
    loc = locate(GeocodeStage(), -22.995, -43.21)
    assert (loc["country_code"], loc["country_source"]) == ("BR", "polygon_nearby")
    # With no coastal allowance the nearest place (Rio, 10 km away) gives the country instead.
    loc = locate(GeocodeStage(coast_km=0), -22.995, -43.21)
    assert (loc["country_code"], loc["country_source"], loc["continent"]) == ("BR", "nearest_place", "South America")
    # ... and with a smaller max_place_km that same point is rejected.
    out = GeocodeStage(max_place_km=5, coast_km=0).process(rec(-22.995, -43.21))
    assert isinstance(out, Reject) and out.reason == "far_from_place"


def test_labels_equal_reverse_geocoder_answer(stage):
    rng = np.random.default_rng(7)
    rows = stage._places.rows
    picks = rng.integers(len(rows), size=1500)
    lats = np.clip([rows[i].lat for i in picks] + rng.normal(0, 0.1, 1500), -90, 90)
    lons = np.clip([rows[i].lon for i in picks] + rng.normal(0, 0.1, 1500), -180, 180)
    coords = [(float(a), float(b)) for a, b in zip(lats, lons)]
    expected = reverse_geocoder.search(coords, mode=1, verbose=False)
    outs = stage.process_batch([rec(a, b, f"p{i}") for i, (a, b) in enumerate(coords)])
    kept = 0
    for out, want in zip(outs, expected):
        if isinstance(out, Reject):
            continue
        kept += 1
        loc = out.location
        assert (loc["city"], loc["admin1"], loc["admin2"], loc["nearest_country_code"]) == \
            (want["name"], want["admin1"], want["admin2"], want["cc"])
        assert (loc["place_lat"], loc["place_lon"]) == (float(want["lat"]), float(want["lon"]))
        assert loc["city_id"] == f'{want["name"]}_{want["admin2"]}_{want["admin1"]}_{want["cc"]}'
    assert kept > 1400


def test_batch_equals_one_by_one_and_bad_coordinates_are_rejected(stage):
    rng = np.random.default_rng(3)
    records = [rec(float(a), float(b), f"r{i}") for i, (a, b) in
               enumerate(zip(rng.uniform(-60, 70, 300), rng.uniform(-180, 180, 300)))]
    records += [rec(None, 2.0, "none"), rec(float("nan"), 2.0, "nan"), rec(95.0, 2.0, "range")]
    batched = stage.process_batch(records)
    assert batched == [stage.process(r) for r in records]
    assert {type(o) for o in batched[:300]} == {Record, Reject}  # land and sea both present
    assert [o.reason for o in batched[300:]] == ["no_coordinates"] * 3


def test_run_stage_splits_kept_and_rejected():
    kept, rejected = run_stage(GeocodeStage(), [rec(48.8566, 2.3522, "paris"), rec(-30.0, -140.0, "sea")])
    assert [r.key for r in kept] == ["paris"]
    assert [(r.key, r.stage, r.reason) for r in rejected] == [("sea", "geocode", "far_from_place")]


def test_setup_is_idempotent_and_shared(stage):
    places, countries = stage._places, stage._countries
    stage.setup()
    assert stage._places is places and stage._countries is countries
    other = GeocodeStage()
    other.setup()
    assert other._places is places  # one copy per process


def test_stage_pickles_small_and_keeps_options(stage):
    fresh = GeocodeStage(max_place_km=12.5, coast_km=3)
    assert len(pickle.dumps(fresh)) < 1000
    assert len(pickle.dumps(stage)) < 1000  # even after setup the tables stay behind
    back = pickle.loads(pickle.dumps(fresh))
    assert (back.max_place_km, back.coast_km, back._places) == (12.5, 3.0, None)


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        GeocodeStage(max_place_km=0)
    with pytest.raises(ValueError):
        GeocodeStage(coast_km=-1)
