"""What the table-like sources share: the column names they auto-detect, one rule for turning a
parsed value into text, and reading a (possibly compressed) file through Beam's FileSystems."""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import posixpath
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.io.sources.base import SourceError

# Auto-detected column names (compared case-insensitively): table, wds, osv5m and the download.
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "url", "image_url")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
ID_COLUMNS = ("id", "image_id", "key")  # in order of preference: an id column is optional

# Decompressed with the standard library, not Beam's CompressedFile: Beam's ends quietly at a
# truncated gzip stream (the table or shard would just look shorter); the stdlib raises EOFError.
DECOMPRESSORS = {
    ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    ".tgz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    ".bz2": lambda f: bz2.BZ2File(f, mode="rb"),
    ".xz": lambda f: lzma.LZMAFile(f, mode="rb"),
}



def flag(option: str) -> str:
    """The command-line flag that sets a source option (id_column -> --id-column): error texts
    name what the user can type."""
    return {"format": "--table-format"}.get(option, "--" + option.replace("_", "-"))


def find_column(names: list[str], candidates: tuple[str, ...], explicit: Optional[str], role: str,
                option: str, where: str) -> str:
    """The column for `role`: the one named by the user, else the one auto-detected candidate.
    Absence or ambiguity is a bad argument: the message names the columns that were found."""
    if explicit:
        if explicit in names:
            return explicit
        raise SourceError(f"{where}: {flag(option)} {explicit!r} is not a column; columns: {names}")
    found = [name for name in names if name.strip().lower() in candidates]
    if len(found) == 1:
        return found[0]
    problem = f"several {role} columns {found}" if found else f"no {role} column"
    raise SourceError(f"{where}: {problem} (looked for {', '.join(candidates)}); columns: {names}; "
                      f"name the right one with {flag(option)}")


def value_text(value) -> str:
    """Text of one parsed value (parquet nested types, json values); null is the empty text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


class RawAdapter(io.RawIOBase):
    """io.TextIOWrapper needs a full binary stream; a filesystem's handle may only have read()."""

    def __init__(self, handle):
        self.handle = handle

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_decompressed(path: str):
    """A binary read handle on the file's content, gunzipped etc. by its extension."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        opener = DECOMPRESSORS.get(posixpath.splitext(path.lower())[1])
        if opener is None:
            yield raw
        else:
            with opener(raw) as content:
                yield content
