"""Validate stage: coords_raw (EXIF GPS, table text, given values) -> lat/lon or one reason."""
from __future__ import annotations

import decimal
import io
import math
import random

import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from pipeline.stages.exif_gps import GpsError, gps_from_ifd
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from pipeline.stages.validate import ValidateStage
from made_inputs import png_claiming

# gps/*.jpg: the README there only names the origin (gaia-gis spatialite samples), no values.
# These are the stored EXIF degrees/minutes/seconds (N, E) written as decimal degrees, e.g.
# DSCN0010: 43°28'2.814"N 11°53'6.456"E; all in Tuscany (SOURCE.md: about 43.47 N, 11.88 E).
GPS_SAMPLES = {
    "DSCN0010.jpg": (43.467448, 11.885127),
    "DSCN0012.jpg": (43.467157, 11.885395),
    "DSCN0021.jpg": (43.467082, 11.884538),
    "DSCN0025.jpg": (43.468365, 11.881635),
    "DSCN0027.jpg": (43.468442, 11.881515),
    "DSCN0029.jpg": (43.468243, 11.880172),
    "DSCN0038.jpg": (43.467255, 11.879213),
    "DSCN0040.jpg": (43.466012, 11.879112),
    "DSCN0042.jpg": (43.464455, 11.881478),
}


def exif_record(data: bytes) -> Record:
    return Record(key="k-000000000000", source="exif:/x", input_id="x.jpg", image_bytes=data,
                  coords_raw={"kind": "exif"})


def coords_record(kind: str, **values) -> Record:
    return Record(key="k-000000000000", source="table:/t.csv", input_id="row-1",
                  coords_raw={"kind": kind, **values})


def validate(record: Record, **options):
    return ValidateStage(**options).safe_process(record)


def dms(degrees, minutes, seconds):
    return (IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 1000), 1000))


def image_with_gps(gps: dict, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = gps
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 120, 200)).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


# --- real photos -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GPS_SAMPLES))
def test_gps_samples_give_their_coordinates(exif_samples, name):
    out = validate(exif_record((exif_samples / "gps" / name).read_bytes()))
    assert isinstance(out, Record), out
    assert out.lat == pytest.approx(GPS_SAMPLES[name][0], abs=1e-6)
    assert out.lon == pytest.approx(GPS_SAMPLES[name][1], abs=1e-6)


def test_phone_photo_gps(exif_samples):
    # 60°8'48.14"N 24°54'24.38"E: Helsinki area, as SOURCE.md says.
    out = validate(exif_record((exif_samples / "misc" / "HMD_Nokia_8.3_5G.jpg").read_bytes()))
    assert (round(out.lat, 6), round(out.lon, 6)) == (60.146706, 24.906772)


def test_broken_samples_are_rejected_with_exif_reasons(exif_samples):
    # invalid/ hold only XMP or a bare JFIF header; corrupted.jpg has EXIF without GPS.
    expected = {
        "corrupted.jpg": "no_gps",
        "invalid/image00971.jpg": "no_gps", "invalid/image01088.jpg": "no_gps",
        "invalid/image01137.jpg": "no_gps", "invalid/image01713.jpg": "no_gps",
        "invalid/image01551.jpg": "no_exif", "invalid/image01980.jpg": "no_exif",
        "invalid/image02206.jpg": "no_exif",
        "misc/no_exif.jpg": "no_gps",       # EXIF (orientation, software) but no GPS IFD
        "misc/Canon_40D.jpg": "no_gps",     # GPS IFD holding only GPSVersionID
    }
    got = {name: validate(exif_record((exif_samples / name).read_bytes())).reason
           for name in expected}
    assert got == expected


def test_orientation_samples_have_no_gps(exif_samples):
    paths = sorted((exif_samples / "orientation").glob("*.jpg"))
    assert len(paths) == 16
    assert {validate(exif_record(p.read_bytes())).reason for p in paths} == {"no_gps"}


def test_every_sample_ends_in_a_record_or_a_known_reason(exif_samples):
    records = [exif_record(p.read_bytes()).replace(input_id=str(p))
               for p in sorted(exif_samples.rglob("*.jpg"))]
    kept, rejected = run_stage(ValidateStage(), records)
    assert len(kept) == 10 and len(kept) + len(rejected) == len(records) == 36
    assert {r.reason for r in rejected} == {"no_gps", "no_exif"}
    assert all(r.stage == "validate" and r.detail for r in rejected)


# --- generated EXIF ------------------------------------------------------------------------------

SYDNEY = {1: "S", 2: dms(33, 51, 31.56), 3: "E", 4: dms(151, 12, 0.3)}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_gps_is_read_from_every_format_pillow_exposes(fmt):
    out = validate(exif_record(image_with_gps(SYDNEY, fmt)))
    assert isinstance(out, Record), out
    assert out.lat == pytest.approx(-(33 + 51 / 60 + 31.56 / 3600), abs=1e-9)
    assert out.lon == pytest.approx(151 + 12 / 60 + 0.3 / 3600, abs=1e-9)


def test_west_longitude_is_negative():
    out = validate(exif_record(image_with_gps({1: "S", 2: dms(22, 54, 30), 3: "W", 4: dms(43, 11, 47)})))
    assert (round(out.lat, 6), round(out.lon, 6)) == (-22.908333, -43.196389)


@pytest.mark.parametrize("gps, reason", [
    ({1: "N", 2: (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1)), 3: "E", 4: dms(1, 2, 3)},
     "gps_zero_denominator"),
    ({1: "N", 2: dms(43, 28, 2), 3: "E", 4: (IFDRational(11, 1), IFDRational(53, 1), IFDRational(0, 0))},
     "gps_zero_denominator"),
    ({1: "N", 2: dms(91, 0, 0), 3: "E", 4: dms(10, 0, 0)}, "lat_out_of_range"),
    ({1: "N", 2: dms(89, 59, 60.5), 3: "E", 4: dms(10, 0, 0)}, "gps_malformed"),  # seconds >= 60
    ({1: "N", 2: dms(45, 60, 0), 3: "E", 4: dms(10, 0, 0)}, "gps_malformed"),     # minutes >= 60
    ({1: "N", 2: dms(45, 0, 0), 3: "E", 4: dms(181, 0, 0)}, "lon_out_of_range"),
    ({1: "N", 2: (IFDRational(45, 1), IFDRational(30, 1)), 3: "E", 4: dms(10, 0, 0)}, "gps_malformed"),
    ({2: dms(45, 0, 0), 3: "E", 4: dms(10, 0, 0)}, "gps_malformed"),              # no N/S
    ({1: "N", 2: dms(45, 0, 0), 4: dms(10, 0, 0)}, "gps_malformed"),              # no E/W
    ({1: "X", 2: dms(45, 0, 0), 3: "E", 4: dms(10, 0, 0)}, "gps_malformed"),
    ({1: "N", 2: dms(45, 0, 0), 3: "N", 4: dms(10, 0, 0)}, "gps_malformed"),      # N is not E/W
    ({1: "N", 2: dms(45, 0, 0)}, "gps_malformed"),                                # lat only
    ({0: b"\x02\x02\x00\x00", 5: b"\x00"}, "no_gps"),                             # version only
    ({1: "N", 2: dms(0, 0, 0), 3: "E", 4: dms(0, 0, 0)}, "null_island"),
])
def test_bad_exif_gps_gives_its_own_reason(gps, reason):
    out = validate(exif_record(image_with_gps(gps)))
    assert out.reason == reason, out
    assert out.detail


def test_longitude_180_both_ways_and_poles_are_accepted():
    east = validate(exif_record(image_with_gps({1: "S", 2: dms(90, 0, 0), 3: "E", 4: dms(180, 0, 0)})))
    west = validate(exif_record(image_with_gps({1: "N", 2: dms(90, 0, 0), 3: "W", 4: dms(180, 0, 0)})))
    assert (east.lat, east.lon, west.lat, west.lon) == (-90.0, 180.0, 90.0, -180.0)


def test_gps_ifd_values_in_other_shapes():
    # raw (numerator, denominator) pairs, byte refs with NUL padding, floats (DOUBLE tags)
    assert gps_from_ifd({1: b"S\x00", 2: ((10, 1), (30, 1), (0, 1)), 3: "w ", 4: (5.0, 15.0, 0.0)}) \
        == (-10.5, -5.25)
    with pytest.raises(GpsError) as err:
        gps_from_ifd({1: "N", 2: ((43, 1), (28, 0), (2, 1)), 3: "E", 4: (1.0, 0.0, 0.0)})
    assert err.value.reason == "gps_zero_denominator"
    for bad, reason in [((float("nan"), 0.0, 0.0), "not_finite"), ((-5.0, 0.0, 0.0), "gps_malformed"),
                        (("4", "5", "6"), "gps_malformed"), (7.5, "gps_malformed")]:
        with pytest.raises(GpsError) as err:
            gps_from_ifd({1: "N", 2: bad, 3: "E", 4: (1.0, 0.0, 0.0)})
        assert err.value.reason == reason, bad


# --- bytes that are not (whole) images -----------------------------------------------------------

def test_text_named_jpg_is_not_an_image():
    assert validate(exif_record(b"hello, I am a text file called photo.jpg\n")).reason == "not_image"


def test_record_without_bytes():
    assert validate(exif_record(None)).reason == "no_image_bytes"


def test_truncated_header_and_truncated_pixels(exif_samples):
    data = (exif_samples / "gps" / "DSCN0010.jpg").read_bytes()
    assert validate(exif_record(data[:300])).reason == "truncated"  # cut inside the EXIF block
    # EXIF sits in front of the pixels: a photo cut in half still has its GPS (the image
    # stage is the one that rejects it as truncated).
    assert validate(exif_record(data[: len(data) // 2])).lat == pytest.approx(43.467448, abs=1e-6)


def test_png_without_exif_and_decompression_bombs():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    assert validate(exif_record(buf.getvalue())).reason == "no_exif"
    # Pillow must decode a PNG's pixels to look for a late eXIf chunk: guarded by max_pixels.
    assert validate(exif_record(buf.getvalue()), max_pixels=64 * 64 - 1).reason == "decompression_bomb"
    assert validate(exif_record(png_claiming(100_000, 100_000))).reason == "decompression_bomb"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow reports the corrupt EXIF it skips
def test_garbled_exif_never_raises(exif_samples):
    data = (exif_samples / "gps" / "DSCN0012.jpg").read_bytes()
    rng = random.Random(7)
    variants = [data[:cut] for cut in range(0, 3000, 41)]
    for _ in range(150):
        mangled = bytearray(data[:4000])
        for _ in range(8):
            mangled[rng.randrange(2, len(mangled))] = rng.randrange(256)
        variants.append(bytes(mangled) + data[4000:])
    reasons = {getattr(validate(exif_record(v)), "reason", "ok") for v in variants}
    assert "internal_error" not in reasons
    assert "ok" in reasons and "truncated" in reasons


# --- table text and given values -----------------------------------------------------------------

@pytest.mark.parametrize("lat, lon, expected", [
    ("12.5", "-7.25", (12.5, -7.25)),
    (" +43.4674 ", "11.885", (43.4674, 11.885)),
    ("1e1", ".5", (10.0, 0.5)),
    ("-90", "180", (-90.0, 180.0)),
    ("90", "-180.0", (90.0, -180.0)),
])
def test_table_text_accepted(lat, lon, expected):
    out = validate(coords_record("table", lat=lat, lon=lon))
    assert (out.lat, out.lon) == expected


@pytest.mark.parametrize("values, reason", [
    ({}, "coords_missing"),
    ({"lat": "45.0"}, "coords_missing"),
    ({"lat": "", "lon": "10"}, "coords_missing"),
    ({"lat": "  ", "lon": "10"}, "coords_missing"),
    ({"lat": "NA", "lon": "10"}, "coords_missing"),
    ({"lat": "n/a", "lon": "10"}, "coords_missing"),
    ({"lat": "null", "lon": "10"}, "coords_missing"),
    ({"lat": "abc", "lon": "10"}, "coords_not_numeric"),
    ({"lat": "12,5", "lon": "10"}, "coords_not_numeric"),
    ({"lat": "1_0", "lon": "10"}, "coords_not_numeric"),
    ({"lat": "43°28'N", "lon": "10"}, "coords_not_numeric"),
    ({"lat": "0x1A", "lon": "10"}, "coords_not_numeric"),
    ({"lat": "NaN", "lon": "10"}, "not_finite"),
    ({"lat": "10", "lon": "-inf"}, "not_finite"),
    ({"lat": "1e999", "lon": "10"}, "not_finite"),
    ({"lat": "91", "lon": "10"}, "lat_out_of_range"),
    ({"lat": "-90.0001", "lon": "10"}, "lat_out_of_range"),
    ({"lat": "10", "lon": "180.0001"}, "lon_out_of_range"),
    ({"lat": "10", "lon": "-181"}, "lon_out_of_range"),
    ({"lat": "0", "lon": "0"}, "null_island"),
    ({"lat": "0.0000001", "lon": "-0.0000005"}, "null_island"),
])
def test_table_text_rejected_with_its_reason(values, reason):
    out = validate(coords_record("table", **values))
    assert out.reason == reason, out
    assert out.detail


def test_decimal_comma_gets_a_hint():
    assert "decimal comma" in validate(coords_record("table", lat="12,5", lon="1")).detail


def test_null_island_threshold_is_tight():
    out = validate(coords_record("table", lat="0.00001", lon="0"))  # about 1 m from 0,0
    assert (out.lat, out.lon) == (0.00001, 0.0)


@pytest.mark.parametrize("lat, lon, expected", [
    (12, -7.5, (12.0, -7.5)),
    (np.float32(45.5), np.int64(-3), (45.5, -3.0)),
    (decimal.Decimal("1.25"), "2.5", (1.25, 2.5)),
])
def test_given_values_accepted(lat, lon, expected):
    out = validate(coords_record("given", lat=lat, lon=lon))
    assert (out.lat, out.lon) == expected
    assert type(out.lat) is float and type(out.lon) is float


@pytest.mark.parametrize("lat, lon, reason", [
    (None, 10.0, "coords_missing"),
    (float("nan"), 10.0, "not_finite"),
    (10.0, math.inf, "not_finite"),
    (decimal.Decimal("NaN"), 10.0, "not_finite"),
    (True, 10.0, "coords_not_numeric"),
    ([45.0], 10.0, "coords_not_numeric"),
    (95.0, 10.0, "lat_out_of_range"),
    (0.0, 0.0, "null_island"),
])
def test_given_values_rejected(lat, lon, reason):
    assert validate(coords_record("given", lat=lat, lon=lon)).reason == reason


def test_records_without_coords_raw():
    plain = Record(key="k-000000000000", source="wds:/s", input_id="a")
    assert validate(plain).reason == "coords_missing"
    out = validate(plain.replace(lat=48.85, lon=2.35))
    assert (out.lat, out.lon) == (48.85, 2.35)
    assert validate(plain.replace(lat=48.85, lon=200.0)).reason == "lon_out_of_range"


def test_unknown_coords_kind():
    assert validate(coords_record("osm")).reason == "coords_kind_unknown"
