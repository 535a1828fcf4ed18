"""Public geolocation benchmarks as distributed: their ground-truth csv layouts and image folders.

`mg-geo eval --benchmark NAME --images DIR [--ground-truth CSV]` reads one of these. Layouts
(headers are matched case-insensitively; further columns are ignored):

  gws15k, gaea   GAEA's ground truth (github.com/UCF-CRCV/GAEA, evaluations/*/ground-truth):
                 gws15k_citygt.csv   FILE,LAT,LON,CITY,COUNTRY          FILE = the image name
                 im2gps3k_citygt.csv IMG_ID,AUTHOR,LAT,LON,CITY,COUNTRY
                 geode_citygt.csv    file_path,lat,lon,city,country     file_path = relative path
                 (cityguessr/dollarstreet ship no coordinates: refused, nothing to measure)
  im2gps3k       im2gps3k_places365.csv (TIBHannover/GeoEstimation meta/):
                 IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban
                 IMG_ID = the image file name. Older copies of the file (before GeoEstimation
                 commit 5e091c0) name the columns LON,LAT while holding latitude first; such a
                 file fails with a message saying so (pass --lat-column LON --lon-column LAT).
  yfcc4k         yfcc4k_places365.csv: ASSUMED to share im2gps3k_places365's layout (IMG_ID, LAT,
                 LON, ...; it is what Img2Loc / G3 read). The image is IMG_ID, or IMG_ID + ".jpg".
  osv5m          OSV-5M's test.csv (huggingface osv5m/osv5m): id,latitude,longitude,
                 thumb_original_url,country,sequence,...,region,sub-region,city; image
                 DIR/**/{id}.jpg (the images/test/*.zip archives unpacked anywhere under DIR).

Each benchmark has default ground-truth file names, looked for in DIR and its parent when
--ground-truth is not given. --id-column / --lat-column / --lon-column / --country-column /
--region-column / --city-column name the columns of a file in any other layout; a file whose
columns cannot be mapped fails with one line listing the columns it has.

An image is found by the id as a relative path, as a file name anywhere under DIR, or by its
stem with any image extension (ids written without ".jpg"). Ground-truth rows whose image is not
there are skipped and counted (reported as images_missing), never scored as wrong answers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd

from pipeline.evaluate.predictions import (CITY_NAMES, COUNTRY_NAMES, ID_NAMES, LAT_NAMES, LON_NAMES,
                                           REGION_NAMES, SUB_REGION_NAMES, GroundTruth, coordinate_error,
                                           parse_coordinate)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
MAPPING_FLAGS = ("--id-column", "--lat-column", "--lon-column", "--country-column", "--region-column",
                 "--city-column")
FIELDS = ("id", "lat", "lon", "country", "region", "sub_region", "city")
REQUIRED = ("id", "lat", "lon")


@dataclass(frozen=True)
class Layout:
    """Which header names mean which field, for one benchmark (lower case, first match wins)."""
    name: str
    files: tuple                     # default ground-truth file names
    columns: dict                    # field -> accepted header names
    doc: str = ""


_GAEA_IDS = ("file", "img_id", "file_path", "id")
_COMMON = {"country": COUNTRY_NAMES, "region": REGION_NAMES, "sub_region": SUB_REGION_NAMES,
           "city": CITY_NAMES}
BENCHMARKS: dict[str, Layout] = {
    "gws15k": Layout("gws15k", ("gws15k_citygt.csv",),
                     {"id": _GAEA_IDS, "lat": LAT_NAMES, "lon": LON_NAMES, **_COMMON},
                     "GAEA's gws15k_citygt.csv: FILE,LAT,LON,CITY,COUNTRY"),
    "gaea": Layout("gaea", ("gws15k_citygt.csv", "im2gps3k_citygt.csv", "im2gps_citygt.csv", "geode_citygt.csv"),
                   {"id": _GAEA_IDS, "lat": LAT_NAMES, "lon": LON_NAMES, **_COMMON},
                   "any GAEA *_citygt.csv with coordinates (FILE|IMG_ID|file_path, LAT, LON, CITY, COUNTRY)"),
    "im2gps3k": Layout("im2gps3k", ("im2gps3k_places365.csv", "im2gps3k_citygt.csv"),
                       {"id": ("img_id",) + ID_NAMES, "lat": ("lat",), "lon": ("lon",), **_COMMON},
                       "GeoEstimation's im2gps3k_places365.csv: IMG_ID,AUTHOR,LAT,LON,S3_Label,..."),
    "yfcc4k": Layout("yfcc4k", ("yfcc4k_places365.csv",),
                     {"id": ("img_id",) + ID_NAMES, "lat": ("lat",), "lon": ("lon",), **_COMMON},
                     "yfcc4k_places365.csv, assumed in im2gps3k_places365's layout: IMG_ID,AUTHOR,LAT,LON,..."),
    "osv5m": Layout("osv5m", ("test.csv",),
                    {"id": ("id",), "lat": ("latitude",), "lon": ("longitude",), "country": ("country",),
                     "region": ("region",), "sub_region": ("sub-region",), "city": ("city",)},
                    "OSV-5M's test.csv: id,latitude,longitude,thumb_original_url,country,...,region,sub-region,city"),
}


class BenchmarkError(ValueError):
    """The benchmark cannot be read as asked: a one-line message for the user (exit 2)."""


@dataclass
class BenchmarkSample:
    truth: GroundTruth
    image: Path


@dataclass
class Benchmark:
    name: str
    ground_truth: Path
    truths: list[GroundTruth]                                 # every row of the ground truth
    samples: list[BenchmarkSample]                            # the rows whose image was found
    images_missing: list[str] = field(default_factory=list)   # ids without an image under DIR
    columns: dict = field(default_factory=dict)               # field -> header used


def find_ground_truth(layout: Layout, images: Optional[Path]) -> Path:
    """The benchmark's ground-truth file in the images folder or beside it."""
    places = [images, images.parent] if images is not None else [Path(".")]
    for folder in places:
        for name in layout.files:
            if (folder / name).is_file():
                return folder / name
    where = " or ".join(str(p) for p in places)
    raise BenchmarkError(f"--benchmark {layout.name}: no ground truth given and none of "
                         f"{', '.join(layout.files)} in {where}; pass --ground-truth CSV")


def map_columns(header: list[str], layout: Layout, overrides: Optional[dict] = None,
                source: str = "") -> dict:
    """field -> the header it is read from. Overrides (field -> header, from the mapping flags)
    win; a required field that cannot be found is a BenchmarkError listing what the file has."""
    lower = {h.strip().lower(): h for h in header}
    out: dict = {}
    for name in FIELDS:
        wanted = (overrides or {}).get(name)
        if wanted:
            if wanted.strip().lower() not in lower:
                raise BenchmarkError(f"{source}: no column {wanted!r} (given for {name}); columns found: "
                                     f"{', '.join(header)}")
            out[name] = lower[wanted.strip().lower()]
            continue
        for candidate in layout.columns.get(name, ()):
            if candidate in lower:
                out[name] = lower[candidate]
                break
    missing = [name for name in REQUIRED if name not in out]
    if missing:
        raise BenchmarkError(
            f"{source}: not a {layout.name} layout ({layout.doc}): no {'/'.join(missing)} column; columns found: "
            f"{', '.join(header) or '(none)'}; name them with {', '.join(MAPPING_FLAGS)}")
    return out


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_benchmark_truth(path: Path, layout: Layout, overrides: Optional[dict] = None) -> tuple[list[GroundTruth], dict]:
    """The ground-truth rows of a benchmark csv and the column mapping used."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:  # pandas' EmptyDataError / ParserError are ValueErrors
        raise BenchmarkError(f"{path}: cannot read as csv: {exc}") from None
    columns = map_columns(list(frame.columns), layout, overrides, str(path))
    truths, seen = [], set()
    for line, row in enumerate(frame.to_dict("records"), start=2):
        get = {name: _text(row.get(header)) for name, header in columns.items()}
        truth_id = get["id"]
        lat, lon, bad = coordinate_error(get["lat"], get["lon"])
        if bad == "lat_out_of_range" and abs(parse_coordinate(get["lat"])) <= 180 \
                and abs(parse_coordinate(get["lon"]) or 999) <= 90:
            raise BenchmarkError(
                f"{path}:{line}: {columns['lat']}={get['lat']} is no latitude but {columns['lon']}={get['lon']} "
                f"could be: the latitude/longitude columns look swapped (older copies of "
                f"im2gps3k_places365.csv name them LON,LAT); pass --lat-column {columns['lon']} "
                f"--lon-column {columns['lat']}")
        if not truth_id or bad:
            raise BenchmarkError(f"{path}:{line}: {'no id' if not truth_id else bad}")
        if truth_id in seen:
            raise BenchmarkError(f"{path}:{line}: id {truth_id!r} appears twice")
        seen.add(truth_id)
        truths.append(GroundTruth(truth_id, lat, lon, get.get("country", ""), get.get("region", ""),
                                  get.get("sub_region", ""), get.get("city", "")))
    if not truths:
        raise BenchmarkError(f"{path}: no rows")
    return truths, columns


class ImageIndex:
    """Every image file under a folder, findable by relative path, file name or stem."""

    def __init__(self, root: Path):
        self.root = root
        self.by_relative: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, Path] = {}
        for folder, _, names in os.walk(root):
            for name in sorted(names):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = Path(folder) / name
                self.by_relative[path.relative_to(root).as_posix()] = path
                self.by_name.setdefault(name, path)
                self.by_stem.setdefault(os.path.splitext(name)[0], path)

    def find(self, image_id: str) -> Optional[Path]:
        key = image_id.replace("\\", "/").lstrip("./")
        return (self.by_relative.get(key) or self.by_name.get(os.path.basename(key))
                or self.by_stem.get(os.path.basename(key)) or self.by_stem.get(os.path.splitext(os.path.basename(key))[0]))


def load_benchmark(name: str, images: Optional[str], ground_truth: Optional[str] = None,
                   overrides: Optional[dict] = None) -> Benchmark:
    """The benchmark's ground truth, each row paired with its image under `images` (when given)."""
    layout = BENCHMARKS.get(name)
    if layout is None:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    root = Path(images) if images else None
    if root is not None and not root.is_dir():
        raise BenchmarkError(f"--images {images}: not a folder")
    path = Path(ground_truth) if ground_truth else find_ground_truth(layout, root)
    if not path.is_file():
        raise BenchmarkError(f"--ground-truth {path}: no such file")
    truths, columns = read_benchmark_truth(path, layout, overrides)
    bench = Benchmark(name, path, truths, [], columns=columns)
    index = ImageIndex(root) if root is not None else None
    for truth in truths:
        image = index.find(truth.id) if index is not None else None
        if image is None:
            bench.images_missing.append(truth.id)
        else:
            bench.samples.append(BenchmarkSample(truth, image))
    return bench


def iter_images(samples: list[BenchmarkSample], max_side: int = 768) -> Iterator[tuple[BenchmarkSample, Optional[bytes], str]]:
    """(sample, clean JPEG or None, why not) through the corpus' own image stage (upright, RGB,
    metadata stripped so no EXIF GPS reaches the model, longer side <= max_side)."""
    from pipeline.evaluate.assistant import PhotoError, load_photo

    for sample in samples:
        try:
            yield sample, load_photo(sample.image.read_bytes(), max_side=max_side), ""
        except (OSError, PhotoError) as exc:
            yield sample, None, str(exc)


def as_shard_samples(samples: list[BenchmarkSample], unreadable: list[str], max_side: int = 768):
    """Benchmark samples in the form the shard evaluation reads (pipeline.evaluate.shards.ShardSample
    with a record carrying key, lat, lon and the names), so one runner serves both; images that
    cannot be decoded are listed in `unreadable` and left out."""
    from pipeline.evaluate.shards import ShardSample

    for sample, jpeg, why in iter_images(samples, max_side):
        if jpeg is None:
            unreadable.append(f"{sample.truth.id}: {why}")
            continue
        t = sample.truth
        record = {"key": t.id, "lat": t.lat, "lon": t.lon,
                  "location": {"country": t.country, "admin1": t.region, "admin2": t.sub_region, "city": t.city}}
        yield ShardSample(t.id, jpeg, record)
