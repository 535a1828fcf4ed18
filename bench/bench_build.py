"""Benchmark: build the Meta part from N generated sample photos; print records/s and the share of
wall time each stage's own work takes (measured side by side in one run, so machine noise cancels).

Each build runs in a fresh process, as `mg-geo build` does; the wall time is run_build's, without
the interpreter's start and imports.

    python bench/bench_build.py [--n 2000] [--workers 1] [--baseline N0] [BEAM FLAGS]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.beam.run import BuildConfig, run_build  # noqa: E402
from pipeline.io.sample_set import write_samples  # noqa: E402


def photos_for(work: Path, n: int) -> Path:
    photos = work / f"samples-{n}"
    if not (photos / "expected.jsonl").exists():
        t = time.perf_counter()
        write_samples(str(photos), n, seed=1)
        print(f"generated {n} sample photos in {time.perf_counter() - t:.1f}s")
    return photos


def build(work: Path, n: int, beam_args: list[str]) -> tuple[float, dict, float]:
    """(wall seconds, report, peak RSS MiB) of one build of n generated photos, in a fresh process."""
    photos_for(work, n)  # generated here, before any timing
    done = subprocess.run([sys.executable, __file__, "--one-build", str(n), "--work", str(work), *beam_args],
                          stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall_s"], result["report"], result["peak_rss_mib"]


def one_build(work: Path, n: int, beam_args: list[str]) -> None:
    """The child: one timed run_build; prints {wall_s, report, peak_rss_mib} as its last line."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # the last run's corpus: deleting it is not this build's work
    start = time.perf_counter()
    report = run_build(BuildConfig(sources=[f"exif:{photos_for(work, n)}"], out=str(out)), beam_args)
    wall = time.perf_counter() - start
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"wall_s": wall, "report": report, "peak_rss_mib": peak / 1024}))  # Linux: KiB


def stage_seconds(report: dict) -> dict:
    return {name: c.get("micros", 0) / 1e6 for name, c in report["stages"].items() if c.get("micros")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--work", default=".bench-out")
    parser.add_argument("--workers", type=int, default=1, help=">1: multi_processing DirectRunner workers")
    parser.add_argument("--baseline", type=int, default=0, metavar="N0",
                        help="also build N0 photos first and print the marginal share: the stage work "
                             "of the N - N0 extra records against the wall time they added (what a "
                             "build's fixed costs, paid once per run, do not reach)")
    parser.add_argument("--one-build", type=int, help=argparse.SUPPRESS)  # the child of build()
    args, beam_args = parser.parse_known_args()
    work = Path(args.work)
    if args.one_build is not None:
        one_build(work, args.one_build, beam_args)
        return 0
    if args.workers > 1:
        beam_args += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    baseline = build(work, args.baseline, beam_args) if args.baseline else None
    wall, report, peak_mib = build(work, args.n, beam_args)
    n_in = report["inputs_total"]
    stages = report["stages"]
    stage_s = stage_seconds(report)
    print(f"inputs {n_in}  samples {report['samples'].get('meta', {}).get('total', 0)}  "
          f"wall {wall:.1f}s  records/s {n_in / wall:.1f}  (workers={args.workers}, cpus={os.cpu_count()})")
    print("stage      seconds  share_of_wall  ms/record")
    for name, secs in sorted(stage_s.items(), key=lambda kv: -kv[1]):
        print(f"{name:<10} {secs:7.2f}  {secs / wall:12.1%}  {1000 * secs / max(1, stages[name].get('in', 1)):9.2f}")
    total = sum(stage_s.values())
    print(f"stage work / wall = {total / wall:.2f} (x{args.workers} workers of CPU available)")
    # The goal's figure: stage work against all the CPU the workers had for the whole build; then
    # where the rest went (report.json's timing): building the graph, the job, report and plots.
    timing = report.get("timing", {})
    job = timing.get("job_s") or wall
    print(f"stage work share of {args.workers} x wall = {total / (args.workers * wall):.0%}; of "
          f"{args.workers} x the job alone = {total / (args.workers * job):.0%}  (graph {timing.get('graph_s')}s, "
          f"job {timing.get('job_s')}s, report+plots {timing.get('report_and_plots_s')}s, "
          f"other {wall - sum(v for k, v in timing.items() if k.endswith('_s')):.2f}s)")
    result = {"records_per_s": round(n_in / wall, 1), "wall_s": round(wall, 1),
              "stage_share": round(total / (args.workers * wall), 3), "timing": timing,
              "stage_s": {k: round(v, 2) for k, v in stage_s.items()}}
    if baseline:
        wall0, report0, _ = baseline
        total0 = sum(stage_seconds(report0).values())
        marginal = (total - total0) / (args.workers * (wall - wall0))
        print(f"marginal: {n_in - report0['inputs_total']} more records added {wall - wall0:.1f}s of wall and "
              f"{total - total0:.1f}s of stage work: share {marginal:.0%} "
              f"(N0={report0['inputs_total']}: wall {wall0:.1f}s, stage work {total0:.1f}s)")
        result["marginal_share"] = round(marginal, 3)
        result["baseline"] = {"n": report0["inputs_total"], "wall_s": round(wall0, 1), "stage_work_s": round(total0, 2)}
    print(f"peak RSS of the build's process or one of its workers: {peak_mib:.0f} MiB")
    print(json.dumps({**result, "peak_rss_mib": round(peak_mib)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
