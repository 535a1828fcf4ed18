"""Not a benchmark: a self-contained reproduction of the Beam local-runner bug the build works
around (pipeline/beam/graph.py counts inputs from a tagged output; ledger rows become pieces before
any Flatten; llm_parts hands the chosen keys over as a side input instead of a split and Flatten).

Beam's FnApiRunner with 2 workers (multi_processing) loses elements from a Flatten of a DoFn's
main and tagged outputs when the elements are large (~60 KB here) and the Flatten is read in a
later stage: 4 of 9 runs on the 2-core VM lost 183 to 1,600 of 20,000 (apache-beam 2.77,
2026-12-02); whole data chunks seem to go missing. Small elements were not seen to be lost.
Run it after a Beam upgrade to see whether the workarounds are still needed:

    python bench/repro_beam_flatten_loss.py [--runs 6]
"""
from __future__ import annotations

import argparse
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

UNITS, PER_UNIT, SIZE = 8, 2500, 60_000


class Emit(beam.DoFn):
    def process(self, unit):
        for i in range(PER_UNIT):
            if i % 1000 == 999:
                yield beam.pvalue.TaggedOutput("other", (unit, i))
            else:
                yield unit, i, bytes(SIZE)


def count_through_flatten(result_path: str) -> None:
    args = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions(args)) as p:
        out = (p | beam.Create(list(range(UNITS))) | beam.Reshuffle()
               | beam.ParDo(Emit()).with_outputs("other", main="main"))
        _ = ((out.main, out.other) | beam.Flatten() | beam.Map(lambda e: 1)
             | beam.CombineGlobally(sum).without_defaults()
             | beam.Map(lambda n: open(result_path, "w").write(str(n))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--result", default="/tmp/mg-geo-flatten-count.txt")
    args = parser.parse_args()
    lost_runs = 0
    for run in range(args.runs):
        count_through_flatten(args.result)
        with open(args.result) as f:
            n = int(f.read())
        lost_runs += n != UNITS * PER_UNIT
        print(f"run {run + 1}: {n} of {UNITS * PER_UNIT} elements through the Flatten", flush=True)
    print(f"{lost_runs} of {args.runs} runs lost elements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
