"""Stage setup freezes the garbage collector's view of a worker's heap, in SDK workers only
(started afresh or forked from the build's process)."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from fresh_process import REPO, TESTS, child_env, run_python
from pipeline.beam_stage import ApplyStage, settle_worker_heap
from pipeline.build import default_runner
from pipeline.forked_workers import ForkedWorkers
from pipeline.stage import Stage


class _Echo(Stage):
    name = "echo"

    def process(self, record):
        return record


def _frozen_here(_):
    return json.dumps({"frozen": gc.get_freeze_count()})


def test_not_frozen_outside_a_worker():
    before = gc.get_freeze_count()
    settle_worker_heap()  # pytest's process: freezing would keep its cyclic garbage for good
    assert gc.get_freeze_count() == before


def frozen_in_worker(out: Path, forked: bool, kill_children: bool = False) -> dict:
    """Runs a 1-worker multi_processing job; what its worker saw after stage setup.
    kill_children: the pool's children are killed before the job starts (a fresh worker runs)."""
    args = ["--direct_num_workers=1", "--direct_running_mode=multi_processing"]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ForkedWorkers(1)) if forked else None
        if kill_children:
            for child in pool._free:
                os.kill(child.pid, signal.SIGKILL)
        with beam.Pipeline(runner=default_runner(args, pool), options=PipelineOptions(args)) as p:
            kept, _ = p | beam.Create([1]) | ApplyStage(_Echo())
            _ = (kept | beam.Map(_frozen_here)
                 | beam.io.WriteToText(str(out), shard_name_template=""))
    return {**json.loads(out.read_text()), "forked": pool.started if pool else 0}


def test_frozen_in_a_beam_sdk_worker_after_stage_setup(tmp_path, monkeypatch):
    # The worker process unpickles this module's stage and function: it must find the module.
    monkeypatch.setenv("PYTHONPATH", child_env(TESTS)["PYTHONPATH"])
    seen = frozen_in_worker(tmp_path / "frozen", forked=False)
    assert seen["frozen"] > 10_000  # Beam and our modules, at least


def _in_a_fresh_process(out: Path, **kwargs) -> tuple[dict, str]:
    """frozen_in_worker in a process of its own (this one has run Beam, and so gRPC, before: it
    must not fork); (what the worker saw, the process's stderr)."""
    code = ("import json, sys; from pathlib import Path; import test_worker_heap as t; "
            f"print(json.dumps(t.frozen_in_worker(Path(sys.argv[1]), **{kwargs!r})))")
    done = run_python(["-c", code, str(out)], child_env(TESTS, REPO))
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_frozen_in_a_forked_worker_after_stage_setup(tmp_path):
    seen, _ = _in_a_fresh_process(tmp_path / "frozen", forked=True)
    assert seen["forked"] == 1
    assert seen["frozen"] > 10_000


def test_a_forked_child_that_died_is_replaced_by_a_fresh_worker(tmp_path):
    seen, stderr = _in_a_fresh_process(tmp_path / "frozen", forked=True, kill_children=True)
    assert seen["forked"] == 0 and seen["frozen"] > 10_000  # the job ran, on a fresh interpreter
    assert "is gone" in stderr
