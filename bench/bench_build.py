"""Benchmark: build the Meta part from N generated sample photos; print records/s and the share of
wall time each stage's own work takes (measured side by side in one run, so machine noise cancels).

    python bench/bench_build.py [--n 2000] [--workers 1] [BEAM FLAGS]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.build import BuildConfig, run_build  # noqa: E402
from pipeline.sample_images import write_samples  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--work", default=".bench-out")
    parser.add_argument("--workers", type=int, default=1, help=">1: multi_processing DirectRunner workers")
    args, beam_args = parser.parse_known_args()
    work = Path(args.work)
    photos = work / f"samples-{args.n}"
    if not (photos / "expected.jsonl").exists():
        t = time.perf_counter()
        write_samples(str(photos), args.n, seed=1)
        print(f"generated {args.n} sample photos in {time.perf_counter() - t:.1f}s")
    if args.workers > 1:
        beam_args += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # the last run's corpus: deleting it is not this build's work
    start = time.perf_counter()
    report = run_build(BuildConfig(sources=[f"exif:{photos}"], out=str(out)), beam_args)
    wall = time.perf_counter() - start
    n_in = report["inputs_total"]
    stages = report["stages"]
    stage_s = {name: c.get("micros", 0) / 1e6 for name, c in stages.items() if c.get("micros")}
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
          f"other {wall - sum(v for v in timing.values() if v):.2f}s)")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"peak RSS of this process: {peak_mib:.0f} MiB (in-process runner: the whole job)")
    print(json.dumps({"records_per_s": round(n_in / wall, 1), "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib),
                      "stage_share": round(total / (args.workers * wall), 3), "timing": timing,
                      "stage_s": {k: round(v, 2) for k, v in stage_s.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
