"""`mg-geo eval`: run a model over the test split and score it, or score a predictions file.

    mg-geo eval --out OUT --lvlm-endpoint http://localhost:8000/v1          # meta/test, one guess each
    mg-geo eval --out OUT --interactive --lvlm-backend transformers --lvlm-model ./ckpt  # dialogue/test
    mg-geo eval --predictions preds.jsonl --ground-truth osv5m_test.csv      # score a file
    mg-geo eval --interactive --predictions dialogue_predictions.jsonl --ground-truth ground_truth.csv

Writes metrics.json, metrics.md and error_cdf.png to --report-dir; a model run also writes its
predictions (jsonl) and the ground truth (OSV-5M csv layout) there, and the metrics are computed
from those two files, so `--predictions/--ground-truth` on them reproduces the numbers.
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


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="evaluate a geolocation model on the test split, or score a predictions file",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the corpus (mg-geo build --out): shards under OUT/{meta,dialogue}/SPLIT/*.tar")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--shards", nargs="+", metavar="PATH",
                   help="explicit shard files, directories or glob patterns instead of --out")
    p.add_argument("--interactive", action="store_true",
                   help="dialogue evaluation: first guess, then revised after the sample's 1st and 2nd corrections")
    p.add_argument("--max-corrections", type=_non_negative, default=2,
                   help="--interactive: user turns fed after the first guess (default 2)")
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
    return "dialogue" if args.interactive else "meta"


def _shards(args) -> list[str]:
    from pipeline.evaluate.shards import expand, shard_paths

    if args.shards:
        return expand(args.shards)
    if args.out:
        return shard_paths(args.out, _part(args), args.split)
    return []


def _report_dir(args) -> Path:
    if args.report_dir:
        return Path(args.report_dir)
    if args.out:
        return Path(args.out) / "eval" / f"{_part(args)}-{args.split}"
    if args.predictions:
        return Path(args.predictions).resolve().parent
    return Path("mg-geo-eval")


def run(args) -> int:
    from pipeline.evaluate.predictions import GroundTruthError

    try:
        if args.predictions:
            return _score_file(args)
        return _run_model(args)
    except (GroundTruthError, FileNotFoundError) as exc:
        print(f"mg-geo eval: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


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
    score = score_dialogues if args.interactive else score_files
    report, curves = score(truths, pred_file, inputs)
    report.update(extra or {})
    paths = write_report(_report_dir(args), report, curves)
    print(paths["markdown"].read_text(encoding="utf-8"))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def _run_model(args) -> int:
    from pipeline.evaluate import interactive, model
    from pipeline.evaluate.interactive import predict_dialogues
    from pipeline.evaluate.predictions import read_ground_truth, read_predictions
    from pipeline.evaluate.shards import iter_samples
    from pipeline.evaluate.single import predict_split
    from pipeline.lvlm import open_backend
    from pipeline.lvlm.options import options_from_args
    from pipeline.lvlm.types import LvlmUnavailable

    paths = _shards(args)
    if not paths:
        where = " ".join(args.shards) if args.shards else (
            f"{args.out}/{_part(args)}/{args.split}/*.tar" if args.out else "(no --out or --shards given)")
        print(f"mg-geo eval: no shards found at {where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = options_from_args(args)
    try:
        backend = open_backend(options)
    except LvlmUnavailable as exc:
        print(f"mg-geo eval: no model to evaluate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out_dir = _report_dir(args)
    try:
        common = dict(sampling={}, batch_size=args.batch_size, limit=args.limit)
        if args.interactive:
            pred_path, truth_path, skipped = predict_dialogues(
                backend, iter_samples(paths), out_dir, max_corrections=args.max_corrections, **common)
        else:
            pred_path, truth_path, skipped = predict_split(backend, iter_samples(paths), out_dir, **common)
        stats = backend.stats()
    finally:
        backend.close()
    _, schema_version = model.prediction_schema()
    inputs = {"shards": f"{len(paths)} shards ({paths[0]} ...)", "predictions": str(pred_path),
              "ground_truth": str(truth_path), "backend": backend.name, "model": backend.model,
              "prompt_version": interactive.PROMPT_VERSION if args.interactive else model.PROMPT_VERSION,
              "schema_version": schema_version}
    extra = {"skipped_samples": skipped, "lvlm": {"options": options.public_dict(), "stats": stats}}
    return _finish(args, read_ground_truth(truth_path), read_predictions(pred_path), inputs, extra)
