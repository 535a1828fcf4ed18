"""A small, deterministic input set for trying the pipeline end to end without real photos.

Each good image is a JPEG with real EXIF GPS tags (written with Pillow) at a real populated place
drawn from the geocoder's own place list, jittered by less than 1 km, on every inhabited
continent in turn. The pictures are procedural (gradient, shapes, noise, the place name), made from
a per-image random stream so near-duplicate detection does not merge them. A few deliberately bad
files follow, one of each kind the pipeline must reject. `expected.jsonl` says what each file is.
"""
from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.ExifTags import GPS, IFD, Base
from PIL.TiffImagePlugin import IFDRational

from pipeline.geo.places import load_places, offset_point
from pipeline.geo.polygons import countries_by_code, load_country_index

CONTINENTS = ("Africa", "Asia", "Europe", "North America", "South America", "Oceania")
BAD_KINDS = ("no_gps", "truncated", "null_island", "empty")
EXPECTED_FILE = "expected.jsonl"
MAX_JITTER_KM = 0.9
SECOND_STEPS = 10_000  # GPS seconds are stored as rationals over 10000: ~3e-8 degree steps
JPEG_QUALITY = 90


def write_samples(out_dir: str, n: int, seed: int = 0) -> list[dict]:
    """Write n good JPEGs plus one file of each BAD_KINDS into out_dir, and expected.jsonl.

    Returns one dict per file: file (name in out_dir), lat, lon (None where the file has no GPS),
    expected ("ok" or the bad kind), continent and place (the GeoNames place it was drawn near).
    Same n and seed give byte-identical files."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    pools = _places_by_continent()
    index = load_country_index()
    entries = []
    for i in range(n):
        continent = CONTINENTS[i % len(CONTINENTS)]
        place, lat, lon = _draw_point(rng, pools[continent], continent, index)
        lat, lon = _gps_exact(lat), _gps_exact(lon)
        name = f"{i:04d}_{_slug(place.name)}_{place.cc.lower()}.jpg"
        data = _jpeg(_picture(rng, place.name), _exif(lat, lon, f"{place.name}, {place.cc}"))
        _write(out_dir, name, data)
        entries.append({"file": name, "lat": lat, "lon": lon, "expected": "ok",
                        "continent": continent, "place": place.name})
    entries += _write_bad(out_dir, rng, pools)
    with open(os.path.join(out_dir, EXPECTED_FILE), "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    return entries


def _write_bad(out_dir: str, rng: np.random.Generator, pools: dict) -> list[dict]:
    place = pools["Europe"][int(rng.integers(len(pools["Europe"])))]
    lat, lon = _gps_exact(place.lat), _gps_exact(place.lon)
    out = []
    # A good photo without any GPS tag: the validate stage must say no_gps.
    data = _jpeg(_picture(rng, "no gps"), _exif(None, None, "no GPS"))
    out.append(_bad(out_dir, "no_gps", data, None, None))
    # GPS readable (EXIF comes first in the file) but the picture data is cut off.
    whole = _jpeg(_picture(rng, place.name), _exif(lat, lon, f"{place.name}, {place.cc}"))
    out.append(_bad(out_dir, "truncated", whole[: len(whole) * 6 // 10], lat, lon))
    # (0, 0) is what broken GPS units write; it is open sea off West Africa.
    data = _jpeg(_picture(rng, "null island"), _exif(0.0, 0.0, "null island"))
    out.append(_bad(out_dir, "null_island", data, 0.0, 0.0))
    out.append(_bad(out_dir, "empty", b"", None, None))
    return out


def _bad(out_dir, kind, data, lat, lon) -> dict:
    name = f"bad_{kind}.jpg"
    _write(out_dir, name, data)
    return {"file": name, "lat": lat, "lon": lon, "expected": kind, "continent": "", "place": ""}


def _write(out_dir: str, name: str, data: bytes) -> None:
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)


def _places_by_continent() -> dict[str, list]:
    by_code = countries_by_code()
    pools: dict[str, list] = {c: [] for c in CONTINENTS}
    for place in load_places().rows:
        country = by_code.get(place.cc)
        if country is not None and country.continent in pools:
            pools[country.continent].append(place)
    return pools


def _draw_point(rng, pool, continent, index):
    """A place of the continent and a point < 1 km from it that Natural Earth puts on land in
    that continent (redrawn otherwise), so the geocode stage labels it with that continent."""
    for _ in range(1000):
        place = pool[int(rng.integers(len(pool)))]
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, MAX_JITTER_KM)
        lat, lon = offset_point(place.lat, place.lon, dist * math.cos(angle), dist * math.sin(angle))
        found = index.locate([lat], [lon], 0.0)
        if found.inside[0] and index.countries[found.index[0]].continent == continent:
            return place, lat, lon
    raise RuntimeError(f"no land point found in {continent}")


def _gps_exact(value: float) -> float:
    """The value the EXIF rationals will hold, so expected.jsonl matches the file exactly."""
    steps = round(abs(value) * 3600 * SECOND_STEPS)
    return math.copysign(steps / (3600 * SECOND_STEPS), value) if steps else 0.0


def _dms(value: float) -> tuple:
    steps = round(abs(value) * 3600 * SECOND_STEPS)
    degrees, rest = divmod(steps, 3600 * SECOND_STEPS)
    minutes, seconds = divmod(rest, 60 * SECOND_STEPS)
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(seconds, SECOND_STEPS)


def _exif(lat, lon, description: str) -> Image.Exif:
    exif = Image.Exif()
    exif[Base.Software] = "mg-geo sample"
    exif[Base.ImageDescription] = description
    if lat is not None:
        gps = exif.get_ifd(IFD.GPSInfo)
        gps[GPS.GPSVersionID] = b"\x02\x02\x00\x00"
        gps[GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
        gps[GPS.GPSLatitude] = _dms(lat)
        gps[GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
        gps[GPS.GPSLongitude] = _dms(lon)
    return exif


def _jpeg(picture: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=JPEG_QUALITY, exif=exif)
    return buf.getvalue()


def _picture(rng: np.random.Generator, label: str) -> Image.Image:
    """Gradient + random shapes + noise + the label: every image different in layout, not just
    in colour, so perceptual hashes stay far apart."""
    width, height = (int(v) for v in rng.integers(320, 641, size=2))
    top, bottom = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - t) + bottom * t) * np.ones((1, width, 1))
    pixels += rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    draw.text((10, height - 30), label, fill=(255, 255, 255), font=ImageFont.load_default(size=18))
    return image


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:30] or "place"
