"""GPS coordinates from an image's EXIF, read with Pillow.

Pillow exposes the GPS IFD for JPEG, PNG (eXIf chunk), WebP and TIFF alike through
Image.getexif().get_ifd(GPSInfo). Everything that can be wrong with camera GPS tags is reported
as a GpsError carrying a reason code, so the validate stage turns it into one ledger row.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from PIL import ExifTags

from pipeline.stages.image import open_image, reject_for_pillow_error

GPS_LATITUDE_REF = ExifTags.GPS.GPSLatitudeRef        # 1
GPS_LATITUDE = ExifTags.GPS.GPSLatitude               # 2
GPS_LONGITUDE_REF = ExifTags.GPS.GPSLongitudeRef      # 3
GPS_LONGITUDE = ExifTags.GPS.GPSLongitude             # 4

# axis -> (tag of the degrees/minutes/seconds, tag of the hemisphere letter, letters (+, -))
_AXES = {
    "latitude": (GPS_LATITUDE, GPS_LATITUDE_REF, ("N", "S")),
    "longitude": (GPS_LONGITUDE, GPS_LONGITUDE_REF, ("E", "W")),
}


class GpsError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def gps_from_image_bytes(data: bytes, max_pixels: int) -> tuple[float, float]:
    """(lat, lon) in signed decimal degrees from the EXIF GPS tags of an encoded image.

    max_pixels guards the one case where Pillow must decode pixels to find EXIF (a PNG whose
    eXIf chunk comes after the image data)."""
    try:
        im = open_image(data)
    except Exception as exc:  # noqa: BLE001 - garbage bytes are a reason, never a crash
        reject = reject_for_pillow_error(exc, "open")
        raise GpsError(reject.reason, reject.detail) from None
    with im:
        if im.format == "PNG" and "exif" not in im.info and im.width * im.height > max_pixels:
            raise GpsError("decompression_bomb", f"PNG of {im.width}x{im.height} pixels would have "
                                                 f"to be decoded to look for EXIF")
        try:
            exif = im.getexif()
            gps = exif.get_ifd(ExifTags.IFD.GPSInfo) if exif else {}
        except Exception as exc:  # noqa: BLE001 - corrupt EXIF blocks raise all sorts of errors
            raise GpsError("exif_unreadable", f"{type(exc).__name__}: {exc}") from None
    if not exif:
        raise GpsError("no_exif", f"the {im.format} image has no EXIF data")
    return gps_from_ifd(gps)


def gps_from_ifd(gps: Mapping[int, Any]) -> tuple[float, float]:
    """(lat, lon) from a GPS IFD as Pillow returns it (tag number -> value). Ranges are not
    checked here: validate.check_coordinates does that for every kind of coordinates."""
    has_lat, has_lon = GPS_LATITUDE in gps, GPS_LONGITUDE in gps
    if not has_lat and not has_lon:
        raise GpsError("no_gps", "EXIF has no GPS latitude/longitude tags")
    if not (has_lat and has_lon):
        missing = "longitude" if has_lat else "latitude"
        raise GpsError("gps_malformed", f"GPS has one coordinate but no {missing}")
    lat = _axis_degrees(gps, "latitude")
    lon = _axis_degrees(gps, "longitude")
    return lat, lon


def _axis_degrees(gps: Mapping[int, Any], axis: str) -> float:
    value_tag, ref_tag, (positive, negative) = _AXES[axis]
    raw = gps[value_tag]
    if not isinstance(raw, (tuple, list)) or len(raw) != 3:
        count = len(raw) if isinstance(raw, (tuple, list)) else 1
        raise GpsError("gps_malformed", f"GPS {axis} has {count} value(s), EXIF needs 3 "
                                        f"(degrees, minutes, seconds): {raw!r}"[:200])
    degrees, minutes, seconds = (_component(part, axis) for part in raw)
    if minutes >= 60 or seconds >= 60:
        raise GpsError("gps_malformed", f"GPS {axis} minutes/seconds must be < 60: "
                                        f"{degrees} {minutes}' {seconds}\"")
    value = degrees + minutes / 60.0 + seconds / 3600.0  # range: validate.check_coordinates
    ref = _ref_letter(gps.get(ref_tag))
    if ref is None:
        raise GpsError("gps_malformed", f"GPS {axis} has no {positive}/{negative} reference tag")
    if ref not in (positive, negative):
        raise GpsError("gps_malformed",
                       f"GPS {axis} reference {ref!r} is not {positive} or {negative}")
    return -value if ref == negative else value


def _component(part: Any, axis: str) -> float:
    """One of degrees/minutes/seconds: Pillow gives IFDRational; raw (num, den) pairs accepted."""
    if isinstance(part, (tuple, list)) and len(part) == 2:
        numerator, denominator = part
    elif hasattr(part, "numerator") and hasattr(part, "denominator"):
        # IFDRational with denominator 0 silently turns into nan: look at the denominator itself.
        numerator, denominator = part.numerator, part.denominator
    else:
        numerator, denominator = part, 1  # float (e.g. a DOUBLE-typed tag)
    if isinstance(numerator, bool) or not isinstance(numerator, numbers.Real) \
            or isinstance(denominator, bool) or not isinstance(denominator, numbers.Real):
        raise GpsError("gps_malformed", f"GPS {axis} component {part!r} is not a number"[:200])
    if denominator == 0:
        raise GpsError("gps_zero_denominator", f"GPS {axis} component {part!r} has denominator 0")
    value = float(numerator) / float(denominator)
    if not math.isfinite(value):
        raise GpsError("not_finite", f"GPS {axis} component {part!r} is not finite")
    if value < 0:
        raise GpsError("gps_malformed", f"GPS {axis} component {value} is negative "
                                        f"(the hemisphere goes in the reference tag)")
    return value


def _ref_letter(value: Any) -> str | None:
    """'N', b'N', 'N\\x00', ' n ' -> 'N'; empty or absent -> None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None if value is None else repr(value)
    letter = value.replace("\x00", "").strip().upper()
    return letter or None
