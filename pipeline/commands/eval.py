"""`mg-geo eval`: run a model over a benchmark or the test split and score it, or score a predictions file.

    mg-geo eval --benchmark im2gps3k --images im2gps3k/ --lvlm-endpoint http://localhost:8000/v1
    mg-geo eval --benchmark gws15k --images gws15k/ --ground-truth gws15k_citygt.csv --interactive ...
    mg-geo eval --benchmark osv5m --predictions preds.jsonl --ground-truth test.csv   # score a file
    mg-geo eval --out OUT --lvlm-endpoint http://localhost:8000/v1          # meta/test, one guess each
    mg-geo eval --out OUT --interactive --lvlm-backend transformers --lvlm-model ./ckpt  # simulated user
    mg-geo eval --out OUT --interactive --user replay ...                  # dialogue/test replayed
    mg-geo eval --predictions preds.jsonl --ground-truth osv5m_test.csv      # score a file

Benchmarks (gws15k, gaea, im2gps3k, yfcc4k, osv5m; layouts in pipeline/evaluate/benchmarks.py):
each run goes to REPORT_DIR/NAME (REPORT_DIR/NAME-interactive with --interactive), and
REPORT_DIR/metrics.md + error_cdf.png are rewritten over every run there: one row per benchmark
and the interactive table, the paper's shape.

--interactive runs a simulated user (default): the model guesses, the user answers its own guess
with a hint, correction or choice (the Dialogue part's rules), for --max-corrections rounds, in
every --modes mode. `--user replay` instead feeds the dialogue/test split's recorded user turns.

Writes metrics.json, metrics.md and error_cdf.png; a model run also writes its predictions
(jsonl) and the ground truth (OSV-5M csv layout) there, and the metrics are computed from those
two files, so `--predictions/--ground-truth` on them reproduces the numbers.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.lvlm.options import add_lvlm_arguments

log = logging.getLogger("pipeline.eval")
EXIT_BAD_INPUT = 2


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _modes(text: str) -> tuple:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in ("hint", "correction", "choice")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are hint, correction, choice; got {text!r}")
    return modes


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="evaluate a geolocation model on the test split, or score a predictions file",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the corpus (mg-geo build --out): shards under OUT/{meta,dialogue}/SPLIT/*.tar")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--shards", nargs="+", metavar="PATH",
                   help="explicit shard files, directories or glob patterns instead of --out")
    p.add_argument("--benchmark", metavar="NAME", help="a public benchmark: gws15k, gaea, im2gps3k, yfcc4k, osv5m")
    p.add_argument("--images", metavar="DIR", help="--benchmark: the folder holding its images")
    for field, what in (("id", "image id / file name"), ("lat", "latitude"), ("lon", "longitude"),
                        ("country", "country"), ("region", "region"), ("city", "city")):
        p.add_argument(f"--{field}-column", metavar="NAME", help=f"--benchmark: the ground-truth column with the {what}")
    p.add_argument("--interactive", action="store_true",
                   help="interactive evaluation: first guess, then revised after each user turn")
    p.add_argument("--user", choices=("simulated", "replay"), default="simulated",
                   help="--interactive: a simulated user answering the model's own guesses (default), or "
                        "replay of the dialogue/test split's recorded user turns")
    p.add_argument("--modes", type=_modes, default=("hint", "correction", "choice"),
                   help="--interactive simulated user: comma-separated modes (default hint,correction,choice)")
    p.add_argument("--max-corrections", type=_non_negative, default=2,
                   help="--interactive: user turns after the first guess (default 2)")
    p.add_argument("--predictions", help="score this predictions file (jsonl or csv) instead of running a model")
    p.add_argument("--ground-truth", help="ground-truth csv (OSV-5M or GAEA layout); default: from the shards")
    p.add_argument("--report-dir", help="where outputs go (default OUT/eval/PART-SPLIT with --out, "
                                        "else the predictions file's folder, else ./mg-geo-eval)")
    p.add_argument("--limit", type=_non_negative, default=0, help="evaluate at most N samples (0 = all)")
    p.add_argument("--batch-size", type=_positive, default=32, help="requests handed to the backend at once (default 32)")
    add_lvlm_arguments(p)
    p.set_defaults(func=run)
    return p


def _part(args) -> str:
    return "dialogue" if args.interactive and args.user == "replay" else "meta"


def _benchmark_dir(args) -> Path:
    return Path(args.report_dir or "mg-geo-eval") / (args.benchmark + ("-interactive" if args.interactive else ""))


def _shards(args) -> list[str]:
    from pipeline.evaluate.shards import expand, shard_paths

    if args.shards:
        return expand(args.shards)
    if args.out:
        return shard_paths(args.out, _part(args), args.split)
    return []


def _report_dir(args) -> Path:
    if getattr(args, "benchmark", None):
        return _benchmark_dir(args)
    if args.report_dir:
        return Path(args.report_dir)
    if args.out:
        return Path(args.out) / "eval" / f"{_part(args)}-{args.split}"
    if args.predictions:
        return Path(args.predictions).resolve().parent
    return Path("mg-geo-eval")


def run(args) -> int:
    from pipeline.evaluate.benchmarks import BenchmarkError
    from pipeline.evaluate.predictions import GroundTruthError

    try:
        if args.benchmark:
            return _run_benchmark(args)
        if args.images:
            raise BenchmarkError("--images needs --benchmark NAME")
        if args.predictions:
            return _score_file(args)
        return _run_model(args)
    except (GroundTruthError, BenchmarkError, FileNotFoundError) as exc:
        print(f"mg-geo eval: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _overrides(args) -> dict:
    return {field: getattr(args, f"{field}_column") for field in ("id", "lat", "lon", "country", "region", "city")
            if getattr(args, f"{field}_column")}


def _run_benchmark(args) -> int:
    """--benchmark: score a predictions file against it, or run the model over its images."""
    from pipeline.evaluate.benchmarks import BenchmarkError, as_shard_samples, load_benchmark
    from pipeline.evaluate.predictions import read_predictions

    if args.interactive and args.user == "replay":
        raise BenchmarkError("--user replay needs the corpus' dialogue/test split (--out), not a benchmark")
    if not args.predictions and not args.images:
        raise BenchmarkError(f"--benchmark {args.benchmark} needs --images DIR (or --predictions FILE to score)")
    bench = load_benchmark(args.benchmark, args.images if not args.predictions else None, args.ground_truth,
                           _overrides(args))
    if args.predictions:
        truths = bench.truths
        if args.limit:
            truths = truths[:args.limit]
        inputs = {"benchmark": args.benchmark, "predictions": args.predictions, "ground_truth": str(bench.ground_truth)}
        return _finish(args, truths, read_predictions(args.predictions), inputs)
    if not bench.samples:
        raise BenchmarkError(f"--images {args.images}: none of the {len(bench.images_missing)} images of "
                             f"{bench.ground_truth} found there")
    if bench.images_missing:
        print(f"mg-geo eval: {len(bench.images_missing)} of {len(bench.images_missing) + len(bench.samples)} "
              f"images not found under {args.images} (first: {bench.images_missing[0]}); they are not evaluated",
              file=sys.stderr)
    samples = bench.samples[:args.limit] if args.limit else bench.samples
    unreadable: list[str] = []
    extra = {"images_missing": len(bench.images_missing), "images_unreadable": unreadable}
    inputs = {"benchmark": args.benchmark, "images": args.images, "benchmark_ground_truth": str(bench.ground_truth)}
    return _run_on(args, as_shard_samples(samples, unreadable), inputs, extra)



def _truths_from_shards(paths: list[str]):
    from pipeline.evaluate.predictions import truth_from_sample
    from pipeline.evaluate.shards import iter_samples

    truths = [truth_from_sample(s.record) for s in iter_samples(paths)]
    return [t for t in truths if t is not None]


def _score_file(args) -> int:
    from pipeline.evaluate.predictions import read_ground_truth, read_predictions

    if args.ground_truth:
        truths, truth_source = read_ground_truth(args.ground_truth), args.ground_truth
    else:
        paths = _shards(args)
        if not paths:
            print("mg-geo eval: --predictions needs --ground-truth, or --out/--shards to read it from",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        truths, truth_source = _truths_from_shards(paths), f"{len(paths)} shards"
    if args.limit:
        truths = truths[:args.limit]
    inputs = {"predictions": args.predictions, "ground_truth": truth_source}
    return _finish(args, truths, read_predictions(args.predictions), inputs)


def _finish(args, truths, pred_file, inputs: dict, extra: dict | None = None) -> int:
    from pipeline.evaluate.interactive import score_dialogues
    from pipeline.evaluate.report import write_report
    from pipeline.evaluate.single import score_files

    if not truths:
        print("mg-geo eval: the ground truth is empty: nothing to score", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.evaluate.report import write_summary
    from pipeline.evaluate.simulated import is_simulated, score_simulated

    if args.interactive:
        score = score_simulated if is_simulated(pred_file) else score_dialogues
    else:
        score = score_files
    report, curves = score(truths, pred_file, inputs)
    report.update(extra or {})
    paths = write_report(_report_dir(args), report, curves)
    print(paths["markdown"].read_text(encoding="utf-8"))
    if args.benchmark:  # the runs of REPORT_DIR/*/ in one table
        summary = write_summary(_report_dir(args).parent)
        paths.update({"summary": summary["markdown"], "summary_cdf": summary["cdf"]})
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def _run_model(args) -> int:
    from pipeline.evaluate.shards import iter_samples

    paths = _shards(args)
    if not paths:
        where = " ".join(args.shards) if args.shards else (
            f"{args.out}/{_part(args)}/{args.split}/*.tar" if args.out else "(no --out or --shards given)")
        print(f"mg-geo eval: no shards found at {where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    samples = iter_samples(paths)
    if args.limit:
        from pipeline.evaluate.single import limited
        samples = limited(samples, args.limit)
    return _run_on(args, samples, {"shards": f"{len(paths)} shards ({paths[0]} ...)"}, {})


def _run_on(args, samples, inputs: dict, extra: dict) -> int:
    """Run the model over samples (ShardSample-like) the way the flags ask; score what it wrote."""
    from pipeline.evaluate import interactive, model, simulated
    from pipeline.evaluate.interactive import predict_dialogues
    from pipeline.evaluate.predictions import read_ground_truth, read_predictions
    from pipeline.evaluate.single import predict_split
    from pipeline.lvlm import open_backend
    from pipeline.lvlm.options import options_from_args
    from pipeline.lvlm.types import LvlmUnavailable

    options = options_from_args(args)
    try:
        backend = open_backend(options)
    except LvlmUnavailable as exc:
        print(f"mg-geo eval: no model to evaluate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out_dir = _report_dir(args)
    skipped_list: list[str] = []
    try:
        common = dict(sampling={}, batch_size=args.batch_size)
        if args.interactive and args.user == "replay":
            pred_path, truth_path, skipped = predict_dialogues(
                backend, samples, out_dir, max_corrections=args.max_corrections, **common)
            prompt_version = interactive.PROMPT_VERSION
        elif args.interactive:
            pred_path, truth_path = simulated.simulate(
                backend, simulated.cases_from_samples(samples, skipped_list), out_dir, modes=args.modes,
                rounds=args.max_corrections, **common)
            skipped, prompt_version = len(skipped_list), simulated.PROMPT_VERSION
        else:
            pred_path, truth_path, skipped = predict_split(backend, samples, out_dir, **common)
            prompt_version = model.PROMPT_VERSION
        stats = backend.stats()
    finally:
        backend.close()
    _, schema_version = model.prediction_schema()
    inputs = {**inputs, "predictions": str(pred_path), "ground_truth": str(truth_path), "backend": backend.name,
              "model": backend.model, "prompt_version": prompt_version, "schema_version": schema_version}
    if "images_unreadable" in extra:
        extra["images_unreadable"] = len(extra["images_unreadable"])
    extra = {**extra, "skipped_samples": skipped, "lvlm": {"options": options.public_dict(), "stats": stats}}
    if skipped_list:
        extra["skipped"] = skipped_list[:100]
    return _finish(args, read_ground_truth(truth_path), read_predictions(pred_path), inputs, extra)
