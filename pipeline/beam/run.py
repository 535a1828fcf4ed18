"""Running the build: check the arguments, run the job graph (pipeline.beam.graph) on the runner
the Beam options name (Beam's in-process FnApiRunner by default; Dataflow, Flink or Spark by flags
alone), then write report.json, the plots and the dataset card.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipeline.beam.graph import build_pipeline, source_units
from pipeline.beam.wrapper import Progress, stage_metrics
from pipeline.io import outdir, shards
from pipeline.core.errors import BadArgument
from pipeline.io.sources import parse_source

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    sources: list[str]
    out: str
    parts: tuple[str, ...] = ("meta",)
    max_side: int = 768
    copy_jpeg: bool = True  # JPEGs that need no change keep their own data (pipeline.stages.jpeg_copy)
    max_place_km: float = 50.0
    coast_km: float = 25.0
    max_city_km: float = 25.0
    meta_templates: str = "v2"
    dedupe_radius: int = 4
    split_ratios: tuple[float, float, float] = (0.90, 0.05, 0.05)
    split_link_km: float = 1.0
    limits: shards.ShardLimits = field(default_factory=shards.ShardLimits)
    source_options: dict = field(default_factory=dict)
    overwrite: bool = False  # --overwrite: build into a non-empty OUT that mg-geo did not make
    fail_writer_after: int | None = None  # crash injection for tests only
    lvlm_args: object = None  # parsed CLI flags for the LVLM parts (pipeline.beam.llm_parts reads them)
    exclude: tuple[str, ...] = ()  # --exclude: benchmark image folders or lists (pipeline.stages.exclude)
    benchmarks: object = None  # their hashes, made by run_build before the job (exclude.Benchmarks)


DEFAULT_RUNNER = "FnApiRunner"


def default_runner(options: PipelineOptions) -> str | None:
    """No --runner given: Beam's in-process FnApiRunner (a runner name Beam's --runner documents),
    which honours --direct_num_workers and --direct_running_mode. Plain DirectRunner would first
    try PrismRunner, which downloads a binary at run time: impossible offline, a surprise on a laptop."""
    return None if options.view_as(StandardOptions).runner else DEFAULT_RUNNER


def check_distinct(sources: list) -> None:
    """The same source twice would make every sample twice under one key (webdataset then stops
    at "duplicate file name"): a bad argument, named, before any work."""
    seen: dict = {}
    for source in sources:
        where = source.location.rstrip("/") or "/"
        if "://" not in where:
            where = os.path.realpath(where)
        same = seen.get((source.kind, where))
        seen[(source.kind, where)] = source.spec
        if same is not None:
            also = "" if same == source.spec else f" (as {same!r} and {source.spec!r})"
            raise BadArgument(f"source {source.kind}:{where} is given twice{also}; every input would "
                              f"be built twice: give each source once")


def run_build(config: BuildConfig, beam_args: list[str]) -> dict:
    """Check arguments, run the job, write report.json and README.md; returns the report."""
    sources = [parse_source(spec, config.source_options) for spec in config.sources]
    check_distinct(sources)
    for source in sources:
        source.check()
    if {"clue", "dialogue"} & set(config.parts):
        from pipeline.beam.llm_parts import check_llm
        check_llm(config)
    if config.exclude and config.benchmarks is None:
        from pipeline.stages.exclude import load_benchmarks
        from pipeline.stages.image import ImageStage
        # The build's own image stage settings: a benchmark image is hashed as a record would be.
        config.benchmarks = load_benchmarks(config.exclude, ImageStage(max_side=config.max_side,
                                                                       copy_jpeg=config.copy_jpeg))
    options = PipelineOptions(beam_args)
    dry_run = options.view_as(TestOptions).dry_run
    try:
        pipeline = beam.Pipeline(runner=default_runner(options), options=options)
    except ValueError as exc:  # an unknown --runner: before OUT is touched
        raise BadArgument(f"--runner: {exc}") from None
    if dry_run:
        return _run_job(config, pipeline, sources, dry_run=True)
    with outdir.locked(config.out):
        outdir.prepare(config.out, overwrite=config.overwrite)
        try:
            return _run_job(config, pipeline, sources, dry_run=False)
        except BaseException:
            # A failed or interrupted run leaves no partial file outside OUT/_tmp, and not
            # OUT/_tmp either (a rerun would remove it anyway).
            with contextlib.suppress(Exception):
                outdir.cleanup_tmp(config.out)
            raise


def _known_inputs(sources: list, units: list) -> int | None:
    """The number of inputs when every source knows it before the run (an exif: unit is a batch
    of its photos), else None."""
    if not all(source.kind == "exif" for source in sources):
        return None
    return sum(len(unit) for _, unit in units)


def _run_job(config: BuildConfig, pipeline: beam.Pipeline, sources: list, dry_run: bool) -> dict:
    started = time.perf_counter()
    units = source_units(sources)  # listed once: a folder of photos is walked once
    with Progress(None if dry_run else _known_inputs(sources, units)), pipeline as p:
        build_pipeline(p, config, sources, units)
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
