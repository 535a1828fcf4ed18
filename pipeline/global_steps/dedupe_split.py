"""Dedupe and split in one pass over the records.

Both are global decisions made from a thin projection of every record (hashes; coordinates) and
applied through side inputs. Applying them one after the other made the runner hold the whole
record collection twice while it waited for each decision (bench/bench_memory.py); here both
plans are made from the same input and applied by one ParDo. The split plan sees duplicates too:
they can only link more cells, never separate two nearby photos.
"""
from __future__ import annotations

import time

import apache_beam as beam

from pipeline.beam.wrapper import BundleCounts, plan_side_input
from pipeline.global_steps.dedupe import METRICS_NAMESPACE, REJECTED, Dedupe, _PartitionFn
from pipeline.global_steps.split import AssignSplit


class _DedupeThenSplit(beam.DoFn):
    def __init__(self, assign: beam.DoFn):
        self.partition, self.assign = _PartitionFn(), assign

    def setup(self):
        self.partition.setup()
        self.assign.setup()
        self.counts = BundleCounts(METRICS_NAMESPACE)  # micros: like every stage, its work time

    def process(self, record, rejects: dict, plan: dict):
        start = time.perf_counter()
        outputs = []
        for out in self.partition.process(record, rejects):
            if isinstance(out, beam.pvalue.TaggedOutput):
                outputs.append(out)
            else:
                outputs += self.assign.process(out, plan)
        self.counts.add_micros_since(start)
        return outputs

    def finish_bundle(self):
        self.partition.finish_bundle()
        self.assign.finish_bundle()
        self.counts.flush()


class DedupeAndSplit(beam.PTransform):
    """records -> (kept records with record.split set, dedupe rejections)."""

    def __init__(self, dedupe: Dedupe, split: AssignSplit):
        super().__init__()
        self.dedupe, self.split = dedupe, split

    def expand(self, records):
        rejects = self.dedupe.plan(records)
        split_plan = self.split.plan(records)
        result = records | "Apply" >> beam.ParDo(
            _DedupeThenSplit(self.split.assign_fn()), plan_side_input(rejects),
            plan_side_input(split_plan)).with_outputs(REJECTED, main="kept")
        return result.kept, result[REJECTED]
