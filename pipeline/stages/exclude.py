"""Exclude stage: no image of an evaluation benchmark (or a re-encoded, resized copy of one) may
enter the corpus, or a model trained on it would be scored on pictures it has seen.

`mg-geo build --exclude PATH` names the benchmark: a folder of images (searched recursively) or a
.csv/.txt list of image paths, relative to the list's own folder. Before the job, `load_benchmarks`
hashes every benchmark image by running the image stage itself on the file's bytes, so its sha256
and perceptual hash are made exactly as a record's are (the same code path: a second recipe would
drift). The stage, right after the image stage, rejects a record whose sha256 equals a benchmark
image's, or whose phash is within the dedupe radius (Hamming) of one, with reason
`benchmark_overlap`; the detail names the benchmark file and the distance.

The hashes travel pickled with the stage (a dict of sha256s, an array of phashes, the names).
Phashes are matched as dedupe matches them: each 64-bit hash is cut into radius+1 bands
(pipeline.global_steps.dedupe.band_keys); two hashes within the radius agree on a whole band, so a
record is compared only with the benchmark hashes that share one of its bands (an index built
once per worker in setup), which stays fast for tens of thousands of benchmark images.
A benchmark file that cannot be read or that the image stage rejects is skipped and counted:
the image stage would reject the same bytes in the build, so it cannot reach a sample.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.core.errors import BadArgument
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome, Stage
from pipeline.global_steps.dedupe import DEFAULT_RADIUS, popcount, band_keys, band_layout, parse_phash
from pipeline.io.sources.base import IMAGE_EXTENSIONS
from pipeline.stages.image import ImageStage

log = logging.getLogger(__name__)

REASON = "benchmark_overlap"
LIST_EXTENSIONS = (".csv", ".txt")
PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "filepath")


@dataclass
class Benchmarks:
    """Hashes of the benchmark images: sha256 -> index, one phash per image (None: none), names."""
    names: list = field(default_factory=list)       # as the user knows them: path under PATH
    sha256: dict = field(default_factory=dict)      # hex digest -> index into names
    phashes: list = field(default_factory=list)     # 64-bit int or None, by index
    unreadable: int = 0                             # skipped files (warned)

    def __len__(self) -> int:
        return len(self.names)

    def summary(self) -> dict:
        return {"benchmark_images": len(self.names), "unreadable_benchmark_images": self.unreadable}


def benchmark_files(path: str) -> list[tuple[str, str]]:
    """(name, file path) of every benchmark image PATH names: a folder (recursive, image
    extensions only), a .csv/.txt list (paths relative to the list's folder; a csv's path column
    is one named like PATH_COLUMNS, else its first), or one image file. Raises BadArgument for a
    missing path or a list that cannot be read."""
    if os.path.isdir(path):
        found = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    full = os.path.join(folder, name)
                    found.append((os.path.relpath(full, path), full))
        return found
    if not os.path.isfile(path):
        raise BadArgument(f"--exclude {path}: no such folder or file")
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return [(os.path.basename(path), path)]
    if ext not in LIST_EXTENSIONS:
        raise BadArgument(f"--exclude {path}: give a folder of images or a .csv/.txt list of image paths")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
        entries = _csv_paths(text) if ext == ".csv" else [line.strip() for line in text.splitlines()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadArgument(f"--exclude {path}: cannot read the list: {type(exc).__name__}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    return [(entry, os.path.join(base, entry)) for entry in entries if entry and not entry.startswith("#")]


def _csv_paths(text: str) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((header.index(name) for name in PATH_COLUMNS if name in header), None)
    if column is not None:
        rows = rows[1:]
    elif os.path.splitext(rows[0][0].strip())[1].lower() not in IMAGE_EXTENSIONS:
        rows = rows[1:]  # a header without a known path column: the first column is the path
    return [row[column or 0].strip() for row in rows if len(row) > (column or 0)]


def load_benchmarks(paths, image_stage: ImageStage) -> Benchmarks:
    """Hash every benchmark image of every PATH with `image_stage` (the build's own image stage
    settings, so a copied JPEG and a re-encoded one are hashed as the build hashes them)."""
    files = [item for path in paths for item in benchmark_files(path)]  # all paths checked first
    bench = Benchmarks()
    image_stage.setup()
    for name, full in files:
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError as exc:
            bench.unreadable += 1
            log.debug("benchmark image %s not readable: %s", full, exc)
            continue
        outcome = image_stage.safe_process(Record(key="benchmark", source="benchmark", input_id=name,
                                                  image_bytes=data))
        if isinstance(outcome, Reject):
            bench.unreadable += 1
            log.debug("benchmark image %s skipped: %s %s", full, outcome.reason, outcome.detail)
            continue
        index = len(bench.names)
        bench.names.append(name)
        bench.sha256.setdefault(outcome.image["sha256"], index)
        bench.phashes.append(parse_phash(outcome.image.get("phash")))
    if bench.unreadable:
        log.warning("--exclude: %d benchmark files skipped (not readable, or images the image stage "
                    "rejects, which the build rejects too)", bench.unreadable)
    log.info("--exclude: %d benchmark images hashed from %d files", len(bench), len(files))
    return bench


class ExcludeStage(Stage):
    """Reject records whose image is a benchmark image: same sha256, or phash within `radius`."""
    name = "exclude"

    def __init__(self, benchmarks: Benchmarks, radius: int = DEFAULT_RADIUS):
        band_layout(radius)  # a bad radius fails when the graph is built
        self.radius = radius
        self.names = list(benchmarks.names)
        self.sha256 = dict(benchmarks.sha256)
        known = [(i, p) for i, p in enumerate(benchmarks.phashes) if p is not None]
        self.indices = np.array([i for i, _ in known], dtype=np.int64)
        self.phashes = np.array([p for _, p in known], dtype=np.uint64)
        self._bands: Optional[dict] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bands"] = None  # rebuilt in setup: the index is larger than the hashes
        return state

    def setup(self) -> None:
        if self._bands is None:
            bands: dict = {}
            for position, value in enumerate(self.phashes.tolist()):
                for key in band_keys(value, self.radius):
                    bands.setdefault(key, []).append(position)
            self._bands = {key: np.array(v, dtype=np.int64) for key, v in bands.items()}

    def process(self, record: Record) -> Outcome:
        image = record.image or {}
        index = self.sha256.get(image.get("sha256"))
        phash = parse_phash(image.get("phash"))
        if index is not None:
            return Reject(REASON, f"same bytes (sha256) as benchmark image {self.names[index]}")
        if phash is None or not len(self.phashes):
            return record
        self.setup()
        found = [self._bands[key] for key in band_keys(phash, self.radius) if key in self._bands]
        if not found:
            return record
        candidates = np.unique(np.concatenate(found))
        distances = popcount(self.phashes[candidates] ^ np.uint64(phash))
        best = int(np.argmin(distances))
        if int(distances[best]) > self.radius:
            return record
        name = self.names[int(self.indices[candidates[best]])]
        return Reject(REASON, f"near copy of benchmark image {name}: phash hamming {int(distances[best])} "
                              f"(radius {self.radius})")
