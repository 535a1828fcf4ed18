"""The one Beam wrapper every stage goes through: counters, timing, progress log, ledger output."""
from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from pipeline.core.record import Reject
from pipeline.core.ledger import Rejection
from pipeline.core.stage import Stage, iter_outcomes

REJECTED = "rejected"
STATS = "stats"  # (identity, taken_ns, stats) snapshots of a stage's own statistics
METRIC_PREFIX = "mg_geo."
PROGRESS_EVERY_S = 10.0
log = logging.getLogger(__name__)


class BundleCounts:
    """Counters of one namespace summed in the worker and handed to Beam once per bundle
    (`flush()` in finish_bundle, when Beam reports the bundle's metrics anyway) instead of an
    inc per element and counter. Fractions (micros summed as floats) carry over to the next bundle."""

    def __init__(self, namespace: str):
        self.ns = namespace
        self.counts: dict = {}

    def add(self, name: str, n: float = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def add_micros_since(self, start: float, name: str = "micros") -> None:
        self.add(name, (time.perf_counter() - start) * 1e6)

    def flush(self) -> None:
        for name, value in self.counts.items():
            whole = int(value)
            if whole:
                Metrics.counter(self.ns, name).inc(whole)
            self.counts[name] = value - whole


# Records done per stage by the stages running in this process (Beam's in-process runner, the
# default): the driver's Progress reads it. Workers in other processes log their own lines.
LIVE_COUNTS: dict[str, dict[str, int]] = {}


class Progress:
    """The driver's heartbeat: a line at least every `every_s` seconds while the job runs, with the
    records each stage has done, its rate and, where the number of inputs is known (exif: folders,
    counted before the run), the time left. Metrics are only queryable after the job, so it reads
    LIVE_COUNTS; with worker processes it says how long the job has run."""

    def __init__(self, total_inputs: int | None = None, every_s: float = 30.0, counts: dict | None = None):
        self.total = total_inputs
        self.every_s = every_s
        self.counts = LIVE_COUNTS if counts is None else counts
        self.started = time.monotonic()
        self._stop = None

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now if now is not None else time.monotonic()) - self.started)
        parts = [f"build running {elapsed:.0f}s"]
        for name, c in list(self.counts.items()):
            parts.append(f"{name} {c['in']} done ({c['in'] / elapsed:.1f}/s, {c['rejected']} rejected)")
        first = next(iter(self.counts.values()), None)
        if self.total and first and first["in"]:
            left = max(0, self.total - first["in"]) / (first["in"] / elapsed)
            parts.append(f"~{left:.0f}s left of the first stage ({first['in']}/{self.total} inputs)")
        elif not self.counts:
            parts.append("(stage counts are logged by the worker processes)")
        return "; ".join(parts)

    def __enter__(self):
        import threading

        self.counts.clear()
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(self.every_s):
                log.info("%s", self.line())
        threading.Thread(target=beat, name="mg-geo-progress", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False


class _Tally:
    """One stage's counts and time in a worker (BundleCounts), and its progress log while the
    job runs (metrics are only queryable from the result afterwards)."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.counts = BundleCounts(METRIC_PREFIX + stage.name)
        self.local = {"in": 0, "out": 0, "rejected": 0}  # this worker's, for the progress log
        self.last_log = time.monotonic()

    def run(self, records: list) -> tuple[list, list]:
        """(records that go on, rejections) for `records` through the stage."""
        stage = self.stage
        start = time.perf_counter()
        outcomes = list(iter_outcomes(stage, records))
        self.counts.add_micros_since(start)
        kept, rejected = [], []
        for record, outcome in outcomes:
            if isinstance(outcome, Reject):
                rejected.append(Rejection.of(record, stage.name, outcome, stage.part))
                self.counts.add("reason." + outcome.reason)
                if stage.part:  # only this part lacks a sample; the record goes on
                    kept.append(record)
            else:
                kept.append(outcome)
                label = stage.tally(outcome)
                if label:
                    self.counts.add("tally." + label)
        live = LIVE_COUNTS.setdefault(stage.name, {"in": 0, "out": 0, "rejected": 0})
        for name, n in (("in", len(records)), ("out", len(outcomes) - len(rejected)), ("rejected", len(rejected))):
            self.counts.add(name, n)
            self.local[name] += n
            live[name] += n
        self._maybe_log_progress()
        return kept, rejected

    def flush(self) -> None:
        self.counts.flush()

    def _maybe_log_progress(self):
        # Checked per call, not per bundle: the local runner gives a stage one huge bundle.
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_EVERY_S:
            self.last_log = now
            log.info("stage %-9s in=%d out=%d rejected=%d (this worker)", self.stage.name,
                     self.local["in"], self.local["out"], self.local["rejected"])


def _rejected(rejections: list):
    return [beam.pvalue.TaggedOutput(REJECTED, r) for r in rejections]


class _StagesDoFn(beam.DoFn):
    """Stages run one after the other inside one ParDo, each counted and timed as its own.

    Beam hands each element over once instead of once per stage, so the chain batches itself:
    records wait before a batched stage until it has a batch, and the rest of a bundle goes through
    at its end. A side input is handed to every stage (use_side_input) before the records that
    need it. At each bundle's end, a stage with statistics of its own (an LVLM backend's counters,
    Stage.stats_snapshot) sends them on the STATS output. Global windows only (the build's)."""

    def __init__(self, stages: list):
        self.stages = stages  # config only until setup(): heavy state is never pickled with the graph

    def setup(self):
        for stage in self.stages:
            stage.setup()
        self.tallies = [_Tally(stage) for stage in self.stages]
        self.side_input = None

    def start_bundle(self):
        self.waiting = [[] for _ in self.stages]  # records held before a batched stage

    def process(self, record, side_input=None):
        if side_input is not None and side_input is not self.side_input:
            self.side_input = side_input  # the same object for every element of a bundle
            for stage in self.stages:
                stage.use_side_input(side_input)
        return self._run(0, [record], flush=False)

    def _run(self, first: int, records: list, flush: bool):
        """Outputs of `records` entering stage `first`, yielded as each is done: after a batched
        stage its records go on one at a time, so the stages after it never hold a whole batch
        of changed records (a batch of photos with their new JPEGs).
        A batched stage holds records until it has a batch, or runs what it holds if `flush`
        (for stage `first` only: later ones keep theirs for finish_bundle to flush in order)."""
        for i in range(first, len(self.stages)):
            stage = self.stages[i]
            if stage.batch_size:
                held = self.waiting[i]
                held += records
                if not held or (len(held) < stage.batch_size and not (flush and i == first)):
                    return
                self.waiting[i] = []
                kept, rejected = self.tallies[i].run(held)
                yield from _rejected(rejected)
                for record in kept:
                    yield from self._run(i + 1, [record], flush=False)
                return
            records, rejected = self.tallies[i].run(records)
            yield from _rejected(rejected)
            if not records:
                return
        yield from records

    def finish_bundle(self):
        for i in range(len(self.stages)):
            for out in self._run(i, [], flush=True):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)
        for stage in self.stages:
            snapshot = stage.stats_snapshot()
            if snapshot is not None:
                yield beam.pvalue.TaggedOutput(STATS, GlobalWindows.windowed_value(snapshot))
        for tally in self.tallies:
            tally.flush()

    def teardown(self):
        for stage in self.stages:
            stage.teardown()


class ApplyStages(beam.PTransform):
    """records -> (kept records, rejections, statistics snapshots) through one or more stages in
    one ParDo (see _StagesDoFn): the same records, counters and ledger rows as the stages give
    without Beam (pipeline.core.stage.run_stages). side_input (e.g. AsSingleton(keys)) is handed
    to the stages before the records."""

    def __init__(self, stages: list, side_input=None, label: str | None = None):
        super().__init__(label=label or "+".join(stage.name for stage in stages))
        self.stages = list(stages)
        self.side_input = side_input

    def expand(self, records):
        side = () if self.side_input is None else (self.side_input,)
        result = records | "Run" >> beam.ParDo(_StagesDoFn(self.stages), *side).with_outputs(
            REJECTED, STATS, main="kept")
        return result.kept, result[REJECTED], result[STATS]


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


class _TimedFn(beam.DoFn):
    """fn over each element, its time (and, for a step of its own, the element count) summed in
    the worker and handed to mg_geo.<name>.* once per bundle."""

    def __init__(self, name: str, fn, args: tuple, *, flat: bool, star: bool, count_in: bool):
        self.name, self.fn, self.args = name, fn, args
        self.flat, self.star, self.count_in = flat, star, count_in

    def setup(self):
        self.counts = BundleCounts(METRIC_PREFIX + self.name)

    def process(self, element, *side_inputs):
        start = time.perf_counter()
        if self.star:
            out = self.fn(*element, *self.args, *side_inputs)
        else:
            out = self.fn(element, *self.args, *side_inputs)
        out = list(out) if self.flat else [out]  # a generator's work is done here, timed
        self.counts.add_micros_since(start)
        if self.count_in:
            self.counts.add("in")
        return out

    def finish_bundle(self):
        self.counts.flush()


class TimedMap(beam.PTransform):
    """beam.Map(fn, *args) for the build's own steps that are not stages (unstash): an
    exception fails the job (an I/O fault is not the input's), and the time is counted like a
    stage's, so report.json and the benchmarks see all of our work."""

    def __init__(self, name: str, fn, *args):
        super().__init__(label=name)
        self.name, self.fn, self.args = name, fn, args

    def expand(self, elements):
        return elements | "Run" >> beam.ParDo(_TimedFn(self.name, self.fn, self.args, flat=False, star=False, count_in=True))


def stage_work(name: str, fn, *args, flat: bool = True, star: bool = False, side_inputs: tuple = ()):
    """beam.FlatMap(fn, *args) (or FlatMapTuple with star, Map without flat) for a global
    stage's own steps (dedupe's and split's plans, the writer's planning): its time is the
    stage's work, counted in mg_geo.<name>.micros with the rest of the stage's, not its element
    count. Side inputs come after args."""
    return beam.ParDo(_TimedFn(name, fn, args, flat=flat, star=star, count_in=False), *side_inputs)


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


class LatestSnapshots(beam.CombineFn):
    """(identity, taken_ns, stats) snapshots of cumulative statistics (Stage.stats_snapshot) ->
    the latest stats of each identity, as a list. One identity is one process's object, whose
    clock (time.monotonic_ns) orders its snapshots; an earlier snapshot is contained in a later one."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, snapshot):
        identity, taken_ns, stats = snapshot
        if identity not in acc or acc[identity][0] < taken_ns:
            acc[identity] = (taken_ns, stats)
        return acc

    def merge_accumulators(self, accs):
        merged = {}
        for acc in accs:
            for identity, (taken_ns, stats) in acc.items():
                self.add_input(merged, (identity, taken_ns, stats))
        return merged

    def extract_output(self, acc):
        return [stats for _, (_, stats) in sorted(acc.items())]


class SumCounts(beam.CombineFn):
    """[[value, count], ...], sorted, from (value, count) pairs counted where they were made
    (per unit, per bundle), in one global combine."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, pair):
        value, n = pair
        acc[value] = acc.get(value, 0) + n
        return acc

    def merge_accumulators(self, accs):
        merged = {}
        for acc in accs:
            for value, n in acc.items():
                merged[value] = merged.get(value, 0) + n
        return merged

    def extract_output(self, acc):
        return sorted([value, n] for value, n in acc.items())
