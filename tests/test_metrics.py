"""Metrics against values worked out by hand.

One degree of a great circle on the R = 6371 km sphere is 6371 * pi / 180 = 111.19492664 km;
the values below follow from that (0.2 degree = 22.2390 km, a quarter circle = 10007.5 km).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate.metrics import (MAX_ERROR_KM, THRESHOLDS_KM, SampleScore, geoscore, haversine_km,
                                       score_all, summarize, within)
from pipeline.evaluate.names import countries_match, names_match, normalize_name
from pipeline.evaluate.predictions import GroundTruth, Prediction

KM_PER_DEGREE = 6371.0 * math.pi / 180.0  # 111.19492664455873


# ---- haversine -------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, km", [
    ((0, 0), (0, 1), KM_PER_DEGREE),
    ((0, 0), (1, 0), KM_PER_DEGREE),
    ((0, 0), (0, 90), 6371.0 * math.pi / 2),
    ((0, 0), (90, 0), 6371.0 * math.pi / 2),
    ((0, 0), (0, 180), 6371.0 * math.pi),                 # antipodes: half the circumference
    ((0, 179.5), (0, -179.5), KM_PER_DEGREE),             # across the antimeridian, not ~40000 km
    ((10, -179.9), (10, 179.9), 0.2 * KM_PER_DEGREE * math.cos(math.radians(10))),  # ~approximately
    ((90, 0), (90, 120), 0.0),                            # the pole: longitude means nothing there
    ((-90, 45), (-90, -135), 0.0),
    ((89.9, 0), (89.9, 180), 0.2 * KM_PER_DEGREE),        # over the pole: 0.1 + 0.1 degree = 22.24 km
    ((60, 5), (60, 5), 0.0),
])
def test_haversine_hand_values(a, b, km):
    tolerance = 0.01 if a == (10, -179.9) else 1e-6  # that row's flat approximation is good to metres
    assert haversine_km(*a, *b) == pytest.approx(km, abs=tolerance)
    assert haversine_km(*b, *a) == pytest.approx(km, abs=tolerance)


def test_haversine_known_numbers_and_arrays():
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(111.195, abs=1e-3)
    assert haversine_km(89.9, 0, 89.9, 180) == pytest.approx(22.239, abs=1e-3)
    assert haversine_km(90, 0, 90, 120) < 1e-6
    out = haversine_km(np.array([0.0, 90.0]), np.array([179.5, 0.0]), np.array([0.0, 90.0]), np.array([-179.5, 120.0]))
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    assert out == pytest.approx([KM_PER_DEGREE, 0.0], abs=1e-6)
    assert isinstance(haversine_km(0, 0, 0, 1), float)


# ---- thresholds, GeoScore, median ------------------------------------------------------------
def _scores(distances):
    return [SampleScore(f"s{i}", "answered" if d is not None else "unparseable", "" if d is not None else "bad_coordinates",
                        d, None, None, None) for i, d in enumerate(distances)]


def test_thresholds_are_strictly_less_than():
    distances = [0.0, 0.999, 1.0, 24.999, 25.0, 199.99, 200.0, 749.9, 750.0, 2499.99, 2500.0, None]
    assert within(distances, 1) == 2            # 0.0, 0.999 (1.0 is not < 1)
    assert within(distances, 25) == 4
    assert within(distances, 200) == 6
    assert within(distances, 750) == 8
    assert within(distances, 2500) == 10        # 2500.0 and the unparseable one are out
    m = summarize(_scores(distances))
    assert m["within_1km"] == pytest.approx(2 / 12)
    assert m["within_25km"] == pytest.approx(4 / 12)
    assert m["within_200km"] == pytest.approx(6 / 12)
    assert m["within_750km"] == pytest.approx(8 / 12)
    assert m["within_2500km"] == pytest.approx(10 / 12)
    assert [f"within_{t:g}km" for t in THRESHOLDS_KM] == [
        "within_1km", "within_25km", "within_200km", "within_750km", "within_2500km"]


def test_geoscore_values():
    assert float(geoscore(0.0)) == 5000.0
    assert float(geoscore(1492.7)) == pytest.approx(5000 / math.e)             # 1839.397
    assert float(geoscore(2 * 1492.7)) == pytest.approx(5000 / math.e ** 2)    # 676.676
    assert float(geoscore(MAX_ERROR_KM)) < 1.0
    # mean over every sample; the unparseable one scores 0
    m = summarize(_scores([0.0, 1492.7, None]))
    assert m["geoscore"] == pytest.approx((5000 + 5000 / math.e + 0) / 3)      # 2279.799


def test_median_counts_non_answers_as_the_largest_error():
    assert summarize(_scores([100.0, 1.0, 5.0]))["median_km"] == 5.0
    m = summarize(_scores([100.0, 1.0, 5.0, None]))
    assert m["median_km"] == pytest.approx((5.0 + 100.0) / 2)  # 1, 5, 100, MAX -> 52.5
    assert m["median_km_answered"] == 5.0
    m = summarize(_scores([3.0, None, None]))
    assert m["median_km"] == pytest.approx(MAX_ERROR_KM) and m["median_km_answered"] == 3.0
    assert MAX_ERROR_KM == pytest.approx(20015.0868, abs=1e-3)


def test_empty_set_has_undefined_metrics():
    m = summarize([])
    assert m["samples"] == 0 and m["geoscore"] is None and m["median_km"] is None
    assert m["country_accuracy"] is None and m["within_25km"] is None


# ---- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, truth", [
    ("US", "United States"), ("USA", "US"), ("United States of America", "us"), ("U.S.A.", "US"),
    ("united states", "US"), ("UK", "GB"), ("England", "United Kingdom"), ("Namibia", "NA"),
    ("Ivory Coast", "CI"), ("Côte d'Ivoire", "Cote dIvoire"), ("FRA", "France"), ("fr", "FR"),
    ("the Netherlands", "NL"), ("Czech Republic", "Czechia"), ("Kosovo", "XK"),
])
def test_countries_match_by_code_or_name(pred, truth):
    assert countries_match(pred, truth)


@pytest.mark.parametrize("pred, truth", [
    ("Austria", "AU"), ("Australia", "Austria"), ("Niger", "NG"), ("Nigeria", "NE"), ("", "US"),
    ("Denmark", "GL"), ("United States", "CA"),
])
def test_countries_that_differ(pred, truth):
    assert not countries_match(pred, truth)


def test_names_ignore_case_accents_and_punctuation():
    assert names_match("São Paulo", "sao paulo")
    assert names_match("Zürich", "ZURICH")
    assert names_match("Łódź", "Lodz")
    assert names_match("Île-de-France", "Ile de France")
    assert names_match("St. Gallen", "st gallen")
    assert names_match("東京", "東京")
    assert not names_match("", "")            # nothing is not a match
    assert not names_match("Paris", "Parma")
    assert normalize_name("  Baden-Württemberg ") == "baden wurttemberg"


# ---- whole scoring ---------------------------------------------------------------------------
def test_scoring_counts_unparseable_and_missing_separately():
    truths = [
        GroundTruth("a", 48.8566, 2.3522, "FR", "Île-de-France", "Paris", "Paris"),
        GroundTruth("b", 35.6762, 139.6503, "JP", "Tokyo", "", "Tokyo"),
        GroundTruth("c", -33.8688, 151.2093, "AU", "", "", "Sydney"),    # no region known
        GroundTruth("d", 40.4168, -3.7038, "ES", "Madrid", "", "Madrid"),
    ]
    preds = {
        "a": Prediction("a", 48.8566, 2.3522 + 1.0, country="France", region="Ile de France", city="Versailles"),
        "b": Prediction("b", error="invalid_json"),
        "c": Prediction("c", -33.8688, 151.2093, country="Australia", region="New South Wales", city="sydney"),
        # "d" has no prediction at all
        "zzz": Prediction("zzz", 0, 0),  # not in the ground truth: ignored
    }
    scores = score_all(truths, preds)
    assert [s.status for s in scores] == ["answered", "unparseable", "answered", "missing"]
    m = summarize(scores)
    assert (m["samples"], m["answered"], m["unparseable"], m["missing"]) == (4, 2, 1, 1)
    assert m["unparseable_reasons"] == {"invalid_json": 1}
    assert m["country_accuracy"] == pytest.approx(2 / 4)
    assert m["region_n"] == 3 and m["region_accuracy"] == pytest.approx(1 / 3)  # c has no region
    assert m["city_accuracy"] == pytest.approx(1 / 4)
    d_a = KM_PER_DEGREE * math.cos(math.radians(48.8566))  # ~73.2 km along the parallel
    assert scores[0].distance_km == pytest.approx(d_a, rel=1e-4)
    assert m["within_1km"] == pytest.approx(1 / 4)     # c exactly
    assert m["within_200km"] == pytest.approx(2 / 4)
    assert m["geoscore"] == pytest.approx((5000 + 5000 * math.exp(-scores[0].distance_km / 1492.7)) / 4)
    assert m["median_km"] == pytest.approx((scores[0].distance_km + MAX_ERROR_KM) / 2)
