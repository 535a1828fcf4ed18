from __future__ import annotations

import posixpath
from typing import Iterable, Optional

from apache_beam.io.filesystems import FileSystems

from pipeline.core.errors import BadArgument
from pipeline.core.record import Record, Reject

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


class SourceError(BadArgument):
    """A bad argument (missing directory, unreadable table): the build stops before any work."""


class Source:
    kind = ""

    def __init__(self, spec: str, location: str, options: dict):
        self.spec = spec
        self.location = location
        self.options = options

    def check(self) -> None:
        raise NotImplementedError

    def units(self) -> Iterable[str]:
        raise NotImplementedError

    def records(self, unit: str) -> Iterable[tuple[Record, Optional[Reject]]]:
        raise NotImplementedError


def is_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in ("http", "https", "ftp")


def join(base: str, relative: str) -> str:
    """Join with '/', as FileSystems paths (local or gs://) use it."""
    return FileSystems.join(base, relative) if "://" in base else posixpath.join(base, relative)


def relative_to(root: str, path: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path
