"""The build's plots (pipeline.stats) drawn by a forked helper process that got ready while the job ran.

After the job, the plots cost a local 20k-photo build ~0.9 s on one core: matplotlib's import,
the country outlines and the first figure's fonts (~0.45 s), then four figures drawn one after
the other. Where the build may fork (pipeline.forked_workers.may_fork) and OUT is local, a helper
is forked before the job's graph is made: it does the ~0.45 s while the build's process makes the
graph (the other core is idle then), waits, and after the job draws the world map in a fork of
itself while it draws the other figures. Any failure of the helper (it died, or drawing raised)
makes the build draw the plots itself, as it does where there is no helper, so an error is
raised as it always was.
"""
from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import traceback
from typing import Optional

from pipeline import forked_workers, stats

log = logging.getLogger(__name__)


def warm_up() -> None:
    """What the first plot of a process pays before it draws: imports, outlines, fonts."""
    fig = stats._figure(4, 3)
    ax = fig.add_subplot()
    ax.scatter([0, 1], [0, 1], s=12, label="a")
    bars = ax.barh(["one", "two"], [1, 2])
    ax.bar_label(bars, fontsize=8)
    ax.set_title("warm-up")
    ax.legend(title="t")
    fig.savefig(io.BytesIO(), format="png", dpi=stats.DPI)
    stats.country_outlines()


def draw_two_at_a_time(out: str, report: dict) -> list[str]:
    """stats.make_plots, the first (largest: the world map) figure drawn by a fork of this process."""
    jobs = stats.plot_jobs(out, report)
    if len(jobs) < 2:
        return [stats.save_plot(out, job) for job in jobs]

    def draw_first() -> int:
        stats.save_plot(out, jobs[0])
        return 0

    pid = forked_workers.fork_child(draw_first)
    rest = [stats.save_plot(out, job) for job in jobs[1:]]
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"drawing {jobs[0][0]} failed (exit status {os.waitstatus_to_exitcode(status)})")
    return [f"{stats.PLOTS_DIR}/{jobs[0][0]}"] + rest


def _serve(requests_fd: int, answers_fd: int) -> None:
    # The inherited heap (Beam, the stages, a caller's objects) is left alone by this process's
    # collector, as in a forked worker: matplotlib's drawing made it walk all of it again and
    # again (the plots took 0.6 s instead of 0.4 s in a process that had not frozen its heap).
    gc.freeze()
    try:
        warm_up()
        ready = None
    except BaseException:  # noqa: BLE001 - reported when the plots are asked for
        ready = traceback.format_exc()
    with os.fdopen(requests_fd, "rb") as requests:
        try:
            out, report = pickle.load(requests)
        except EOFError:
            return  # the build ended without asking (it failed)
    if ready is None:
        try:
            answer = ("ok", draw_two_at_a_time(out, report))
        except BaseException:  # noqa: BLE001 - the build draws again and raises it as its own
            answer = ("error", traceback.format_exc())
    else:
        answer = ("error", ready)
    with os.fdopen(answers_fd, "wb") as answers:
        pickle.dump(answer, answers)


class Plotter:
    """The helper process. `make_plots(out, report)` once; `close()` in every case."""

    def __init__(self, close_in_child: list[int] = ()):
        requests_read, requests_write = os.pipe()
        answers_read, answers_write = os.pipe()

        def serve() -> int:
            for fd in (requests_write, answers_read, *close_in_child):
                os.close(fd)  # held open here, a pipe of the parent's would never reach EOF
            _serve(requests_read, answers_write)
            return 0

        self.pid = forked_workers.fork_child(serve)
        os.close(requests_read)
        os.close(answers_write)
        self._requests = os.fdopen(requests_write, "wb")
        self._answers = os.fdopen(answers_read, "rb")

    def make_plots(self, out: str, report: dict) -> list[str]:
        answer: Optional[tuple] = None
        try:
            pickle.dump((out, report), self._requests)
            self._requests.close()
            answer = pickle.load(self._answers)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            log.warning("the plots' process ended early (%s); drawing them here", exc)
        finally:
            self.close()
        if answer is not None and answer[0] == "ok":
            return answer[1]
        if answer is not None:
            log.warning("the plots' process failed; drawing them here:\n%s", answer[1])
        return stats.make_plots(out, report)

    def close(self) -> None:
        if self.pid is None:
            return
        for stream in (self._requests, self._answers):
            stream.close()
        os.waitpid(self.pid, 0)
        self.pid = None
