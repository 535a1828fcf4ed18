"""WebDataset shards read with the standard library's tarfile, grouped into samples exactly as
webdataset's own `tariterators` group them: the same key/extension split of member names,
lowercased extensions, `__*__` metadata members and non-regular members skipped, consecutive
members with one key forming a sample, and a repeated extension within a sample an error.

Why not webdataset itself: `import webdataset` imports torch whenever torch is installed (~2 s
and ~300 MB in each process), and a `wds:` build reads shards in every worker. The writer side
(pipeline.io.tar_writer) avoids it for the same reason. tests/test_tar_reader.py reads the same
shards, broken ones included, with both and compares.
"""
from __future__ import annotations

import re
import tarfile
from typing import IO, Iterable, Iterator

# webdataset.tariterators.base_plus_ext: the key is everything up to the first dot of the last
# path component; the extension is the rest ("a/b.seg.png" -> ("a/b", "seg.png")).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIPPED_META = re.compile(r"__[^/]*__($|/)")


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member, in archive order, reading the tar as a stream."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            name = info.name
            if not info.isreg() or name is None:
                continue
            if _SKIPPED_META.match(name):  # also covers top-level "__x__" names
                continue
            yield name, tar.extractfile(info).read()
            tar.members = []  # a stream of millions of members must not keep their headers


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Members -> samples {"__key__": key, ext: bytes, ...}; raises ValueError on a repeated
    extension within one sample, as webdataset does."""
    current = None
    for name, data in members:
        match = _KEY_EXT.match(name)
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {list(current)}")
        current[ext] = data
    if current is not None:
        yield current
