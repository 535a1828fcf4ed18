"""The output directory: checks before a run, files the driver writes, cleanup after.

All through Beam's FileSystems, so OUT may be local or gs://."""
from __future__ import annotations

import contextlib
import json
import threading
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.core.errors import BadArgument
from pipeline.core.record import PARTS

INPUTS_FILE = "_work/inputs.json"      # [[source, count], ...] of every record a source made
PRESENCE_FILE = "_work/presence.json"  # [[[source, part, has_sample], count], ...] at the writer
# What a build owns in OUT and replaces on a rerun. `_cache/` (LVLM answers) is kept on purpose:
# it is what lets a rerun or a resumed run send no request twice.
OWNED = [*PARTS, "_tmp", "_work", "manifest.parquet", "rejected.parquet", "report.json", "README.md", "plots"]


class OutError(BadArgument):
    """A bad OUT argument (not writable, a file, ...): the build stops before any work."""


def join(out: str, *parts: str) -> str:
    return FileSystems.join(out, *parts)


def atomic_write(path: str, write, tmp_dir: str | None = None) -> None:
    """write(stream) into a temporary file, then rename it to `path`: no reader ever sees half a
    file, and a failed write leaves nothing behind. The temporary file lies beside `path`, or in
    `tmp_dir` (the build's OUT/_tmp). A rewrite (a retried bundle) replaces `path`.
    (FileSystems.create makes a local parent directory; object stores have none to make.)"""
    tmp = join(tmp_dir, f"{uuid.uuid4().hex}.partial") if tmp_dir else f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
            write(stream)
        if FileSystems.exists(path):
            FileSystems.delete([path])
        if tmp_dir:
            _ensure_parent(path)  # a rename makes no parent folder
        FileSystems.rename([tmp], [path])
    except BaseException:
        if FileSystems.exists(tmp):
            FileSystems.delete([tmp])
        raise


def _ensure_parent(path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if not FileSystems.exists(parent):
        try:
            FileSystems.mkdirs(parent)  # local directories; object stores have none to make
        except OSError:
            if not FileSystems.exists(parent):  # made by another worker meanwhile
                raise


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def read_text(path: str) -> str:
    with FileSystems.open(path) as stream:
        return stream.read().decode("utf-8")


def prepare(out: str) -> None:
    """Make OUT, prove it is writable, and remove a previous build's outputs (only ours)."""
    probe = join(out, f".mg-geo-write-test-{uuid.uuid4().hex}")
    if _is_file(out):
        raise OutError(f"OUT {out} is a file, not a directory")
    try:
        with FileSystems.create(probe) as stream:
            stream.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise OutError(f"OUT {out} is not writable: {exc}") from exc
    stale = [join(out, name) for name in OWNED if FileSystems.exists(join(out, name))]
    if stale:
        FileSystems.delete(stale)


def _is_file(path: str) -> bool:
    import os
    return "://" not in path and os.path.isfile(path)


def write_json(value, out: str, name: str) -> None:
    """A small value a Beam step gathered (one element) -> OUT/name, which the report reads."""
    write_text(join(out, name), json.dumps(value, indent=1))


def read_json(out: str, name: str, default=None):
    path = join(out, name)
    return json.loads(read_text(path)) if FileSystems.exists(path) else default


def write_counts(counts: list, out: str, name: str) -> None:
    """[(value, count), ...] -> OUT/name, sorted."""
    write_json(sorted(counts), out, name)


def read_counts(out: str, name: str) -> list:
    return read_json(out, name, default=[])


def cleanup_tmp(out: str) -> None:
    for name in ("_tmp", "_work"):
        if FileSystems.exists(join(out, name)):
            FileSystems.delete([join(out, name)])


@contextlib.contextmanager
def cleaning_tmp(out: str):
    """cleanup_tmp in a thread while the body runs; on exit, wait for it and raise what it raised.
    The stash holds every clean JPEG once more; unlinking it frees page cache inside the kernel,
    outside the GIL, so it overlaps the plots instead of adding to the build's wall time."""
    failed: list[BaseException] = []

    def run():
        try:
            cleanup_tmp(out)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=run, name="mg-geo-cleanup", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]
