"""The build job: sources -> stages -> shards, manifest, ledger, report and dataset card.

`build_pipeline` only wires the graph (one small step after another, each through the shared
`ApplyStage`/`ApplyStages` wrapper); the runner is whatever Beam options say (DirectRunner on a laptop, Dataflow,
Flink or Spark by flags alone). `run_build` runs it and writes the report and the card.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions
from apache_beam.transforms.window import GlobalWindows

from pipeline.io import manifest, outdir, parquet_pieces, shards
from pipeline.beam.wrapper import METRIC_PREFIX, ApplyStages, BundleCounts, SumCounts, TimedMap, stage_metrics
from pipeline.global_steps.dedupe import Dedupe
from pipeline.global_steps.dedupe_split import DedupeAndSplit
from pipeline.stages.geocode import GeocodeStage
from pipeline.stages.image import ImageStage
from pipeline.stages.meta import MetaStage
from pipeline.stages.read import ReadStage
from pipeline.core.record import Rejection
from pipeline.io.sources import Source, parse_source
from pipeline.global_steps.split import AssignSplit
from pipeline.io.stash import BundleStash, unstash
from pipeline.stages.validate import ValidateStage
from pipeline.beam.write_parts import WriteParts

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema([(name, pa.string()) for name in
                           ("source", "input_id", "key", "stage", "reason", "detail", "part")])
SOURCE_REJECTED = "rejected"
SOURCE_INPUTS = "inputs"  # (source spec, inputs kept or rejected) per unit
LEDGER_FILE = "rejected.parquet"
LEDGER_PIECES_DIR = "_tmp/ledger"
LEDGER_PIECE_ROWS = 50_000


@dataclass
class BuildConfig:
    sources: list[str]
    out: str
    parts: tuple[str, ...] = ("meta",)
    max_side: int = 768
    copy_jpeg: bool = True  # JPEGs that need no change keep their own data (pipeline.stages.jpeg_copy)
    max_place_km: float = 50.0
    coast_km: float = 25.0
    dedupe_radius: int = 4
    split_ratios: tuple[float, float, float] = (0.90, 0.05, 0.05)
    split_link_km: float = 1.0
    limits: shards.ShardLimits = field(default_factory=shards.ShardLimits)
    source_options: dict = field(default_factory=dict)
    fail_writer_after: int | None = None  # crash injection for tests only
    lvlm_args: object = None  # parsed CLI flags for the LVLM parts (pipeline.beam.llm_parts reads them)


class _SourceRecords(beam.DoFn):
    """(spec, unit) -> records, a ledger row for each input the source already rejects, and on
    SOURCE_INPUTS one (source spec, inputs) pair per unit (what the input count is made from).

    Times the source's own work like a stage's (mg_geo.source.micros): only inside its generator,
    not the fused steps downstream that run while an output is handed on. Counters are summed
    here and handed to Beam once per bundle."""

    def __init__(self, sources: dict[str, Source]):
        self.sources = sources

    def setup(self):
        self.counts = BundleCounts(METRIC_PREFIX + "source")

    def process(self, unit_pair):
        spec, unit = unit_pair
        counts = self.counts
        inputs: dict[str, int] = {}
        outputs = iter(self.sources[spec].records(unit))
        while True:
            start = time.perf_counter()
            item = next(outputs, None)
            counts.add_micros_since(start)
            if item is None:
                break
            record, reject = item
            inputs[record.source] = inputs.get(record.source, 0) + 1
            if reject is None:
                yield record
            else:
                yield beam.pvalue.TaggedOutput(SOURCE_REJECTED, Rejection.of(record, "source", reject))
        counts.add("in", sum(inputs.values()))
        for source, n in inputs.items():
            yield beam.pvalue.TaggedOutput(SOURCE_INPUTS, (source, n))

    def finish_bundle(self):
        self.counts.flush()


class _CountPresence(beam.DoFn):
    """(source, part, has a sample) of every record at the writer, counted per bundle: one
    (key, count) pair per bundle and key instead of an element per record and part."""

    def __init__(self, parts: tuple[str, ...]):
        self.parts = parts

    def start_bundle(self):
        self.counts: dict = {}

    def process(self, record):
        present = record.parts_present()
        for part in self.parts:
            key = (record.source, part, part in present)
            self.counts[key] = self.counts.get(key, 0) + 1

    def finish_bundle(self):
        for key, n in self.counts.items():
            yield GlobalWindows.windowed_value((key, n))


def _ledger_row(rejection: Rejection) -> dict:
    return {name: getattr(rejection, name) for name in LEDGER_SCHEMA.names}


class _LedgerPieces(beam.DoFn):
    """Rejections -> parquet pieces of the ledger (one per bundle, or per LEDGER_PIECE_ROWS), merged
    into rejected.parquet at the end like the manifest: a single-file WriteToParquet grouped every
    row on one key and took five runner steps."""

    def __init__(self, out: str):
        self.out = out

    def start_bundle(self):
        self.rows = []

    def process(self, rejection: Rejection):
        self.rows.append(_ledger_row(rejection))
        if len(self.rows) >= LEDGER_PIECE_ROWS:
            yield self._flush()

    def finish_bundle(self):
        if self.rows:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> str:
        path = outdir.join(self.out, LEDGER_PIECES_DIR, f"{uuid.uuid4().hex}.parquet")
        parquet_pieces.write_rows(path, self.rows, LEDGER_SCHEMA)
        self.rows = []
        return path


def record_stages(config: BuildConfig):
    """The per-record stages before the global ones (dedupe, split), in order."""
    stages = [
        ReadStage(),
        ValidateStage(),
        GeocodeStage(max_place_km=config.max_place_km, coast_km=config.coast_km),
        ImageStage(max_side=config.max_side, copy_jpeg=config.copy_jpeg),
    ]
    # Meta needs nothing that dedupe or split decide, so it runs here, before the record is
    # stashed: the thin copies that flow on then never need the whole record back before the writer.
    if "meta" in config.parts:
        stages.append(MetaStage())
    return stages


def build_pipeline(p: beam.Pipeline, config: BuildConfig, sources: list[Source]):
    by_spec = {s.spec: s for s in sources}
    units = [(s.spec, unit) for s in sources for unit in s.units()]
    read = (p
            # Create spreads two or more units over the workers with its own reshuffle (a unit can
            # be a whole table or shard); a Reshuffle of ours after it was a second one.
            | "Units" >> beam.Create(units)
            | "SourceRecords" >> beam.ParDo(_SourceRecords(by_spec)).with_outputs(
                SOURCE_REJECTED, SOURCE_INPUTS, main="records"))
    records, rejected = read.records, [read[SOURCE_REJECTED]]

    # Counted from a tagged output of the source, not from a Flatten of records and rejections:
    # that Flatten shipped every whole record (a wds: record holds its image) to the runner, and
    # Beam's local runner with 2 workers lost some of it (a 20k-photo wds: build counted 13,695-
    # 19,821 inputs; the conservation check caught it). bench/RESULTS.md has the details.
    inputs = (read[SOURCE_INPUTS]
              | "CountInputs" >> beam.CombineGlobally(SumCounts()).without_defaults()
              | "WriteInputs" >> beam.Map(outdir.write_counts, config.out, outdir.INPUTS_FILE))

    # One ParDo for all of them: each stage is still counted, timed and logged as its own.
    records, more = records | "Stages" >> ApplyStages(record_stages(config))
    rejected.append(more)
    # Records go on as thin copies from here: the shuffles and waits below carry ~0.4 KB each.
    records = records | "Stash" >> beam.ParDo(BundleStash(config.out))
    records, more = records | "DedupeSplit" >> DedupeAndSplit(
        Dedupe(radius=config.dedupe_radius), AssignSplit(ratios=config.split_ratios, link_km=config.split_link_km))
    rejected.append(more)
    if {"clue", "dialogue"} & set(config.parts):
        from pipeline.beam.llm_parts import ApplySelected, llm_stages  # the LVLM stack loads only when asked for
        records = records | "Unstash" >> TimedMap("unstash", unstash)  # the LVLM sees the pixels
        for stage, target in llm_stages(config):
            records, more = records | stage.name.capitalize() >> ApplySelected(stage, target)
            rejected.append(more)
        records = records | "Restash" >> beam.ParDo(BundleStash(config.out, "restash"))

    # What reaches the writer, per source and part: with the inputs and the ledger this proves that
    # no record was lost (inputs = ledger rows for whole records + records at the writer).
    _ = (records
         | "PartPresence" >> beam.ParDo(_CountPresence(config.parts))
         | "CountPresence" >> beam.CombineGlobally(SumCounts()).without_defaults()
         | "WritePresence" >> beam.Map(outdir.write_counts, config.out, outdir.PRESENCE_FILE))
    pieces, write_rejected, _stats = records | "Write" >> WriteParts(
        config.out, config.parts, config.limits, config.fail_writer_after)
    rejected.append(write_rejected)

    _ = (pieces
         | "AllManifestPieces" >> beam.combiners.ToList()  # one path per shard: small
         | "MergeManifest" >> beam.Map(manifest.merge_pieces, config.out))
    # Each step's rejections become pieces where they are made; only the pieces' paths are joined
    # (a Flatten of the rows themselves sent every row to the runner, and the local runner was
    # seen to lose elements from a Flatten, see the input count above).
    pieces_per_step = [more | f"LedgerPieces{i}" >> beam.ParDo(_LedgerPieces(config.out))
                       for i, more in enumerate(rejected)]
    _ = (tuple(pieces_per_step)
         | "LedgerPiecePaths" >> beam.Flatten()
         | "AllLedgerPieces" >> beam.combiners.ToList()  # a path per step and bundle: small
         | "MergeLedger" >> beam.Map(parquet_pieces.merge_files, outdir.join(config.out, LEDGER_FILE), LEDGER_SCHEMA))
    return inputs


DEFAULT_RUNNER = "FnApiRunner"


def default_runner(options: PipelineOptions) -> str | None:
    """No --runner given: Beam's in-process FnApiRunner (a runner name Beam's --runner documents),
    which honours --direct_num_workers and --direct_running_mode. Plain DirectRunner would first
    try PrismRunner, which downloads a binary at run time: impossible offline, a surprise on a laptop."""
    return None if options.view_as(StandardOptions).runner else DEFAULT_RUNNER


def run_build(config: BuildConfig, beam_args: list[str]) -> dict:
    """Check arguments, run the job, write report.json and README.md; returns the report."""
    sources = [parse_source(spec, config.source_options) for spec in config.sources]
    for source in sources:
        source.check()
    if {"clue", "dialogue"} & set(config.parts):
        from pipeline.beam.llm_parts import check_llm
        check_llm(config)
    options = PipelineOptions(beam_args)
    dry_run = options.view_as(TestOptions).dry_run
    if not dry_run:
        outdir.prepare(config.out)
    started = time.perf_counter()
    with beam.Pipeline(runner=default_runner(options), options=options) as p:
        build_pipeline(p, config, sources)
        graph_s = time.perf_counter() - started
    job_s = time.perf_counter() - started - graph_s  # the runner: translation, workers, every step
    if dry_run:
        # The runner translated and checked the job graph without submitting it (Dataflow can do
        # this offline and without credentials); nothing ran, so there is nothing to report.
        job = getattr(p.result, "job", None)
        return {"dry_run": True, "runner": type(p.runner).__name__,
                "job_name": getattr(getattr(job, "proto", None), "name", None),
                "transforms": len(p.to_runner_api().components.transforms)}
    return _report(config, p.result, started, graph_s, job_s)


def _report(config: BuildConfig, result, started: float, graph_s: float, job_s: float) -> dict:
    """report.json, the plots and README.md of a finished job; returns the report."""
    from pipeline.report import build_report, card

    metrics = stage_metrics(result)
    for name, counts in metrics.items():
        log.info("stage %-9s %s", name, " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    rep = build_report.build_report(config, metrics)
    if {"clue", "dialogue"} & set(config.parts):
        from pipeline.beam.llm_parts import read_backend_stats
        rep["lvlm"] = read_backend_stats(config.out)
    with outdir.cleaning_tmp(config.out):  # the job's temporary files go while the plots are drawn
        from pipeline.report.plots import make_plots
        rep["plots"] = make_plots(config.out, rep)
        # Where this build's wall time went (seconds; the stages' own work is in rep["stages"]).
        rep["timing"] = {"graph_s": round(graph_s, 2), "job_s": round(job_s, 2),
                         "report_and_plots_s": round(time.perf_counter() - started - graph_s - job_s, 2)}
        outdir.write_text(outdir.join(config.out, "report.json"), json.dumps(rep, indent=1, sort_keys=True))
        card.write_card(config, rep)
    return rep
