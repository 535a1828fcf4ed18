"""The one Beam wrapper every stage goes through: counters, timing, progress log, ledger output."""
from __future__ import annotations

import gc
import logging
import sys
import time
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from pipeline.record import Reject, Rejection
from pipeline.stage import Stage, iter_outcomes

REJECTED = "rejected"
METRIC_PREFIX = "mg_geo."
PROGRESS_EVERY_S = 10.0
SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"
log = logging.getLogger(__name__)


def settle_worker_heap() -> None:
    """gc.freeze() in a Beam SDK worker process, once a DoFn's heavy state is loaded.

    A worker's heap after setup (Beam itself, our modules, the geocoder's tables) lives until the
    process ends. Frozen, the collector no longer walks it, and the process no longer spends
    ~0.4-0.6 s in its final collections when the runner shuts it down (measured: `import
    apache_beam` alone leaves 0.40 s of interpreter exit, 0.04 s frozen), which the local runner
    pays once per worker, one worker after the other. Only in a worker process (Dataflow, Flink,
    Spark and the local multi_processing runner start `python -m ...sdk_worker_main`; the build
    forks its own: pipeline.forked_workers): in the driver or a test process, freezing would keep
    whatever cyclic garbage exists right then."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    forked = sys.modules.get("pipeline.forked_workers")
    if (spec is not None and spec.name == SDK_WORKER_MAIN) or getattr(forked, "IN_FORKED_WORKER", False):
        gc.freeze()


class _Tally:
    """One stage's counts and time in a worker: summed here and handed to Beam's counters once
    per bundle (an inc per element and counter was ~4% of a worker's time on the 20k build), and
    logged as progress while the job runs (metrics are only queryable from the result afterwards)."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.ns = METRIC_PREFIX + stage.name
        self.pending: Counter = Counter()  # counter name -> not yet handed to Beam
        self.micros = 0.0
        self.local = {"in": 0, "out": 0, "rejected": 0}  # this worker's, for the progress log
        self.last_log = time.monotonic()

    def run(self, records: list) -> tuple[list, list]:
        """(records that go on, rejections) for `records` through the stage."""
        stage = self.stage
        start = time.perf_counter()
        outcomes = list(iter_outcomes(stage, records))
        self.micros += (time.perf_counter() - start) * 1e6
        kept, rejected = [], []
        for record, outcome in outcomes:
            if isinstance(outcome, Reject):
                rejected.append(Rejection.of(record, stage.name, outcome, stage.part))
                self.pending["reason." + outcome.reason] += 1
                if stage.part:  # only this part lacks a sample; the record goes on
                    kept.append(record)
            else:
                kept.append(outcome)
        for name, n in (("in", len(records)), ("out", len(outcomes) - len(rejected)), ("rejected", len(rejected))):
            self.pending[name] += n
            self.local[name] += n
        self._maybe_log_progress()
        return kept, rejected

    def flush(self) -> None:
        """Hand the sums to Beam (call in finish_bundle: the bundle's metrics are reported after it)."""
        self.pending["micros"] += int(self.micros)
        self.micros -= int(self.micros)
        for name, n in self.pending.items():
            if n:
                Metrics.counter(self.ns, name).inc(n)
        self.pending.clear()

    def _maybe_log_progress(self):
        # Checked per call, not per bundle: the local runner gives a stage one huge bundle.
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_EVERY_S:
            self.last_log = now
            log.info("stage %-9s in=%d out=%d rejected=%d (this worker)", self.stage.name,
                     self.local["in"], self.local["out"], self.local["rejected"])


def _rejected(rejections: list):
    return [beam.pvalue.TaggedOutput(REJECTED, r) for r in rejections]


class _StageDoFn(beam.DoFn):
    """One stage (its elements already batched when it asks for batches), with a side input."""

    def __init__(self, stage: Stage):
        self.stage = stage  # config only until setup(): heavy state is never pickled with the graph

    def setup(self):
        self.stage.setup()
        self.tally = _Tally(self.stage)
        self.side_input = None
        settle_worker_heap()

    def process(self, element, side_input=None):
        if side_input is not None and side_input is not self.side_input:
            self.side_input = side_input  # the same object for every element of a bundle
            self.stage.use_side_input(side_input)
        kept, rejected = self.tally.run(element if self.stage.batch_size else [element])
        return kept + _rejected(rejected)

    def finish_bundle(self):
        self.tally.flush()

    def teardown(self):
        self.stage.teardown()


class _StageChainDoFn(beam.DoFn):
    """Stages run one after the other inside one ParDo, each counted and timed as its own.

    Beam hands each element over once instead of once per stage (each ParDo between two stages
    cost its per-element dispatch, and a batched stage two more for BatchElements and the
    unbatching), so the chain batches itself: records wait before a batched stage until it has
    a batch, and the rest of a bundle goes through at its end. Global windows only (the build's)."""

    def __init__(self, stages: list):
        self.stages = stages  # config only until setup()

    def setup(self):
        for stage in self.stages:
            stage.setup()
        self.tallies = [_Tally(stage) for stage in self.stages]
        settle_worker_heap()

    def start_bundle(self):
        self.waiting = [[] for _ in self.stages]  # records held before a batched stage

    def process(self, record):
        return self._run(0, [record], flush=False)

    def _run(self, first: int, records: list, flush: bool) -> list:
        """Outputs of `records` entering stage `first` (records held by a batched stage stay held
        unless `flush`)."""
        outputs = []
        for i in range(first, len(self.stages)):
            stage = self.stages[i]
            if stage.batch_size:
                held = self.waiting[i]
                held += records
                if len(held) < stage.batch_size and not flush:
                    return outputs
                records, self.waiting[i] = held, []
                if not records:
                    return outputs
            records, rejected = self.tallies[i].run(records)
            outputs += _rejected(rejected)
            if not records:
                return outputs
        return outputs + records

    def finish_bundle(self):
        outputs = []
        for i in range(len(self.stages)):
            if self.waiting[i]:
                outputs += self._run(i, [], flush=True)
        for tally in self.tallies:
            tally.flush()
        for out in outputs:
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
            else:
                yield GlobalWindows.windowed_value(out)

    def teardown(self):
        for stage in self.stages:
            stage.teardown()


class ApplyStage(beam.PTransform):
    """records -> (kept records, rejections). Batches first when the stage asks for it.
    side_input (e.g. AsSingleton(plan)): handed to stage.use_side_input before the records."""

    def __init__(self, stage: Stage, side_input=None):
        super().__init__(label=stage.name)
        self.stage = stage
        self.side_input = side_input

    def expand(self, records):
        if self.stage.batch_size:
            # A fixed size (the last batch of a bundle is flushed smaller): BatchElements' adaptive
            # sizing starts at 1 and fits a regression of batch time on size after every batch,
            # 1.7% of a worker's time on the 20k build, to pick a size the stage already knows.
            records = records | "Batch" >> beam.BatchElements(
                min_batch_size=self.stage.batch_size, max_batch_size=self.stage.batch_size)
        side = () if self.side_input is None else (self.side_input,)
        result = records | "Run" >> beam.ParDo(_StageDoFn(self.stage), *side).with_outputs(REJECTED, main="kept")
        return result.kept, result[REJECTED]


class ApplyStages(beam.PTransform):
    """records -> (kept records, rejections) through several stages in one ParDo (see
    _StageChainDoFn); the same outcome, counters and ledger rows as an ApplyStage per stage."""

    def __init__(self, stages: list, label: str | None = None):
        super().__init__(label=label or "+".join(stage.name for stage in stages))
        self.stages = list(stages)

    def expand(self, records):
        result = records | "Run" >> beam.ParDo(_StageChainDoFn(self.stages)).with_outputs(REJECTED, main="kept")
        return result.kept, result[REJECTED]


def stage_metrics(result) -> dict:
    """Our counters from a finished PipelineResult as {stage: {name: value}}."""
    out: dict = {}
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # noqa: BLE001 - some runners cannot report metrics; the report says so
        return out
    for c in counters:
        ns = c.key.metric.namespace
        if not ns.startswith(METRIC_PREFIX):
            continue
        value = c.committed if c.committed is not None else c.attempted
        out.setdefault(ns[len(METRIC_PREFIX):], {})[c.key.metric.name] = \
            out.get(ns[len(METRIC_PREFIX):], {}).get(c.key.metric.name, 0) + value
    return out


class _TimedMapFn(beam.DoFn):
    def __init__(self, name: str, fn, args: tuple):
        self.name, self.fn, self.args = name, fn, args

    def setup(self):
        ns = METRIC_PREFIX + self.name
        self.n_in = Metrics.counter(ns, "in")
        self.micros = Metrics.counter(ns, "micros")

    def process(self, element):
        start = time.perf_counter()
        out = self.fn(element, *self.args)
        self.micros.inc(int((time.perf_counter() - start) * 1e6))
        self.n_in.inc()
        yield out


class TimedMap(beam.PTransform):
    """beam.Map(fn, *args) for the build's own steps that are not stages (unstash): an
    exception fails the job (an I/O fault is not the input's), and the time is counted like a
    stage's, so report.json and the benchmarks see all of our work."""

    def __init__(self, name: str, fn, *args):
        super().__init__(label=name)
        self.name, self.fn, self.args = name, fn, args

    def expand(self, elements):
        return elements | "Run" >> beam.ParDo(_TimedMapFn(self.name, self.fn, self.args))


def plan_side_input(plan):
    """A global plan (one dict) as a side input. The combines that make plans run without default
    values (a runner step fewer each), so an empty input gives no element: the plan is then {}."""
    return beam.pvalue.AsSingleton(plan, default_value={})


class DistinctValues(beam.CombineFn):
    """A PCollection's distinct values as one sorted list, in one global combine (each worker
    keeps a set, the sets merge). Cheaper than Distinct() + ToList(): one step instead of two
    group-bys, and no per-value group key held by the runner."""

    def create_accumulator(self):
        return set()

    def add_input(self, acc, value):
        acc.add(value)
        return acc

    def merge_accumulators(self, accs):
        merged = set()
        for acc in accs:
            merged |= acc
        return merged

    def extract_output(self, acc):
        return sorted(acc)


class CountValues(beam.CombineFn):
    """[[value, count], ...] of a PCollection, sorted, in one global combine: what
    Count.PerElement() + ToList() gives, without a group-by per distinct value."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, value):
        acc[value] = acc.get(value, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        merged = {}
        for acc in accs:
            for value, n in acc.items():
                merged[value] = merged.get(value, 0) + n
        return merged

    def extract_output(self, acc):
        return sorted([value, n] for value, n in acc.items())
