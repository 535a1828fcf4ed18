"""Geographic split: nearby photos never straddle splits (cell boundaries, antimeridian, poles),
ratios hold, assignment is deterministic and order-free, and Beam matches the reference."""
from __future__ import annotations

import math
import random
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from pipeline.beam.wrapper import stage_metrics
from pipeline.core.record import Record
from pipeline.global_steps.split import (AssignSplit, assign_splits, cell_of, check_ratios, split_of_unit,
                            unit_ids)

R_KM = 6371.0


def destination(lat: float, lon: float, bearing_deg: float, distance_km: float) -> tuple[float, float]:
    """The point distance_km from (lat, lon) along a great circle (standard direct formula)."""
    phi, lam, theta = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    delta = distance_km / R_KM
    phi2 = math.asin(math.sin(phi) * math.cos(delta) + math.cos(phi) * math.sin(delta) * math.cos(theta))
    lam2 = lam + math.atan2(math.sin(theta) * math.sin(delta) * math.cos(phi),
                            math.cos(delta) - math.sin(phi) * math.sin(phi2))
    lon2 = (math.degrees(lam2) + 540.0) % 360.0 - 180.0
    return max(-90.0, min(90.0, math.degrees(phi2))), lon2


def haversine_km(a, b) -> float:
    (la1, lo1), (la2, lo2) = [(math.radians(p[0]), math.radians(p[1])) for p in (a, b)]
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * R_KM * math.asin(math.sqrt(h))


def random_point(rng: random.Random) -> tuple[float, float]:
    """Uniform on the sphere (not on the lat/lon rectangle)."""
    return math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)


def assert_pairs_together(pairs, link_km=1.0):
    """Each pair, alone or mixed with all the others, gets one unit and one split."""
    flat = [p for pair in pairs for p in pair]
    units = unit_ids(flat, link_km)
    splits = assign_splits(flat, link_km=link_km)
    for i in range(0, len(flat), 2):
        assert units[i] == units[i + 1], (flat[i], flat[i + 1])
        assert splits[i] == splits[i + 1], (flat[i], flat[i + 1])


# --- ratios --------------------------------------------------------------------------------

def test_ratio_checks():
    assert check_ratios((0.9, 0.05, 0.05)) == (0.9, 0.05, 0.05)
    assert check_ratios({"test": 0.2, "train": 0.7, "val": 0.1}) == (0.7, 0.1, 0.2)
    for bad in [(0.9, 0.05), (0.9, 0.2, -0.1), (0.5, 0.2, 0.2), (float("nan"), 0.5, 0.5),
                {"train": 1.0}, {"train": 0.8, "dev": 0.1, "test": 0.1}]:
        with pytest.raises(ValueError):
            check_ratios(bad)
    with pytest.raises(ValueError):
        AssignSplit(ratios=(1.0, 0.1, 0.0))
    with pytest.raises(ValueError):
        AssignSplit(link_km=0)


@pytest.mark.parametrize("ratios", [(0.90, 0.05, 0.05), (0.5, 0.3, 0.2), (1.0, 0.0, 0.0)])
def test_ratios_are_honoured_on_random_world_points(ratios):
    rng = random.Random(11)
    points = [random_point(rng) for _ in range(20_000)]
    counts = Counter(assign_splits(points, ratios))
    for name, ratio in zip(("train", "val", "test"), ratios):
        assert abs(counts[name] / len(points) - ratio) < 0.01, (name, counts)


def test_bad_coordinates_raise():
    for lat, lon in [(None, 1.0), (91.0, 0.0), (0.0, 181.0), (float("nan"), 0.0)]:
        with pytest.raises(ValueError):
            cell_of(lat, lon)


# --- nearby photos stay together -----------------------------------------------------------

def test_pairs_300m_apart_share_a_split_even_across_cell_boundaries():
    rng = random.Random(5)
    pairs = []
    for _ in range(3000):
        a = random_point(rng)
        b = destination(*a, rng.uniform(0, 360), 0.3)
        pairs.append((a, b))
    crossing = sum(cell_of(*a) != cell_of(*b) for a, b in pairs)
    assert crossing > 1000  # the test really exercises cell boundaries
    assert_pairs_together(pairs)


def test_pairs_across_the_antimeridian():
    rng = random.Random(6)
    pairs = [((lat, 179.999), (lat, -179.999)) for lat in range(-80, 81, 5)]
    for _ in range(500):
        a = (rng.uniform(-85, 85), rng.uniform(179.99, 180.0))
        b = destination(*a, rng.uniform(0, 180), 0.3)  # eastward: across the seam
        pairs.append((a, b))
    assert any(b[1] < 0 for _, b in pairs[-500:])
    assert all(haversine_km(a, b) < 0.5 for a, b in pairs)
    assert_pairs_together(pairs)


def test_pairs_near_the_poles():
    rng = random.Random(8)
    pairs = [((89.999, 0.0), (89.999, 180.0)), ((-89.999, 45.0), (-89.999, -135.0)),
             ((90.0, 0.0), (89.998, 123.0)), ((-90.0, 0.0), (-89.998, -77.0))]
    for _ in range(1000):
        a = (rng.choice([1, -1]) * rng.uniform(89.9, 90.0), rng.uniform(-180, 180))
        pairs.append((a, destination(*a, rng.uniform(0, 360), 0.3)))
    assert all(haversine_km(a, b) < 0.5 for a, b in pairs)
    assert_pairs_together(pairs)


def test_chain_of_points_500m_apart_is_one_unit():
    rng = random.Random(9)
    for _ in range(20):
        start, bearing = random_point(rng), rng.uniform(0, 360)
        chain = [destination(*start, bearing, 0.5 * i) for i in range(41)]  # 20 km
        assert len({cell_of(*p) for p in chain}) >= 15  # many cells, linked only by the chain
        assert set(unit_ids(chain)) == {min(cell_of(*p) for p in chain)}  # id: smallest cell
        assert len(set(assign_splits(chain))) == 1


def test_far_points_are_separate_units():
    """The link is local: 5 km apart (beyond 2*sqrt(3) cells) is never joined without a chain."""
    rng = random.Random(10)
    for _ in range(500):
        a = random_point(rng)
        b = destination(*a, rng.uniform(0, 360), 5.0)
        ua, ub = unit_ids([a, b])
        assert ua != ub


def test_link_km_is_configurable():
    a = (48.85, 2.35)
    b = destination(*a, 90, 3.0)
    assert len(set(unit_ids([a, b], link_km=1.0))) == 2
    assert len(set(unit_ids([a, b], link_km=3.5))) == 1


# --- determinism ---------------------------------------------------------------------------

def test_same_points_in_any_order_get_same_splits():
    rng = random.Random(12)
    points = []
    for _ in range(300):  # clusters, so components span several cells
        centre = random_point(rng)
        points += [destination(*centre, rng.uniform(0, 360), rng.uniform(0, 3)) for _ in range(5)]
    want = dict(zip(points, assign_splits(points)))
    for _ in range(3):
        rng.shuffle(points)
        assert dict(zip(points, assign_splits(points))) == want


def test_adding_far_away_data_does_not_move_a_unit():
    rng = random.Random(13)
    paris = [destination(48.85, 2.35, rng.uniform(0, 360), rng.uniform(0, 2)) for _ in range(50)]
    before = assign_splits(paris)
    elsewhere = [destination(-33.9, 151.2, rng.uniform(0, 360), rng.uniform(0, 2)) for _ in range(50)]
    assert assign_splits(elsewhere + paris)[50:] == before
    assert split_of_unit(unit_ids(paris)[0]) == before[0]


# --- Beam ----------------------------------------------------------------------------------

def test_beam_transform_matches_reference():
    rng = random.Random(14)
    points = [random_point(rng) for _ in range(150)]
    points += [destination(*points[0], b, 0.4) for b in range(0, 360, 30)]  # one multi-cell unit
    records = [Record(key=f"k{i}", source="t", input_id=str(i), lat=lat, lon=lon)
               for i, (lat, lon) in enumerate(points)]
    ratios = (0.6, 0.2, 0.2)
    want = [(r.key, s) for r, s in zip(records, assign_splits(points, ratios))]

    pipeline = beam.Pipeline(runner=FnApiRunner())
    out = pipeline | beam.Create(records) | AssignSplit(ratios=ratios)
    assert_that(out | beam.Map(lambda r: (r.key, r.split)), equal_to(want))
    result = pipeline.run()
    result.wait_until_finish()

    counts = stage_metrics(result)["split"]
    expected = Counter(s for _, s in want)
    assert counts["in"] == len(records)
    assert {k: counts.get(k, 0) for k in ("train", "val", "test")} == dict(expected)


# --- splits fixed by the source ------------------------------------------------------------

def test_fixed_split_is_kept_and_pulls_its_unit_along():
    rng = random.Random(21)
    far = [random_point(rng) for _ in range(200)]
    free = assign_splits(far)
    held = far[:40]
    # Points whose own unit would not draw "test": fixing them must still give "test".
    drawn_elsewhere = [p for p, s in zip(held, free) if s != "test"]
    assert drawn_elsewhere
    near = [destination(*p, 90, 0.3) for p in drawn_elsewhere]  # 300 m away: same unit
    points = far + near
    fixed = ["test"] * 40 + [None] * (len(points) - 40)
    got = assign_splits(points, fixed=fixed)
    assert got[:40] == ["test"] * 40
    assert got[len(far):] == ["test"] * len(near)  # a fixed test photo's neighbours are test too
    assert got[40:len(far)] == free[40:]  # units without a fixed photo are split as before


def test_a_unit_with_several_fixed_splits_takes_the_most_held_out():
    base = (48.85, 2.35)
    points = [base, destination(*base, 0, 0.3), destination(*base, 180, 0.3)]
    assert assign_splits(points, fixed=["val", "test", None]) == ["val", "test", "test"]
    assert assign_splits(points, fixed=["train", None, None]) == ["train", "train", "train"]
    with pytest.raises(ValueError, match="splits are"):
        assign_splits(points[:1], fixed=["holdout"])


def test_beam_transform_keeps_fixed_splits_like_the_reference():
    rng = random.Random(22)
    points = [random_point(rng) for _ in range(60)]
    points += [destination(*points[0], 45, 0.4)]  # shares the unit of a fixed test point
    fixed = ["test"] * 10 + [None] * (len(points) - 10)
    records = [Record(key=f"k{i}", source="t", input_id=str(i), lat=lat, lon=lon, split=f)
               for i, ((lat, lon), f) in enumerate(zip(points, fixed))]
    want = [(r.key, s) for r, s in zip(records, assign_splits(points, fixed=fixed))]
    assert want[0][1] == want[-1][1] == "test"

    pipeline = beam.Pipeline(runner=FnApiRunner())
    out = pipeline | beam.Create(records) | AssignSplit()
    assert_that(out | beam.Map(lambda r: (r.key, r.split)), equal_to(want))
    pipeline.run().wait_until_finish()
