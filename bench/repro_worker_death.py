"""Not a benchmark: does Beam's local multi_processing runner fail the job, or hang, when one of
its worker processes dies in the middle of a bundle (killed, or exiting by itself)?

With apache-beam 2.77 it fails the job at once: `RuntimeError: Channel closed prematurely.`
(about 2.5 s on the 2-core VM, for SIGKILL and for a clean exit with status 0 alike), so the
build needs no watchdog of its own. Run it after a Beam upgrade to see that this still holds:

    python bench/repro_worker_death.py [--how kill|exit0] [--timeout 120]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions


def die_on_seven(x: int) -> int:
    if x == 7:
        if os.environ["REPRO_HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    return x


def job() -> None:
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    with beam.Pipeline(runner="FnApiRunner", options=options) as p:
        _ = p | beam.Create(list(range(20))) | beam.Map(die_on_seven) | beam.combiners.Count.Globally()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--how", choices=("kill", "exit0"), default="kill")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job()
        return 0
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--job"], env={**os.environ, "REPRO_HOW": args.how},
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"HANG: the job did not end within {args.timeout:.0f} s after a worker died ({args.how})")
        return 1
    last = (done.stderr.strip().splitlines() or [""])[-1]
    verdict = "failed the job" if done.returncode else "FINISHED as if nothing happened"
    print(f"{args.how}: {verdict} in {time.perf_counter() - started:.1f} s (exit {done.returncode}): {last[:200]}")
    return 0 if done.returncode else 1


if __name__ == "__main__":
    sys.exit(main())
