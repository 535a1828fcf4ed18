"""Figures for docs/geocode_truth.md: how often reverse_geocoder's labels (what the text used to say)
cross a border or lie far away, and that the geocode truth never does, on generated points.

    PYTHONPATH=. python bench/bench_geocode_truth.py --n 20000 --seed 1

Point sets (GWS15k's coordinates are not available offline): GeoNames places jittered by a normal
of 0.25 degrees ("jittered places", dense where people live, like photo sets), points uniform on the
sphere (kept where geocode keeps them: land and coasts), and the fixed border, coastal, antimeridian
and polar points of tests/test_geocode_truth.py.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.record import Record, Reject  # noqa: E402
from pipeline.geo.places import haversine_km, load_places  # noqa: E402
from pipeline.geo.polygons import countries_by_code  # noqa: E402
from pipeline.stages.geocode import GeocodeStage, _place_codes  # noqa: E402


def jittered(n, rng):
    rows = load_places().rows
    picks = rng.integers(len(rows), size=n)
    return [(float(np.clip(rows[i].lat + rng.normal(0, .25), -90, 90)),
             float(((rows[i].lon + rng.normal(0, .25) + 180) % 360) - 180)) for i in picks]


def uniform(n, rng):
    z = rng.uniform(-1, 1, n)
    return [(float(np.degrees(np.arcsin(a))), float(b)) for a, b in zip(z, rng.uniform(-180, 180, n))]


def fixed():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_geocode_truth import ANTIMERIDIAN, BORDER, COASTAL, POLAR
    return BORDER + COASTAL + ANTIMERIDIAN + POLAR


def measure(name, points, stage):
    places = load_places()
    cc_at = {(p.lat, p.lon, p.name): p.cc for p in places.rows}
    outs = stage.process_batch([Record(key=f"k{i}", source="b", input_id=str(i), lat=a, lon=b)
                                for i, (a, b) in enumerate(points)])
    kept = [o for o in outs if not isinstance(o, Reject)]
    n = len(kept)
    rg_cross = sum(o.location["country_disagreement"] for o in kept)
    rg_far = sum(o.location["place_distance_km"] > 50 for o in kept)
    outside = beyond = 0
    levels = Counter()
    for o in kept:
        loc = o.location
        levels[loc["truth_level"] + (" (near town)" if loc["truth_city_near"] else "")] += 1
        if loc["truth_place_lat"] is None or not (loc["truth_region"] or loc["truth_city"]):
            continue
        cc = cc_at.get((loc["truth_place_lat"], loc["truth_place_lon"], loc["truth_city"])) if loc["truth_city"] else None
        country = countries_by_code().get(loc["country_code"])
        if cc is not None and cc not in (set(_place_codes(country)) if country else {loc["country_code"]}):
            outside += 1
        km = haversine_km(o.lat, o.lon, loc["truth_place_lat"], loc["truth_place_lon"])
        if (loc["truth_city"] and km > stage.near_city_km) or (loc["truth_level"] == "city" and km > stage.max_city_km):
            beyond += 1
    pct = lambda k: f"{100 * k / max(n, 1):.2f}%"  # noqa: E731
    print(f"| {name} | {len(points)} | {n} | {rg_cross} ({pct(rg_cross)}) | {rg_far} ({pct(rg_far)}) | "
          f"{outside} | {beyond} | " + ", ".join(f"{k} {pct(v)}" for k, v in sorted(levels.items())) + " |")


def twins(stage, rng, n):
    keys = ("country_code", "truth_region", "truth_city", "truth_city_near", "truth_level")
    lats = list(rng.uniform(-90, 90, n)) + [-90.0, 90.0, -16.8, 65.0, 52.0, -18.0, -45.0, 0.0]
    bad = same = 0
    for lat in lats:
        a, b = (stage.process(Record(key="t", source="b", input_id="t", lat=float(lat), lon=lon)) for lon in (-180.0, 180.0))
        if type(a) is not type(b) or (isinstance(a, Record) and [a.location[k] for k in keys] != [b.location[k] for k in keys]):
            bad += 1
        else:
            same += 1
    print(f"\nantimeridian twins (lat, -180) / (lat, 180): {len(lats)} latitudes, {same} alike, {bad} different")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    stage = GeocodeStage()
    stage.setup()
    print(f"bounds: city {stage.max_city_km:g} km, near town {stage.near_city_km:g} km, region {stage.max_region_km:g} km\n")
    print("| points | n | kept | reverse_geocoder label across the border | reverse_geocoder place > 50 km | "
          "truth region/city outside its country | truth city beyond its bound | truth level |")
    print("|---|---|---|---|---|---|---|---|")
    measure("jittered places", jittered(args.n, rng), stage)
    measure("uniform on the sphere", uniform(args.n, rng), stage)
    measure("border/coastal/antimeridian/polar", fixed(), stage)
    twins(stage, rng, 200)


if __name__ == "__main__":
    main()
