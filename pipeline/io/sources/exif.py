"""`exif:DIR` — photos under DIR (recursively); coordinates come from their EXIF GPS tags.

Every file named like a photo is an input, whatever becomes of it: a sample, or a ledger row with
a precise reason (`unsupported_format` for HEIC/HEIF, `broken_symlink`, `symlink_loop`,
`folder_unreadable` for a folder that could not be listed). Symlinked folders are followed once.
"""
from __future__ import annotations

import errno
import os

from apache_beam.io.filesystems import FileSystems

from pipeline.core.record import Record, Reject, make_key
from pipeline.io.sources.base import IMAGE_EXTENSIONS, Source, SourceError, relative_to

UNITS_WANTED = 256   # batches to aim for: plenty to spread over workers
MAX_PER_UNIT = 1000  # photos per batch at most, so a retried unit redoes little
# Named like photos but not decoded here: Pillow has no HEIF codec, and pillow-heif's current
# release needs a newer Pillow than the one pinned; each such file is one ledger row saying so.
UNSUPPORTED = {".heic": "HEIC", ".heif": "HEIF"}
PHOTO_EXTENSIONS = IMAGE_EXTENSIONS + (".gif", ".avif") + tuple(UNSUPPORTED)


def _photo_like(name: str) -> bool:
    return name.lower().endswith(PHOTO_EXTENSIONS)


def walk_local(root: str) -> list:
    """Sorted entries under a local `root`: a path (a photo file to read) or (path, reason,
    detail) for an input that is a ledger row from the start. Symlinked folders are followed,
    each real folder once, so a link to an ancestor is no loop."""
    entries: list = []
    walked: set[str] = set()

    def visit(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in walked:
            return
        walked.add(real)
        try:
            with os.scandir(folder) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            entries.append((folder, "folder_unreadable", f"cannot list {folder}: {exc.strerror or exc}"))
            return
        for entry in children:
            path = entry.path
            try:
                is_dir = entry.is_dir()  # follows a symlink
                is_file = entry.is_file()
                is_link = entry.is_symlink()
            except OSError as exc:  # a symlink loop (ELOOP) or a file gone meanwhile
                if _photo_like(entry.name):
                    entries.append((path, *(_bad_link(path) if os.path.islink(path) else
                                            ("unreadable", f"cannot stat {path}: {exc.strerror or exc}"))))
                continue
            if is_dir:
                visit(path)
            elif is_link and not is_file and _photo_like(entry.name):
                entries.append((path, *_bad_link(path)))
            elif is_file and _photo_like(entry.name):
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in UNSUPPORTED:
                    entries.append((path, "unsupported_format",
                                    f"{UNSUPPORTED[ext]}: this build decodes no {UNSUPPORTED[ext]} "
                                    f"(convert to JPEG first, e.g. with `heif-convert`)"))
                else:
                    entries.append(path)
    visit(root.rstrip("/") or "/")
    return sorted(entries, key=lambda e: e if isinstance(e, str) else e[0])


def _bad_link(path: str) -> tuple[str, str]:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink_loop", f"{path} is a symlink that leads back to itself"
        return "broken_symlink", f"{path} points to {os.readlink(path)!r}, which does not exist"
    return "unreadable", f"{path} is a symlink to something that is not a file"


class ExifSource(Source):
    kind = "exif"

    def check(self):
        if not FileSystems.exists(self.location):
            raise SourceError(f"exif source directory does not exist: {self.location}")
        if "://" not in self.location:
            if not os.path.isdir(self.location):
                raise SourceError(f"exif source is not a directory: {self.location}")
            return
        # limits=[1]: one entry is enough (Beam's local match walks the whole tree, two stats a file).
        if not FileSystems.match([self.location.rstrip("/") + "/*"], limits=[1])[0].metadata_list and \
                not FileSystems.exists(self.location.rstrip("/") + "/"):
            raise SourceError(f"exif source is not a directory: {self.location}")

    def units(self):
        """Batches of sorted entries (tuples): a unit per photo made the job graph and the
        runner's first shuffle hold one element per photo (bench/bench_memory.py); ~UNITS_WANTED
        batches still spread over any number of workers the local runner has."""
        # Files that are not named like photos (READMEs, sidecars) are not inputs; files named
        # like photos are, whatever they hold: a text file called x.jpg is rejected with a reason.
        if "://" in self.location:
            pattern = self.location.rstrip("/") + "/**"
            paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list
                           if _photo_like(m.path))
        else:
            paths = walk_local(self.location)
        per_unit = min(MAX_PER_UNIT, max(1, -(-len(paths) // UNITS_WANTED)))
        for start in range(0, len(paths), per_unit):
            yield tuple(paths[start:start + per_unit])

    def records(self, entries):
        for entry in entries:
            path, reject = (entry, None) if isinstance(entry, str) else (entry[0], Reject(entry[1], entry[2]))
            input_id = relative_to(self.location, path)
            yield Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                         image_path=path, coords_raw={"kind": "exif"}), reject
