"""The build's job graph: sources -> record stages -> stash -> dedupe + split -> LVLM parts ->
writer, with the ledger, the input count and the writer's presence count beside it.

`build_pipeline` only wires steps; each per-record stage goes through the one wrapper
(pipeline.beam.wrapper). Which runner executes it is pipeline.beam.run's business.
"""
from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from pipeline.beam.wrapper import METRIC_PREFIX, ApplyStages, BundleCounts, LatestSnapshots, SumCounts, TimedMap
from pipeline.beam.write_parts import WriteParts
from pipeline.core import ledger
from pipeline.core.ledger import Rejection
from pipeline.global_steps.dedupe import Dedupe
from pipeline.global_steps.dedupe_split import DedupeAndSplit
from pipeline.global_steps.split import AssignSplit
from pipeline.io import manifest, outdir
from pipeline.io.sources import Source
from pipeline.io.stash import BundleStash, unstash
from pipeline.stages.geocode import GeocodeStage
from pipeline.stages.exclude import ExcludeStage
from pipeline.stages.image import ImageStage
from pipeline.stages.meta import META_TEMPLATES, MetaStage
from pipeline.stages.read import ReadStage
from pipeline.stages.validate import ValidateStage

SOURCE_REJECTED = "rejected"
SOURCE_INPUTS = "inputs"  # (source spec, inputs kept or rejected) per unit


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


class _LedgerPieces(beam.DoFn):
    """Rejections -> parquet pieces of the ledger (one per bundle, or per ledger.PIECE_ROWS rows)."""

    def __init__(self, out: str):
        self.out = out

    def start_bundle(self):
        self.rows = []

    def process(self, rejection: Rejection):
        self.rows.append(rejection.row())
        if len(self.rows) >= ledger.PIECE_ROWS:
            yield self._flush()

    def finish_bundle(self):
        if self.rows:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> str:
        path = ledger.write_piece(self.out, self.rows)
        self.rows = []
        return path


class WriteLedger(beam.PTransform):
    """{step: rejections} of every step -> OUT/rejected.parquet. Each step's rejections become pieces
    where they are made and only the pieces' paths are joined: a Flatten of the rows themselves
    sent every row to the runner, and Beam's local runner was seen to lose elements from a
    Flatten (bench/repro_beam_flatten_loss.py); a single-file WriteToParquet grouped every row on
    one key and took five runner steps."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def expand(self, rejected_per_step: dict):
        pieces = [more | f"Pieces-{step}" >> beam.ParDo(_LedgerPieces(self.out))
                  for step, more in rejected_per_step.items()]
        return (tuple(pieces)
                | "PiecePaths" >> beam.Flatten()
                | "AllPieces" >> beam.combiners.ToList()  # a path per step and bundle: small
                | "Merge" >> beam.Map(ledger.merge, self.out))


def record_stages(config):
    """The per-record stages before the global ones (dedupe, split), in order."""
    stages = [
        ReadStage(),
        ValidateStage(),
        GeocodeStage(max_place_km=config.max_place_km, coast_km=config.coast_km, max_city_km=config.max_city_km),
        ImageStage(max_side=config.max_side, copy_jpeg=config.copy_jpeg),
    ]
    benchmarks = getattr(config, "benchmarks", None)
    if benchmarks is not None:
        # Right after the image stage, which made the sha256 and phash it compares.
        stages.append(ExcludeStage(benchmarks, radius=config.dedupe_radius))
    # Meta needs nothing that dedupe or split decide, so it runs here, before the record is
    # stashed: the thin copies that flow on then never need the whole record back before the writer.
    if "meta" in config.parts:
        stages.append(MetaStage(templates=META_TEMPLATES[config.meta_templates]))
    return stages


def source_units(sources: list[Source]) -> list[tuple[str, object]]:
    """(source spec, unit) of every source: what the job's first step is made of."""
    return [(s.spec, unit) for s in sources for unit in s.units()]


def build_pipeline(p: beam.Pipeline, config, sources: list[Source], units: list | None = None):
    """Wire the build's steps into `p` (config: pipeline.beam.run.BuildConfig); returns the input
    count. `units`: source_units(sources), when the caller listed them already."""
    by_spec = {s.spec: s for s in sources}
    units = source_units(sources) if units is None else units
    read = (p
            # Create spreads two or more units over the workers with its own reshuffle (a unit can
            # be a whole table or shard); a Reshuffle of ours after it was a second one.
            | "Units" >> beam.Create(units)
            | "SourceRecords" >> beam.ParDo(_SourceRecords(by_spec)).with_outputs(
                SOURCE_REJECTED, SOURCE_INPUTS, main="records"))
    records, rejected = read.records, [read[SOURCE_REJECTED]]

    # Counted from a tagged output of the source, not from a Flatten of records and rejections:
    # that Flatten shipped every whole record (a wds: record holds its image) to the runner, and
    # Beam's local runner with 2 workers was seen to lose some (bench/repro_beam_flatten_loss.py).
    inputs = (read[SOURCE_INPUTS]
              | "CountInputs" >> beam.CombineGlobally(SumCounts()).without_defaults()
              | "WriteInputs" >> beam.Map(outdir.write_counts, config.out, outdir.INPUTS_FILE))

    # One ParDo for all of them: each stage is still counted, timed and logged as its own.
    records, more, _ = records | "Stages" >> ApplyStages(record_stages(config))
    rejected.append(more)
    # Records go on as thin copies from here: the shuffles and waits below carry ~0.4 KB each.
    records = records | "Stash" >> beam.ParDo(BundleStash(config.out))
    records, more = records | "DedupeSplit" >> DedupeAndSplit(
        Dedupe(radius=config.dedupe_radius), AssignSplit(ratios=config.split_ratios, link_km=config.split_link_km))
    rejected.append(more)
    if {"clue", "dialogue"} & set(config.parts):
        # The LVLM stack loads only when asked for.
        from pipeline.beam.llm_parts import STATS_FILE, ApplySelected, llm_stages
        records = records | "Unstash" >> TimedMap("unstash", unstash)  # the LVLM sees the pixels
        stats = []
        for stage, target in llm_stages(config):
            records, more, snapshots = records | stage.name.capitalize() >> ApplySelected(stage, target)
            rejected.append(more)
            stats.append(snapshots)
        # The backends' counters leave the stages as an output (Beam may skip a DoFn's teardown).
        _ = (tuple(stats)
             | "LvlmStats" >> beam.Flatten()
             | "LatestLvlmStats" >> beam.CombineGlobally(LatestSnapshots()).without_defaults()
             | "WriteLvlmStats" >> beam.Map(outdir.write_json, config.out, STATS_FILE))
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
    _ = {f"{i}": more for i, more in enumerate(rejected)} | "Ledger" >> WriteLedger(config.out)
    return inputs
