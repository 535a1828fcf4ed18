"""Forking a child of this process: the one way the build does it (its Beam workers, the plots'
process, a download), and the rule for when it may. Beam-free (standard library only), so that
`mg-geo build --download` can fork its download's process before it imports Beam
(pipeline.download_background)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from typing import Callable

log = logging.getLogger("pipeline.forked_workers")  # the name its log lines have always had

ENV_SWITCH = "MG_GEO_FORK_WORKERS"  # "0": every worker starts as a fresh interpreter


def runner_given(beam_args: list[str]) -> bool:
    """A --runner flag: not the local runner, whose workers, downloads and plots this process forks."""
    return any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args)


def fork_child(target: Callable[[], int]) -> int:
    """Fork a child (a Beam worker, the plots' process, a download): it runs target() and exits
    with the status it returns (1 and a traceback if it raises); the parent gets the child's pid.
    The child leaves with os._exit: the parent's atexit handlers, buffers and final collections
    are not its own. Call it only where may_fork() said yes."""
    sys.stdout.flush()
    sys.stderr.flush()  # unwritten buffers would be written twice, once by each process
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = target()
        except BaseException:  # noqa: BLE001 - reported, then the exit status says it failed
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def may_fork(what: str, workers_use_torch: bool = False, otherwise: str = "start as fresh interpreters") -> bool:
    """Whether this process may fork `what` (Beam's workers, img2dataset's processes) instead of
    starting fresh interpreters: Linux, not switched off (MG_GEO_FORK_WORKERS=0), no fork_blockers
    (logged as the reason when there are)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux") \
            or not hasattr(os, "fork"):
        return False
    blockers = fork_blockers(workers_use_torch)
    if blockers:
        log.info("%s %s: %s", what, otherwise, "; ".join(blockers))
        return False
    return True


def fork_blockers(workers_use_torch: bool = False) -> list[str]:
    """Why this process must not fork its workers (empty: it may).

    - Python threads: a lock one of them holds stays held in the child for good.
    - gRPC's threads: gRPC starts them when a channel or server is first made, and its state
      would be shared with the child; so a process that has run a Beam job before (a test
      session, a notebook) starts its workers afresh.
    - torch, loaded here (img2dataset loads it, so does the LVLM's weights check): a CUDA
      context does not survive a fork, nor does GNU OpenMP's thread pool for a child that runs
      torch too (the clue and dialogue parts' in-process model: workers_use_torch).
    Native helper threads of numpy's BLAS and Arrow's jemalloc run in every build process; both
    libraries re-arm themselves in a forked child (pthread_atfork)."""
    blockers = [f"thread {t.name!r}" for t in threading.enumerate() if t is not threading.current_thread()]
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_initialized():
            blockers.append("CUDA is initialized")
        elif workers_use_torch:
            blockers.append("torch is loaded and the workers may run it")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return blockers + ["/proc/self/task unreadable: threads unknown"]
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue  # the thread has just ended
        if name.startswith(("grpc", "event_engine")):
            blockers.append(f"gRPC thread {name!r}")
    return blockers
