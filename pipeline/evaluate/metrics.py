"""Geolocation metrics as the field reports them (OSV-5M, IM2GPS3K/YFCC4K, GeoGuessr-style GeoScore).

- country / region / city accuracy: the predicted name equals the true one (case and accents
  ignored; countries also match by ISO code, so "US" = "United States");
- accuracy within 1, 25, 200, 750, 2500 km: great-circle error strictly less than the threshold;
- GeoScore: mean of 5000 * exp(-d / 1492.7 km), as OSV-5M defines it;
- median error in km;
- geocoded country / region / city accuracy: the *predicted coordinates* reverse-geocoded land in
  the same country / region / city as the true ones (pipeline.evaluate.geocoded, OSV-5M's way);
- a per-continent breakdown of all of the above (the continent of the true point).

Every ground-truth sample is in every denominator: a missing or unparseable prediction is wrong
at every level, scores 0 GeoScore and counts as the largest possible error (half the
circumference) in the median, and both are also counted on their own. Name accuracies leave out
only samples whose ground truth lacks that level (no city known, say).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np

from pipeline.evaluate import geocoded
from pipeline.evaluate.names import countries_match, names_match
from pipeline.evaluate.predictions import GroundTruth, Prediction
from pipeline.geo.places import EARTH_RADIUS_KM, haversine_km

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
MAX_ERROR_KM = math.pi * EARTH_RADIUS_KM  # antipodal distance: what a non-answer counts as
LEVELS = ("country", "region", "city")


def geoscore(distance_km):
    return GEOSCORE_MAX * np.exp(-np.asarray(distance_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


@dataclass
class SampleScore:
    id: str
    status: str                    # "answered" | "unparseable" | "missing"
    reason: str                    # why unparseable ("" otherwise)
    distance_km: Optional[float]   # None unless answered
    country: Optional[bool]        # None: ground truth has no country
    region: Optional[bool]
    city: Optional[bool]
    # From the predicted coordinates, reverse-geocoded (False when there are none).
    geo_country: bool = False
    geo_region: bool = False
    geo_city: bool = False
    continent: str = ""            # of the true point ("" when unknown)


def score_sample(truth: GroundTruth, pred: Optional[Prediction]) -> SampleScore:
    def level(true_value: str, ok: bool) -> Optional[bool]:
        return None if not true_value else ok

    true_label = geocoded.label_of(truth.lat, truth.lon)
    continent = geocoded.continent_of(true_label.country)
    if pred is None or not pred.usable:
        status, reason = ("missing", "") if pred is None else ("unparseable", pred.error)
        return SampleScore(truth.id, status, reason, None, level(truth.country, False),
                           level(truth.region, False), level(truth.city, False), continent=continent)
    label = geocoded.label_of(pred.lat, pred.lon)
    return SampleScore(
        truth.id, "answered", "", haversine_km(truth.lat, truth.lon, pred.lat, pred.lon),
        level(truth.country, countries_match(pred.country, truth.country)),
        level(truth.region, names_match(pred.region, truth.region)),
        level(truth.city, names_match(pred.city, truth.city)),
        *(geocoded.same_at(name, label, true_label) for name in LEVELS), continent=continent)


def score_all(truths: Iterable[GroundTruth], predictions: Mapping[str, Prediction]) -> list[SampleScore]:
    return [score_sample(t, predictions.get(t.id)) for t in truths]


def threshold_key(km: float) -> str:
    return f"within_{km:g}km"


def within(distances: Iterable[Optional[float]], km: float) -> int:
    """How many distances are strictly below km (None = no answer, never counts)."""
    return sum(1 for d in distances if d is not None and d < km)


def summarize(scores: list[SampleScore]) -> dict:
    """The metrics of one set of scored samples (fractions in 0..1, None when undefined)."""
    n = len(scores)
    distances = [s.distance_km for s in scores]
    answered = [d for d in distances if d is not None]
    out: dict = {
        "samples": n,
        "answered": len(answered),
        "unparseable": sum(s.status == "unparseable" for s in scores),
        "missing": sum(s.status == "missing" for s in scores),
        "unparseable_reasons": dict(sorted(Counter(s.reason for s in scores if s.reason).items())),
    }
    for name in LEVELS:
        judged = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[f"{name}_accuracy"] = sum(judged) / len(judged) if judged else None
        out[f"{name}_n"] = len(judged)
    for name in LEVELS:
        out[f"geo_{name}_accuracy"] = sum(getattr(s, f"geo_{name}") for s in scores) / n if n else None
    for km in THRESHOLDS_KM:
        out[threshold_key(km)] = within(distances, km) / n if n else None
    out["geoscore"] = float(np.sum(geoscore(answered))) / n if n else None
    filled = [MAX_ERROR_KM if d is None else d for d in distances]
    out["median_km"] = float(np.median(filled)) if n else None
    out["median_km_answered"] = float(np.median(answered)) if answered else None
    return out


def error_distances(scores: list[SampleScore]) -> list[Optional[float]]:
    return [s.distance_km for s in scores]


def by_continent(scores: list[SampleScore]) -> dict[str, dict]:
    """summarize() per continent of the true point, largest first (samples with no known
    continent, e.g. far out at sea, under "unknown")."""
    groups: dict[str, list[SampleScore]] = {}
    for s in scores:
        groups.setdefault(s.continent or "unknown", []).append(s)
    return {name: summarize(group) for name, group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
