"""Predictions and ground truth as files: what `mg-geo eval` scores and what it writes.

Ground truth is a CSV in OSV-5M's layout (id, latitude, longitude, country, region, sub-region,
city; any further columns are ignored) or GAEA's variants (lat/lon/lng, optional names).
Predictions are jsonl or csv rows with id, lat, lon and optional country/region/city (the
prediction schema's fields); interactive runs add `stage` (0 = first guess, k = after k
corrections) and `mode` (hint | correction | choice | mixed).

A prediction that cannot be used — coordinates missing, not numbers, off the globe, or the model's
answer failed (`error` holds the LVLM reason) — is kept as a Prediction with `error` set, so the
scorer can count it as wrong *and* report it separately from ids that have no row at all.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

# Column names as they appear in the wild -> ours. Headers are matched after strip().lower().
ID_NAMES = ("id", "image_id", "img_id", "key", "__key__", "image")
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "longitude", "long")
COUNTRY_NAMES = ("country", "country_code", "country_name")
REGION_NAMES = ("region", "admin1", "state")
SUB_REGION_NAMES = ("sub-region", "sub_region", "subregion", "admin2")
CITY_NAMES = ("city", "town")

OSV5M_COLUMNS = ("id", "latitude", "longitude", "country", "region", "sub-region", "city")
PREDICTION_FIELDS = ("id", "stage", "mode", "lat", "lon", "country", "region", "city",
                     "confidence", "reasoning", "error")


@dataclass
class GroundTruth:
    id: str
    lat: float
    lon: float
    country: str = ""     # ISO alpha-2 code or a name; compared through names.countries_match
    region: str = ""      # admin1
    sub_region: str = ""  # admin2
    city: str = ""


@dataclass
class Prediction:
    id: str
    lat: Optional[float] = None
    lon: Optional[float] = None
    country: str = ""
    region: str = ""
    city: str = ""
    confidence: Optional[float] = None
    reasoning: str = ""
    error: str = ""   # why the prediction is unusable ("" = usable): counted as wrong, separately
    stage: int = 0    # interactive runs: 0 = first guess, k = after k corrections
    mode: str = ""    # interactive runs: the correction mode of the dialogue

    @property
    def usable(self) -> bool:
        return not self.error


class GroundTruthError(ValueError):
    """The ground truth itself is broken: scoring against it would be meaningless."""


def _pick(row: dict, names: tuple) -> object:
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            return value
    return None


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def parse_coordinate(value: object) -> Optional[float]:
    """A finite float from a number or numeric text; None for anything else (bools included)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def coordinate_error(lat_raw: object, lon_raw: object) -> tuple[Optional[float], Optional[float], str]:
    """(lat, lon, "") when both are usable, else (None, None, reason)."""
    if lat_raw in (None, "") or lon_raw in (None, ""):
        return None, None, "missing_coordinates"
    lat, lon = parse_coordinate(lat_raw), parse_coordinate(lon_raw)
    if lat is None or lon is None:
        return None, None, "bad_coordinates"
    if not -90.0 <= lat <= 90.0:
        return None, None, "lat_out_of_range"
    if not -180.0 <= lon <= 180.0:
        return None, None, "lon_out_of_range"
    return lat, lon, ""


def _lower_keys(row: dict) -> dict:
    return {str(k).strip().lower(): v for k, v in row.items()}


def prediction_from_answer(pred_id: str, answer: dict, *, error: str = "", stage: int = 0,
                           mode: str = "") -> Prediction:
    """A Prediction from a parsed model answer or a file row (keys in any of the known spellings)."""
    row = _lower_keys(answer)
    lat, lon, bad = coordinate_error(_pick(row, LAT_NAMES), _pick(row, LON_NAMES))
    confidence = parse_coordinate(row.get("confidence"))
    return Prediction(
        id=pred_id, lat=lat, lon=lon,
        country=_text(_pick(row, COUNTRY_NAMES)), region=_text(_pick(row, REGION_NAMES)),
        city=_text(_pick(row, CITY_NAMES)), confidence=confidence,
        reasoning=_text(row.get("reasoning")),
        error=error or _text(row.get("error")) or bad, stage=stage, mode=mode)


def prediction_from_row(row: dict) -> Optional[Prediction]:
    """A file row -> Prediction; None when the row has no id (it cannot be matched to anything)."""
    row = _lower_keys(row)
    pred_id = _text(_pick(row, ID_NAMES))
    if not pred_id:
        return None
    stage_raw = parse_coordinate(row.get("stage"))
    stage = int(stage_raw) if stage_raw is not None and stage_raw >= 0 else 0
    return prediction_from_answer(pred_id, row, stage=stage, mode=_text(row.get("mode")))


@dataclass
class PredictionFile:
    predictions: list[Prediction]
    unreadable_rows: int  # lines that are not JSON objects, rows without an id


def _read_table(path: Path) -> list[dict]:
    # dtype=str and no NA parsing: ids like "007" stay as written, and Namibia's code "NA"
    # is not turned into a missing value.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.to_dict("records")


def read_predictions(path: str | Path) -> PredictionFile:
    path = Path(path)
    unreadable = 0
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        rows = _read_table(path)
    else:  # .jsonl / .ndjson / .json with one object per line
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    unreadable += 1
                    continue
                if isinstance(obj, dict):
                    rows.append(obj)
                else:
                    unreadable += 1
    predictions = []
    for row in rows:
        pred = prediction_from_row(row)
        if pred is None:
            unreadable += 1
        else:
            predictions.append(pred)
    return PredictionFile(predictions, unreadable)


def prediction_line(pred: Prediction) -> str:
    """One jsonl line; floats are written exactly (json uses repr), so reading it back loses nothing."""
    row = asdict(pred)
    return json.dumps({k: row[k] for k in PREDICTION_FIELDS}, ensure_ascii=False) + "\n"


def write_predictions(path: str | Path, predictions: Iterable[Prediction]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(prediction_line(p) for p in predictions)


def read_ground_truth(path: str | Path) -> list[GroundTruth]:
    """OSV-5M or GAEA layout CSV -> GroundTruth rows. Raises GroundTruthError on a broken file."""
    rows = _read_table(Path(path))
    if rows:
        columns = set(_lower_keys(rows[0]))
        for what, names in (("id", ID_NAMES), ("latitude", LAT_NAMES), ("longitude", LON_NAMES)):
            if not columns.intersection(names):
                raise GroundTruthError(f"{path}: no {what} column (looked for {', '.join(names)})")
    truths, seen = [], set()
    for line, raw in enumerate(rows, start=2):  # line 1 is the header
        row = _lower_keys(raw)
        truth_id = _text(_pick(row, ID_NAMES))
        lat, lon, bad = coordinate_error(_pick(row, LAT_NAMES), _pick(row, LON_NAMES))
        if not truth_id or bad:
            raise GroundTruthError(f"{path}:{line}: {'no id' if not truth_id else bad}")
        if truth_id in seen:
            raise GroundTruthError(f"{path}:{line}: id {truth_id!r} appears twice")
        seen.add(truth_id)
        truths.append(GroundTruth(truth_id, lat, lon, _text(_pick(row, COUNTRY_NAMES)),
                                  _text(_pick(row, REGION_NAMES)), _text(_pick(row, SUB_REGION_NAMES)),
                                  _text(_pick(row, CITY_NAMES))))
    return truths


def write_ground_truth(path: str | Path, truths: Iterable[GroundTruth]) -> None:
    """OSV-5M's column layout, so the file can be scored again (or by OSV-5M's own tools)."""
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(OSV5M_COLUMNS)
        for t in truths:
            writer.writerow([t.id, repr(t.lat), repr(t.lon), t.country, t.region, t.sub_region, t.city])


def truth_from_sample(sample_json: dict) -> Optional[GroundTruth]:
    """Ground truth from a shard's KEY.json (record.to_json()); None without coordinates."""
    lat, lon, bad = coordinate_error(sample_json.get("lat"), sample_json.get("lon"))
    key = _text(sample_json.get("key"))
    if bad or not key:
        return None
    loc = sample_json.get("location") or {}
    return GroundTruth(key, lat, lon, _text(loc.get("country_code") or loc.get("country")),
                       _text(loc.get("admin1")), _text(loc.get("admin2")), _text(loc.get("city")))
