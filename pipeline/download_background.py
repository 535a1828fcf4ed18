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
- `ShardWait` travels with the wds: source to the build's workers and blocks a shard's reading
  until the shard is finished. The wait is bounded by the child's life: it ends when the shard is
  done, when the child has reported its end (the shard is then missing: DownloadIncomplete), or
  when the child is gone without a report (killed).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from pipeline import forked_workers
from pipeline.download import DownloadIncomplete, PreparedDownload, sibling_parquet

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


class BackgroundDownload:
    """A prepared download run in a forked child. `wait` goes to the wds: source of its shards;
    `finish()` joins the child and returns the summary or raises DownloadIncomplete."""

    def __init__(self, download: PreparedDownload):
        self.download = download
        self.status_path = os.path.join(download.tmp, STATUS_FILE)
        self.pid = forked_workers.fork_child(self._in_child)
        try:
            os.setpgid(self.pid, self.pid)  # also here: stop() may come before the child's own call
        except OSError:
            pass  # the child has done it, or has already ended
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
