"""Local multi_processing workers forked from the build's process (pipeline.forked_workers).

The end-to-end check (a forked 2-worker build gives the same corpus as the in-process one, and
so does a build whose workers start afresh) is in test_build_e2e; the heap freeze in a forked
worker in test_worker_heap."""
from __future__ import annotations

import os
import sys
import threading

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from fresh_process import child_env, run_python
from pipeline import forked_workers
from pipeline.forked_workers import ForkedWorkers, pool_size
from pipeline.forking import ENV_SWITCH, fork_blockers

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_unused_children_leave_when_the_pool_closes():
    pool = ForkedWorkers(2)
    pids = [child.pid for child in pool._free]
    assert len(set(pids)) == 2 and all(not _gone(pid) for pid in pids)
    pool.close()
    assert all(_gone(pid) for pid in pids)  # exited on EOF and reaped: no zombie either
    assert pool.id not in forked_workers._POOLS and pool.take() is None


def test_a_running_python_thread_rules_forking_out(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="busy-helper")
    thread.start()
    try:
        assert "thread 'busy-helper'" in fork_blockers()
        assert pool_size(PipelineOptions(MULTI), runner_given=False) == 0
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("args, runner_given, switch", [
    (["--direct_num_workers=2"], False, "1"),                                       # in-process runner
    (["--direct_num_workers=2", "--direct_running_mode=multi_threading"], False, "1"),
    (MULTI, True, "1"),                                                             # --runner=... given
    (MULTI, False, "0"),                                                            # switched off
])
def test_only_our_multi_processing_runner_forks(args, runner_given, switch, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, switch)
    assert pool_size(PipelineOptions(args), runner_given) == 0


def test_a_fresh_build_process_forks_one_child_per_worker():
    """What `mg-geo build` sees before its job starts: no Python or gRPC thread, so it forks.
    (Not checkable in this process, where Beam has run before.)"""
    code = ("import sys; from apache_beam.options.pipeline_options import PipelineOptions; "
            "import pipeline.build; from pipeline.forked_workers import pool_size; from pipeline.forking import fork_blockers; "
            "print(fork_blockers(), pool_size(PipelineOptions(sys.argv[1:]), False))")
    done = run_python(["-c", code, *MULTI], child_env(drop=(ENV_SWITCH,)))
    assert done.stdout.split() == ["[]", "2"]


class _Torch:
    def __init__(self, cuda_initialized: bool):
        self.cuda = type("cuda", (), {"is_initialized": staticmethod(lambda: cuda_initialized)})


@pytest.mark.parametrize("cuda, workers_use_torch, blocked", [
    (False, False, False),  # img2dataset loaded torch; a Meta build's workers never run it
    (False, True, True),    # the LVLM's in-process model: GNU OpenMP would not survive the fork
    (True, False, True),    # a CUDA context never does
])
def test_torch_in_this_process_rules_forking_out_when_it_matters(monkeypatch, cuda, workers_use_torch, blocked):
    monkeypatch.setitem(sys.modules, "torch", _Torch(cuda))
    blockers = [b for b in fork_blockers(workers_use_torch) if "torch" in b or "CUDA" in b]
    assert bool(blockers) == blocked


# A job whose forked worker is killed (as the kernel's out-of-memory killer does) on one element.
_KILLED_WORKER_JOB = r"""
import os, signal, sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline.forked_workers import ForkedWorkers, ForkingFnApiRunner

class KillOn(beam.DoFn):
    def process(self, element):
        if element == 57:
            os.kill(os.getpid(), signal.SIGKILL)
        yield element

with ForkedWorkers(int(sys.argv[1])) as pool:
    with beam.Pipeline(runner=ForkingFnApiRunner(pool), options=PipelineOptions(sys.argv[1:])) as p:
        _ = p | beam.Create(list(range(200))) | beam.Reshuffle() | beam.ParDo(KillOn())
"""  # argv: the pool's size (0: every worker starts as a fresh interpreter), then Beam's flags


@pytest.mark.parametrize("forked", [2, 0], ids=["forked", "fresh"])
def test_a_killed_worker_fails_the_job_with_a_reason_instead_of_hanging(forked):
    # Beam's local runner waits forever for a bundle whose worker died; the build must stop
    # and say why. A hang ends in the timeout below and fails the test.
    import subprocess

    done = subprocess.run([sys.executable, "-c", _KILLED_WORKER_JOB, str(forked), *MULTI], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "died" in done.stderr and "signal 9" in done.stderr, done.stderr[-3000:]
