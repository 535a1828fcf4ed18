"""pipeline.balanced_runner: a step's input goes out in parts that the workers take as they finish.

Two multi_processing workers (fresh interpreters: this test process has threads and does not
fork) note which process ran each element; the first worker to start is made slow, as a busier
CPU or heavier inputs make a worker slow in a real build.
"""
from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from fresh_process import TESTS, child_env
from pipeline.balanced_runner import FINE_PARTS_PER_WORKER, BalancedFnApiRunner, guided_sizes, plan_parts

N = 400
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


class _Note(beam.DoFn):
    """Appends "pid bundle element" lines to DIR/seen.<pid>; the worker that creates DIR/slow
    first sleeps `slow_s` per element."""

    def __init__(self, where: str, slow_s: float = 0.0, fail_on: int | None = None):
        self.where, self.slow_s, self.fail_on = where, slow_s, fail_on

    def setup(self):
        try:
            os.close(os.open(os.path.join(self.where, "slow"), os.O_CREAT | os.O_EXCL))
            self.slow = True
        except FileExistsError:
            self.slow = False
        self.bundles = 0

    def start_bundle(self):
        self.bundles += 1

    def process(self, element):
        if element == self.fail_on:
            raise ValueError(f"element {element} is bad")
        if self.slow:
            time.sleep(self.slow_s)
        with open(os.path.join(self.where, f"seen.{os.getpid()}"), "a") as f:
            f.write(f"{os.getpid()} {self.bundles} {element}\n")
        yield element


@pytest.fixture(autouse=True)
def workers_import_this_module(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", child_env(TESTS)["PYTHONPATH"])


def _run(where: Path, **note) -> list[tuple[int, int, int]]:
    with beam.Pipeline(runner=BalancedFnApiRunner(), options=PipelineOptions(TWO_WORKERS)) as p:
        _ = (p | beam.Create(list(range(N))) | beam.Reshuffle() | beam.ParDo(_Note(str(where), **note)))
    return [tuple(map(int, line.split())) for f in where.glob("seen.*") for line in f.read_text().splitlines()]


def test_each_element_once_in_more_parts_than_workers_and_a_slow_worker_takes_fewer(tmp_path):
    seen = _run(tmp_path, slow_s=0.005)
    assert sorted(element for _, _, element in seen) == list(range(N))
    bundles = collections.Counter((pid, bundle) for pid, bundle, _ in seen)
    assert 2 < len(bundles) <= len(guided_sizes(2 * FINE_PARTS_PER_WORKER, 2))
    # The parts shrink as the step goes on: the last ones are a fine part each (N/32 = 12-13).
    assert max(bundles.values()) >= 4 * min(bundles.values()) and min(bundles.values()) <= 13
    per_worker = collections.Counter(pid for pid, _, _ in seen)
    assert len(per_worker) == 2
    # Beam's own manager gives each worker half the elements, whatever their speed.
    slow, fast = sorted(per_worker.values())
    assert fast > 2 * slow, per_worker


def test_parts_shrink_to_one_fine_part_and_cover_all():
    for n, workers in ((32, 2), (64, 4), (16, 1), (1, 2), (5, 8)):
        sizes = guided_sizes(n, workers)
        assert sum(sizes) == n and sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert guided_sizes(32, 2) == [8, 6, 5, 4, 3, 2, 1, 1, 1, 1]


def test_largest_fine_parts_go_out_first_and_each_chunk_once():
    """The writer's step: one shard per fine part, a few big (train) and many small (val, test),
    most fine parts empty. Big ones first, so that a worker never ends on a big one alone."""
    sizes = [30, 2200, 0, 250, 2300, 0, 310, 2250, 260, 0, 2240, 320]
    fine = [{"in": [bytes(n)] if n else []} for n in sizes]
    parts = plan_parts(fine, workers=2)
    taken = [len(chunk) for part in parts for chunk in part["in"]]
    assert sorted(taken) == sorted(n for n in sizes if n)  # every chunk once, no empty fine part
    assert taken == sorted(taken, reverse=True)
    assert [len(part["in"]) for part in parts] == guided_sizes(9, 2)
    assert plan_parts([{"in": []}, {"in": [b""]}], workers=2) == []


def test_a_failing_part_fails_the_job_with_its_error(tmp_path):
    with pytest.raises(Exception, match="element 123 is bad"):
        _run(tmp_path, fail_on=123)
