"""`exif:DIR` — photos under DIR (recursively); coordinates come from their EXIF GPS tags."""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from pipeline.core.record import Record, make_key
from pipeline.io.sources.base import IMAGE_EXTENSIONS, Source, SourceError, relative_to


UNITS_WANTED = 256   # batches to aim for: plenty to spread over workers
MAX_PER_UNIT = 1000  # photos per batch at most, so a retried unit redoes little


class ExifSource(Source):
    kind = "exif"

    def check(self):
        if not FileSystems.exists(self.location):
            raise SourceError(f"exif source directory does not exist: {self.location}")
        # limits=[1]: one entry is enough (Beam's local match walks the whole tree, two stats a file).
        if not FileSystems.match([self.location.rstrip("/") + "/*"], limits=[1])[0].metadata_list and \
                not FileSystems.exists(self.location.rstrip("/") + "/"):
            raise SourceError(f"exif source is not a directory: {self.location}")

    def units(self):
        """Batches of sorted photo paths (tuples): a unit per photo made the job graph and the
        runner's first shuffle hold one element per photo (bench/bench_memory.py); ~UNITS_WANTED
        batches still spread over any number of workers the local runner has."""
        # Files that are not named like images (READMEs, sidecars) are not inputs; files named
        # like images are, whatever they hold: a text file called x.jpg is rejected with a reason.
        pattern = self.location.rstrip("/") + "/**"
        paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list
                       if m.path.lower().endswith(IMAGE_EXTENSIONS))
        per_unit = min(MAX_PER_UNIT, max(1, -(-len(paths) // UNITS_WANTED)))
        for start in range(0, len(paths), per_unit):
            yield tuple(paths[start:start + per_unit])

    def records(self, paths):
        for path in paths:
            input_id = relative_to(self.location, path)
            yield Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                         image_path=path, coords_raw={"kind": "exif"}), None
