"""The output directory: checks before a run, files the driver writes, cleanup after.

All through Beam's FileSystems, so OUT may be local or gs://."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
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


MARK = ".mg-geo"         # says "mg-geo made this OUT": only then does a build replace what is in it
LOCK = ".mg-geo.lock"    # held while a build writes OUT: {"pid": ..., "host": ...}

log = logging.getLogger(__name__)


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


def prepare(out: str, overwrite: bool = False) -> None:
    """Make OUT, prove it is writable, and remove a previous build's outputs (only ours).

    An OUT that holds anything but mg-geo's mark is not ours: the build stops unless `overwrite`
    (--overwrite), since a rerun deletes README.md, plots/, meta/ ... and `--out .` in a photo
    folder would have wiped the user's README."""
    claim(out, overwrite)
    stale = [join(out, name) for name in OWNED if FileSystems.exists(join(out, name))]
    if stale:
        FileSystems.delete(stale)


def claim(out: str, overwrite: bool = False) -> None:
    """Check that OUT is ours (or --overwrite), prove it is writable, and mark it as ours."""
    if _is_file(out):
        raise OutError(f"OUT {out} is a file, not a directory")
    check_ours(out, overwrite)
    probe = join(out, f".mg-geo-write-test-{uuid.uuid4().hex}")
    try:
        with FileSystems.create(probe) as stream:
            stream.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise OutError(f"OUT {out} is not writable: {exc}") from exc
    write_text(join(out, MARK), json.dumps({"made_by": "mg-geo", "note": "a build may replace what is "
                                            "in this folder; delete this file to protect it"}) + "\n")


def _entries(out: str) -> list[str]:
    if "://" not in out:
        return os.listdir(out) if os.path.isdir(out) else []
    matched = FileSystems.match([out.rstrip("/") + "/*"], limits=[3])[0].metadata_list
    return [m.path.rstrip("/").rsplit("/", 1)[-1] for m in matched]


def check_ours(out: str, overwrite: bool = False) -> None:
    """OutError when OUT holds files and no mark (and --overwrite was not given)."""
    entries = [e for e in _entries(out) if e not in (LOCK,)]
    if entries and MARK not in entries and not overwrite:
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise OutError(f"OUT {out} is not empty ({shown}) and was not made by mg-geo; a build replaces "
                       f"README.md, plots/, meta/ ... there: choose an empty folder, or pass --overwrite")


@contextlib.contextmanager
def locked(out: str):
    """Hold OUT's lock file (pid and host) while the body runs; a second build stops with OutError.

    Local disks only: the file is made with O_EXCL, and a lock whose process is gone (a killed
    build) is taken over. On gs:// and other object stores there is no create-if-absent through
    Beam's FileSystems, so no lock is taken and a warning says so: two builds into one bucket
    path must be kept apart by the user. Re-entrant in one process (build --download, then the build)."""
    if "://" in out:
        log.warning("OUT %s is on an object store: it is not locked; run one build at a time into it", out)
        yield
        return
    if _is_file(out):
        raise OutError(f"OUT {out} is a file, not a directory")
    path = os.path.join(out, LOCK)
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder == mine:
                yield  # this process holds it already
                return
            if holder is not None and _alive(holder):
                raise OutError(f"OUT {out} is in use by another build (pid {holder['pid']} on "
                               f"{holder['host']}, lock file {path}); wait for it or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a dead build's lock
            continue
        except OSError as exc:
            raise OutError(f"OUT {out} is not writable: {exc}") from None
        with os.fdopen(fd, "w") as stream:
            json.dump(mine, stream)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _lock_holder(path: str):
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None  # half written or gone: treated as stale


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so it holds the lock
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


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
