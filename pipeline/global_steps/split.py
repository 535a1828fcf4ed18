"""Geographic train/val/test split: photos taken close together never land in different splits.

A random split per photo would leak: the same street corner shot twice would sit in train and
in test. So the split unit is a cluster of nearby photos:

1. lat/lon -> point on the sphere of radius 6371 km in 3-D (ECEF); no seam at the antimeridian
   and no squeezed cells at the poles, unlike a lat/lon grid.
2. cell = floor(xyz / link_km). Two points whose straight-line (chord) distance is <= link_km
   differ by <= link_km on every axis, so their cells are the same or one of the 26 neighbours.
   The great-circle distance is never shorter than the chord, so this holds on the ground too.
3. Occupied cells that are neighbours are linked; connected components of occupied cells
   (union-find) are the split units. Any two photos <= link_km apart are therefore in one unit;
   photos up to 2*sqrt(3)*link_km apart (opposite corners of neighbouring cells) may be joined
   too, and chains of photos join transitively, so a densely photographed city is one unit.
4. Unit id = its smallest cell (x, y, z); split = sha1 of that id as a number in [0, 1) against
   the cumulative ratios. A unit's split depends only on its own cells, so adding photos
   elsewhere never moves it (adding photos that merge two units can, by design).
5. Fixed splits: a source may fix a record's split before this step (record.split already set:
   OSV-5M's test.csv rows are "test", its official test split, never train or val). Such a
   record keeps it, and its whole unit follows it: the other photos within link_km of it take the
   fixed split too (the most held-out one, test > val > train, when a unit holds several), so a
   fixed test photo never has a neighbour in train. Units without a fixed record are split by 4.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence, Union

import apache_beam as beam

from pipeline.beam.wrapper import METRIC_PREFIX, BundleCounts, DistinctValues, plan_side_input, stage_work
from pipeline.core.record import Record
from pipeline.global_steps.unionfind import UnionFind
from pipeline.geo.places import EARTH_RADIUS_KM

STAGE = "split"
METRICS_NAMESPACE = METRIC_PREFIX + STAGE
SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.90, 0.05, 0.05)
DEFAULT_LINK_KM = 1.0
Cell = tuple[int, int, int]
Ratios = Union[Sequence[float], Mapping[str, float]]
# Half of the 26 neighbours: linking each cell to these reaches every neighbouring pair once.
log = logging.getLogger(__name__)
_FORWARD = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
            if (dx, dy, dz) > (0, 0, 0)]


def check_ratios(ratios: Ratios) -> tuple[float, float, float]:
    """(train, val, test) from a 3-sequence or a {"train","val","test"} mapping; each >= 0,
    summing to 1 (within 1e-6). Raises ValueError: a bad ratio is a configuration error."""
    if isinstance(ratios, Mapping):
        if set(ratios) != set(SPLITS):
            raise ValueError(f"split ratios need exactly the keys {SPLITS}, got {sorted(ratios)}")
        ratios = [ratios[name] for name in SPLITS]
    values = tuple(float(r) for r in ratios)
    if len(values) != 3:
        raise ValueError(f"split ratios need 3 values (train, val, test), got {len(values)}")
    if any(not math.isfinite(r) or r < 0 for r in values):
        raise ValueError(f"split ratios must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, got {values} (sum {sum(values)})")
    return values


def check_link_km(link_km: float) -> float:
    link_km = float(link_km)
    if not math.isfinite(link_km) or link_km <= 0:
        raise ValueError(f"link_km must be a positive distance in km, got {link_km}")
    return link_km


def cell_of(lat: float, lon: float, link_km: float = DEFAULT_LINK_KM) -> Cell:
    """The 3-D grid cell of a point. Coordinates are validated upstream (validate stage); a
    missing or impossible one here is a wiring error and raises ValueError."""
    try:
        lat, lon = float(lat), float(lon)
    except (TypeError, ValueError):
        raise ValueError(f"split needs numeric lat/lon, got {lat!r}, {lon!r}") from None
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"split needs valid lat/lon, got {lat}, {lon}")
    phi, lam = math.radians(lat), math.radians(lon)
    x = EARTH_RADIUS_KM * math.cos(phi) * math.cos(lam)
    y = EARTH_RADIUS_KM * math.cos(phi) * math.sin(lam)
    z = EARTH_RADIUS_KM * math.sin(phi)
    return (math.floor(x / link_km), math.floor(y / link_km), math.floor(z / link_km))


def linked_roots(cells: Iterable[Cell]) -> dict[Cell, Cell]:
    """{cell: unit id (smallest cell of its component)} for the cells of multi-cell components.
    A cell that is not in it is a unit on its own (its id is itself): leaving those out keeps
    the side input small where photos are sparse."""
    occupied = set(map(tuple, cells))
    uf = UnionFind()
    for x, y, z in occupied:
        for dx, dy, dz in _FORWARD:
            neighbour = (x + dx, y + dy, z + dz)
            if neighbour in occupied:
                uf.union((x, y, z), neighbour)
    roots: dict[Cell, Cell] = {}
    for component in uf.components():
        root = min(component)
        roots.update({cell: root for cell in component})
    return roots


def _linked_roots_logged(cells: list[Cell]) -> dict[Cell, Cell]:
    # Chains of nearby photos merge transitively: a huge unit (a whole metro area) skews the
    # ratios, so its size is worth seeing in the job log.
    roots = linked_roots(cells)
    sizes = Counter(roots.values())
    largest = max(sizes.values(), default=1)
    log.info("split: %d occupied cells, %d multi-cell units, largest unit %d cells (%.1f%%)",
             len(cells), len(sizes), largest, 100.0 * largest / max(len(cells), 1))
    return roots


def split_of_unit(unit: Cell, ratios: Ratios = DEFAULT_RATIOS) -> str:
    """Deterministic split of a unit: sha1 of its id -> u in [0, 1) -> cumulative ratio bins."""
    train, val, _ = check_ratios(ratios)
    digest = hashlib.sha1(("%d,%d,%d" % tuple(unit)).encode("ascii")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


def unit_ids(points: Iterable[tuple[float, float]], link_km: float = DEFAULT_LINK_KM) -> list[Cell]:
    """Unit id of each (lat, lon): points in one unit share it."""
    link_km = check_link_km(link_km)
    cells = [cell_of(lat, lon, link_km) for lat, lon in points]
    roots = linked_roots(cells)
    return [roots.get(cell, cell) for cell in cells]


def assign_splits(points: Iterable[tuple[float, float]], ratios: Ratios = DEFAULT_RATIOS,
                  link_km: float = DEFAULT_LINK_KM, fixed: Optional[Sequence[Optional[str]]] = None) -> list[str]:
    """The whole step without Beam: split name of each (lat, lon), in input order.
    fixed: per point, the split its source fixed (None: not fixed); see rule 5 above."""
    ratios = check_ratios(ratios)
    points = list(points)
    fixed = [_check_fixed(f, f"point {i}") for i, f in enumerate(fixed)] if fixed is not None \
        else [""] * len(points)
    link_km = check_link_km(link_km)
    plan = split_plan([(cell_of(lat, lon, link_km), f or "") for (lat, lon), f in zip(points, fixed)])
    return [_split_of(plan, cell_of(lat, lon, link_km), f, ratios) for (lat, lon), f in zip(points, fixed)]


def fixed_split(record: Record) -> str:
    """The split a source fixed for this record ("" when none): record.split set before this step."""
    return _check_fixed(record.split, f"record {record.key}")


def _check_fixed(split: Optional[str], what: str) -> str:
    # A split outside SPLITS would make shards no loader expects: a source's defect, raised.
    if split is None or split == "":
        return ""
    if split not in SPLITS:
        raise ValueError(f"{what} has split {split!r} fixed by its source; splits are {SPLITS}")
    return split


def split_plan(cells: Iterable[tuple[Cell, str]]) -> dict:
    """(cell, fixed split or "") of every record -> {"roots": linked_roots of the cells, "fixed":
    {unit id: the most held-out fixed split in it}} (only units that hold a fixed record)."""
    cells = list(cells)
    roots = _linked_roots_logged(sorted({cell for cell, _ in cells}))
    fixed: dict[Cell, str] = {}
    for cell, split in cells:
        if split:
            unit = roots.get(cell, cell)
            if unit not in fixed or SPLITS.index(split) > SPLITS.index(fixed[unit]):
                fixed[unit] = split
    if fixed:
        log.info("split: %d units hold records whose source fixed their split", len(fixed))
    return {"roots": roots, "fixed": fixed}


def _split_of(plan: dict, cell: Cell, fixed: str, ratios) -> str:
    if fixed:
        return fixed
    unit = plan.get("roots", {}).get(cell, cell)
    return plan.get("fixed", {}).get(unit) or split_of_unit(unit, ratios)


def _record_cell(record: Record, link_km: float) -> tuple[Cell, str]:
    return cell_of(record.lat, record.lon, link_km), fixed_split(record)


class _AssignFn(beam.DoFn):
    def __init__(self, ratios: tuple, link_km: float):
        self.ratios = ratios
        self.link_km = link_km

    def setup(self):
        self.counts = BundleCounts(METRICS_NAMESPACE)

    def process(self, record: Record, plan: dict):
        cell, fixed = _record_cell(record, self.link_km)
        split = _split_of(plan, cell, fixed, self.ratios)
        self.counts.add("in")
        self.counts.add(split)
        yield record.replace(split=split)

    def finish_bundle(self):
        self.counts.flush()


class AssignSplit(beam.PTransform):
    """records -> the same records with record.split set.

    ratios: (train, val, test) or a mapping with those keys, default (0.90, 0.05, 0.05).
    link_km: photos within this distance always share a split (default 1.0 km).
    Global: every record must be in the input PCollection. Records need valid lat/lon. A record
    whose split is already set (fixed by its source) keeps it, and so does its unit (rule 5)."""

    def __init__(self, ratios: Ratios = DEFAULT_RATIOS, link_km: float = DEFAULT_LINK_KM,
                 label: Optional[str] = STAGE):
        super().__init__(label=label)
        self.ratios = check_ratios(ratios)  # bad settings fail when the graph is built
        self.link_km = check_link_km(link_km)

    def plan(self, records):
        """The linked cells and the fixed units as one element (split_plan), for a side input; no
        element when there are no records (a combine without a default saves the runner a step;
        the side input's default {} stands in)."""
        return (records
                | "Cell" >> stage_work(STAGE, _record_cell, self.link_km, flat=False)
                | "AllCells" >> beam.CombineGlobally(DistinctValues()).without_defaults()
                | "Link" >> stage_work(STAGE, split_plan, flat=False))

    def assign_fn(self) -> beam.DoFn:
        return _AssignFn(self.ratios, self.link_km)

    def expand(self, records):
        return records | "Assign" >> beam.ParDo(self.assign_fn(), plan_side_input(self.plan(records)))
