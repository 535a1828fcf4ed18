"""Validate stage: record.coords_raw -> record.lat / record.lon (signed decimal degrees, WGS84).

Three kinds of evidence (see CONTRACT):
- {"kind": "exif"}: the GPS tags in record.image_bytes (pipeline.stages.exif_gps);
- {"kind": "table", "lat": text, "lon": text}: cells of a CSV/Parquet table, as text;
- {"kind": "given", "lat": any, "lon": any}: values from a wds json or similar (numbers or text).
A record without coords_raw but with lat/lon already set is checked as "given".

Text rules (decided here, one place): a plain decimal number with '.' ("12.5", "-0.5", "1e-3");
empty cells and the usual null markers ("NA", "N/A", "null", ...) are `coords_missing`;
"nan"/"inf" are numbers but `not_finite`; anything else ("abc", "12,5", "43°28'N", "1_000") is
`coords_not_numeric`, since guessing a decimal comma or a DMS notation could silently put a photo
in the wrong place. Longitude must lie in [-180, 180] (both ends accepted, nothing wrapped).
"""
from __future__ import annotations

import decimal
import math
import numbers
import re
from typing import Any

from pipeline.stages.exif_gps import GpsError, gps_from_image_bytes
from pipeline.stages.image import DEFAULT_MAX_PIXELS
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome, Stage

NULL_ISLAND_DEGREES = 1e-6  # GPS chips without a fix write 0/0; no real photo is within 11 cm of it
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NULL_MARKERS = {"", "na", "n/a", "#n/a", "<na>", "null", "none", "nil", "-", "?"}
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


class ValidateStage(Stage):
    name = "validate"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels  # only used when Pillow must decode a PNG to find its EXIF

    def process(self, record: Record) -> Outcome:
        raw = record.coords_raw
        if raw is None:
            if record.lat is None and record.lon is None:
                return Reject("coords_missing", "the input came with no coordinates at all")
            raw = {"kind": "given", "lat": record.lat, "lon": record.lon}
        kind = raw.get("kind") if isinstance(raw, dict) else None
        try:
            if kind == "exif":
                if not record.image_bytes:
                    return Reject("no_image_bytes", "EXIF coordinates need the image bytes "
                                                    "(read stage not run?)")
                lat, lon = gps_from_image_bytes(record.image_bytes, self.max_pixels)
            elif kind in ("table", "given"):
                lat = _number(raw.get("lat"), "latitude")
                lon = _number(raw.get("lon"), "longitude")
            else:
                return Reject("coords_kind_unknown", f"coords_raw kind {kind!r} is not "
                                                     f"exif, table or given")
            check_coordinates(lat, lon)
        except GpsError as err:
            return Reject(err.reason, err.detail)
        return record.replace(lat=lat, lon=lon)


def check_coordinates(lat: float, lon: float) -> None:
    """Raise GpsError unless (lat, lon) is a finite, in-range, non-null-island position."""
    for axis, value in (("latitude", lat), ("longitude", lon)):
        if not math.isfinite(value):
            raise GpsError("not_finite", f"{axis} is {value}")
    if not -90.0 <= lat <= 90.0:
        raise GpsError("lat_out_of_range", f"latitude {lat} is outside [-90, 90]")
    if not -180.0 <= lon <= 180.0:
        raise GpsError("lon_out_of_range", f"longitude {lon} is outside [-180, 180]")
    if abs(lat) < NULL_ISLAND_DEGREES and abs(lon) < NULL_ISLAND_DEGREES:
        raise GpsError("null_island", f"({lat}, {lon}) is 0,0: a placeholder, not a place")


def _number(value: Any, axis: str) -> float:
    if value is None:
        raise GpsError("coords_missing", f"no {axis} value")
    if isinstance(value, bool) or \
            not isinstance(value, (numbers.Real, decimal.Decimal, str, bytes)):
        raise GpsError("coords_not_numeric", f"{axis} {value!r} is not a number"[:200])
    if isinstance(value, (numbers.Real, decimal.Decimal)):
        try:
            return float(value)
        except (OverflowError, ValueError) as exc:  # a huge int or Decimal
            raise GpsError("not_finite", f"{axis} {value!r}: {exc}"[:200]) from None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if text.lower() in _NULL_MARKERS:
        raise GpsError("coords_missing", f"{axis} is {text!r}, an empty cell")
    if text.lower() in _NON_FINITE:
        raise GpsError("not_finite", f"{axis} is {text!r}")
    if not _DECIMAL.fullmatch(text):
        hint = " (decimal comma? write 12.5)" if re.fullmatch(r"[+-]?\d+,\d+", text) else ""
        raise GpsError("coords_not_numeric",
                       f"{axis} {text!r} is not a decimal number{hint}"[:200])
    value = float(text)
    if not math.isfinite(value):  # "1e999"
        raise GpsError("not_finite", f"{axis} {text!r} overflows to {value}")
    return value
