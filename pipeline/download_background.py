"""`build --download` on the local runner: img2dataset fetches in a forked child while the build
reads each shard as soon as img2dataset has finished it.

Downloading first and building after left a core idle for most of the download's start (the
img2dataset import, ~2 s) and of the build's (Beam's graph, its workers), and the build's CPU
work waited for the last URL. img2dataset already marks a finished shard: NNNNN_stats.json is
written after the shard's tar and parquet, so a reader that waits for it never sees half a shard.

- `BackgroundDownload` forks the child (with os.fork, not multiprocessing: the build's own forked
  workers inherit multiprocessing's list of children and would terminate a daemon child, or reap
  it, at their exit), and reports its outcome after the build, as a sequential download would
  before it (`DownloadIncomplete` for shards img2dataset gave up on: rerun to resume).
- `DownloadHelper` is that child, forked when `mg-geo build` starts, before it imports Beam: it
  imports img2dataset (0.9 s) while the build's process imports Beam and prepares the url list
  (1.1 s), then runs the download it is handed. Forked after the preparation, the child began
  fetching 0.8 s later, and on the 2k-photo benchmark (bench/bench_vs_img2dataset.py) the build's
  workers waited for shards most of that time. This module and pipeline.download are Beam-free for
  it (so is pipeline.forking).
- `ShardWait` travels with the wds: source to the build's workers and blocks a shard's reading
  until the shard is finished. The wait is bounded by the child's life: it ends when the shard is
  done, when the child has reported its end (the shard is then missing: DownloadIncomplete), or
  when the child is gone without a report (killed).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from pipeline.download import DownloadIncomplete, PreparedDownload, import_img2dataset, sibling_parquet
from pipeline.forking import fork_child, may_fork, runner_given

log = logging.getLogger(__name__)

POLL_S = 0.02  # a shard of a few hundred photos takes ~0.2 s or more to fetch
STATUS_FILE = "status.json"  # in the prepared download's temporary folder, outside img2dataset's


def _process_running(pid: int) -> bool:
    """The child runs (not ended: a child that ended stays a zombie until the build's process
    reaps it after the job, so its pid is not reused while workers wait). Linux: /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _read_status(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class ShardWait:
    """Waits, in a build worker, for a shard of a download running in the process `pid`."""
    pid: int
    status_path: str

    def wait(self, shard: str) -> None:
        done_marker = sibling_parquet(shard)[: -len(".parquet")] + "_stats.json"
        while not os.path.exists(done_marker):
            status = _read_status(self.status_path)
            if status is not None or not _process_running(self.pid):
                if os.path.exists(done_marker):  # finished just before the download ended
                    return
                why = (status or {}).get("error") or \
                    f"the download process {self.pid} ended without a report (killed?)"
                raise DownloadIncomplete(f"img2dataset did not finish {shard}: {why}")
            time.sleep(POLL_S)


def _child(download: PreparedDownload, status_path: str) -> int:
    """The forked child: run the download, write its outcome where the workers and the parent
    read it (written to a temporary name, then renamed: a reader sees all of it or nothing)."""
    status = {"ok": False}
    try:
        status = {"ok": True, "summary": download.run()}
    except DownloadIncomplete as exc:
        status["error"] = str(exc)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        status["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    partial = status_path + ".partial"
    with open(partial, "w") as f:
        json.dump(status, f)
    os.replace(partial, status_path)
    return 0 if status["ok"] else 1


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class DownloadHelper:
    """A child forked early (see the module docstring) that imports img2dataset, then waits on a
    pipe for the one download it runs (`hand_over`); closing the pipe unused (`dismiss`) ends it."""

    def __init__(self):
        read_fd, self._write_fd = os.pipe()
        self._reaped = False  # reaped by close(), or by the BackgroundDownload it is handed to
        self.pid = fork_child(lambda: self._main(read_fd))
        os.close(read_fd)
        _own_group(self.pid)

    def _main(self, read_fd: int) -> int:
        os.setpgid(0, 0)  # a group of its own with img2dataset's processes: stop() ends them all
        os.close(self._write_fd)
        os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # as img2dataset_download sets it
        os.environ.setdefault("WANDB_MODE", "disabled")
        try:
            import_img2dataset()
        except ImportError:
            pass  # the download raises it again and reports it, as a child forked later would
        job = _read_all(read_fd)
        os.close(read_fd)
        if not job:
            return 0  # dismissed
        # Forked inside the command line's pause of the collector (pipeline.gc_pause): a long
        # download must collect its cycles; the imports, frozen, are not walked again.
        gc.freeze()
        gc.enable()
        download, status_path = pickle.loads(job)
        return _child(download, status_path)

    def hand_over(self, download: PreparedDownload, status_path: str) -> bool:
        """Give the helper its download; False (the helper reaped) where it is gone."""
        view = memoryview(pickle.dumps((download, status_path)))
        try:
            if not _process_running(self.pid):  # a process it started may still hold the pipe
                raise BrokenPipeError("it has ended")
            while view:
                view = view[os.write(self._write_fd, view):]
        except OSError as exc:  # it died (killed) before its download
            log.warning("the download's early process %d is gone (%s): forking another", self.pid, exc)
            self.close()
            return False
        self._reaped = True  # BackgroundDownload joins it
        self.dismiss()
        return True

    def dismiss(self) -> None:
        """Close the pipe: a helper not handed a download ends."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def close(self) -> None:
        """Dismiss the helper if it was not handed a download, and reap it."""
        self.dismiss()
        if not self._reaped:
            self._reaped = True
            os.waitpid(self.pid, 0)


def start_helper(download_requested: bool, sources: list[str], beam_args: list[str]) -> Optional[DownloadHelper]:
    """The helper when `build --download` will likely run a download beside the build (a table
    source, the local runner, no dry run, forking allowed); None otherwise. The build decides for
    good later (commands.build.download_tables) and dismisses a helper it does not use."""
    if not download_requested or not any(spec.startswith("table:") for spec in sources) \
            or runner_given(beam_args) or any(arg.startswith("--dry_run") for arg in beam_args) \
            or not may_fork("the download's process", otherwise="is not forked before Beam's import"):
        return None
    return DownloadHelper()


def _own_group(pid: int) -> None:
    try:
        os.setpgid(pid, pid)  # also here: stop() may come before the child's own call
    except OSError:
        pass  # the child has done it, or has already ended


class BackgroundDownload:
    """A prepared download run in a forked child (the early `helper` when given). `wait` goes to
    the wds: source of its shards; `finish()` joins the child and returns the summary or raises
    DownloadIncomplete."""

    def __init__(self, download: PreparedDownload, helper: Optional[DownloadHelper] = None):
        self.download = download
        self.status_path = os.path.join(download.tmp, STATUS_FILE)
        if helper is not None and helper.hand_over(download, self.status_path):
            self.pid = helper.pid
        else:
            self.pid = fork_child(self._in_child)
            _own_group(self.pid)
        self.wait = ShardWait(self.pid, self.status_path)
        self.exit_code: Optional[int] = None
        log.info("downloading %s in process %d while the build reads its finished shards",
                 download.spec, self.pid)

    def _in_child(self) -> int:
        # A group of its own with img2dataset's processes, so that stop() ends them all.
        os.setpgid(0, 0)
        return _child(self.download, self.status_path)

    def _join(self) -> int:
        if self.exit_code is None:
            _, status = os.waitpid(self.pid, 0)
            self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def failed(self) -> Optional[str]:
        """Why the download failed, once it has ended and said so (None: not failed, or still running)."""
        status = _read_status(self.status_path)
        return None if status is None or status["ok"] else status["error"]

    def finish(self) -> dict:
        code = self._join()
        status = _read_status(self.status_path)
        if status is None:
            raise DownloadIncomplete(f"the download of {self.download.spec} (process {self.pid}) "
                                     f"ended with status {code} and no report")
        if not status["ok"]:
            raise DownloadIncomplete(status["error"])
        return status["summary"]

    def stop(self) -> None:
        """End the child and img2dataset's processes if they still run (the build failed or was
        interrupted: Ctrl-C reaches only the build's process group), and reap the child."""
        if self.exit_code is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # ended, group and all
            self._join()
