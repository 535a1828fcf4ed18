"""Benchmark: peak memory building 2k vs 20k records (goal: the larger build needs <= 1.2x).

Each size runs in its own process on the in-process runner (one process = the whole job, so its
peak RSS is the job's), one after the other in this run; prints both peaks and their ratio.

    python bench/bench_memory.py [--small 2000] [--large 20000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(n: int, work: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "bench_build.py"), "--n", str(n), "--work", work],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--work", default=".bench-out")
    args = parser.parse_args()
    small, large = run(args.small, args.work), run(args.large, args.work)
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    print(f"{args.small:>6} records: peak {small['peak_rss_mib']} MiB, {small['records_per_s']} records/s")
    print(f"{args.large:>6} records: peak {large['peak_rss_mib']} MiB, {large['records_per_s']} records/s")
    print(f"peak memory ratio {ratio:.2f} (goal <= 1.2) for {args.large / args.small:.0f}x the records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
