"""`exif:DIR` — photos under DIR (recursively); coordinates come from their EXIF GPS tags."""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from pipeline.record import Record, make_key
from pipeline.sources.base import IMAGE_EXTENSIONS, Source, SourceError, relative_to


class ExifSource(Source):
    kind = "exif"

    def check(self):
        if not FileSystems.exists(self.location):
            raise SourceError(f"exif source directory does not exist: {self.location}")
        if not FileSystems.match([self.location.rstrip("/") + "/*"])[0].metadata_list and \
                not FileSystems.exists(self.location.rstrip("/") + "/"):
            raise SourceError(f"exif source is not a directory: {self.location}")

    def units(self):
        # Files that are not named like images (READMEs, sidecars) are not inputs; files named
        # like images are, whatever they hold: a text file called x.jpg is rejected with a reason.
        pattern = self.location.rstrip("/") + "/**"
        for meta in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
            if meta.path.lower().endswith(IMAGE_EXTENSIONS):
                yield meta.path

    def records(self, path):
        input_id = relative_to(self.location, path)
        yield Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                     image_path=path, coords_raw={"kind": "exif"}), None
