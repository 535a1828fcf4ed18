"""Inputs the tests make: every kind of bad input the issue names next to good ones (with the
reason each must get), and small helpers (a PNG claiming huge dimensions, a small real JPEG)."""
from __future__ import annotations

import csv
import io
import shutil
import struct
import zlib
from pathlib import Path

from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

from pipeline.io.sample_set import write_samples


def gps_jpeg(lat: tuple, lat_ref: str, lon: tuple, lon_ref: str, colour=(90, 120, 30)) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {1: lat_ref, 2: lat, 3: lon_ref, 4: lon}
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the data is a few zero rows): a
    decompression bomb that the header alone must stop."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def small_jpeg(path, side: int = 64) -> bytes:
    """A real photo re-encoded small, like the image stage's output."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=80)
    return out.getvalue()


def make_inputs(root: Path, exif_samples: Path, n_samples: int = 24) -> dict:
    """Writes root/{samples,bad,tables} and returns {"sources": [...], "expect": {(source, input_id): reason}}."""
    samples = root / "samples"
    entries = write_samples(str(samples), n_samples, seed=7)
    bad = root / "bad"
    bad.mkdir(parents=True)
    gps_photo = exif_samples / "gps" / "DSCN0010.jpg"
    whole = gps_photo.read_bytes()
    (bad / "zero-byte.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_bytes(b"this is a text file, not a photo\n")
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(buf, "PNG")
    (bad / "plain.png").write_bytes(buf.getvalue())
    one = (R(1, 1), R(0, 1), R(0, 1))
    (bad / "zero-denominator.jpg").write_bytes(gps_jpeg((R(48, 1), R(51, 0), R(0, 1)), "N", one, "E"))
    (bad / "lat91.jpg").write_bytes(gps_jpeg((R(91, 1), R(0, 1), R(0, 1)), "N", one, "E"))
    zero = (R(0, 1), R(0, 1), R(0, 1))
    (bad / "null-island.jpg").write_bytes(gps_jpeg(zero, "N", zero, "E"))
    (bad / "huge.png").write_bytes(png_claiming(60000, 60000))
    # Same bytes as a shared photo under an awkward name: an exact duplicate across sources.
    shutil.copy(gps_photo, bad / "copy of DSCN0010.v2 ünïcode.jpg")
    # The same photo re-encoded smaller: a near duplicate.
    Image.open(gps_photo).resize((320, 240)).save(bad / "DSCN0010 small.jpg", "JPEG", quality=80,
                                                   exif=Image.open(gps_photo).info.get("exif", b""))
    expect = {}
    samples_spec = f"exif:{samples}"
    for e in entries:
        expect[(samples_spec, e["file"])] = {"ok": "ok", "no_gps": "no_gps", "truncated": "truncated",
                                              "null_island": "null_island", "empty": "empty_file"}[e["expected"]]
    bad_spec = f"exif:{bad}"
    expect.update({(bad_spec, name): reason for name, reason in [
        ("zero-byte.jpg", "empty_file"), ("notes.jpg", "not_image"), ("truncated.jpg", "truncated"),
        ("plain.png", "no_exif"), ("zero-denominator.jpg", "gps_zero_denominator"),
        ("lat91.jpg", "lat_out_of_range"), ("null-island.jpg", "null_island"),
        ("huge.png", "decompression_bomb|no_exif"),  # the header alone must stop it
        ("copy of DSCN0010.v2 ünïcode.jpg", "duplicate|ok"), ("DSCN0010 small.jpg", "near_duplicate|ok")]})

    tables = root / "tables"
    tables.mkdir()
    table_images = root / "table_images"
    write_samples(str(table_images), 6, seed=99)
    goods = sorted(p.name for p in table_images.glob("0*.jpg"))
    orient = exif_samples / "orientation"
    rows = [
        {"id": "good-1", "image": f"../table_images/{goods[0]}", "latitude": "-1.2921", "longitude": "36.8219", "cc": "KE"},
        {"id": "namibia", "image": str(table_images / goods[1]), "latitude": "-22.5609", "longitude": "17.0658", "cc": "NA"},
        {"id": "no-coords", "image": f"../table_images/{goods[2]}", "latitude": "", "longitude": "", "cc": ""},
        {"id": "words", "image": f"../table_images/{goods[3]}", "latitude": "north", "longitude": "east", "cc": ""},
        {"id": "nan", "image": f"../table_images/{goods[4]}", "latitude": "NaN", "longitude": "10", "cc": ""},
        {"id": "missing-file", "image": "../table_images/does-not-exist.jpg", "latitude": "10", "longitude": "10", "cc": ""},
        {"id": "url", "image": "https://example.invalid/x.jpg", "latitude": "10", "longitude": "10", "cc": ""},
        {"id": "dup-id", "image": f"../table_images/{goods[5]}", "latitude": "35.6762", "longitude": "139.6503", "cc": "JP"},
        {"id": "dup-id", "image": "../table_images/does-not-exist-2.jpg", "latitude": "35.6762", "longitude": "139.6503", "cc": "JP"},
    ]
    # The 8 EXIF orientations of one landscape and one portrait photo, placed by the table: once
    # turned upright they are one picture, so dedupe must keep one of each and name it for the rest.
    for shape, (lat, lon) in (("landscape", (51.5074, -0.1278)), ("portrait", (40.4168, -3.7038))):
        for k in range(1, 9):
            rows.append({"id": f"{shape}_{k}", "image": str(orient / f"{shape}_{k}.jpg"),
                         "latitude": str(lat), "longitude": str(lon), "cc": ""})
    with open(tables / "list.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"sources": [samples_spec, bad_spec, f"exif:{exif_samples}", f"table:{tables / 'list.csv'}"],
            "expect": expect, "table_rows": rows}
