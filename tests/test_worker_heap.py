"""Stage setup freezes the garbage collector's view of a worker's heap, in SDK workers only."""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.beam_stage import ApplyStage, settle_worker_heap
from pipeline.build import default_runner
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


def test_frozen_in_a_beam_sdk_worker_after_stage_setup(tmp_path, monkeypatch):
    # The worker process unpickles this module's stage and function: it must find the module.
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    args = ["--direct_num_workers=1", "--direct_running_mode=multi_processing"]
    with beam.Pipeline(runner=default_runner(args), options=PipelineOptions(args)) as p:
        kept, _ = p | beam.Create([1]) | ApplyStage(_Echo())
        _ = (kept | beam.Map(_frozen_here)
             | beam.io.WriteToText(str(tmp_path / "frozen"), shard_name_template=""))
    seen = json.loads((tmp_path / "frozen").read_text())
    assert seen["frozen"] > 10_000  # Beam and our modules, at least
