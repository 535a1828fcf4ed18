"""`mg-geo stats OUT`: draw the plots of a finished build and link them from its dataset card."""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats", help="draw plots (map, countries, splits, rejections) of a built corpus",
        description="Read OUT/report.json, manifest.parquet and rejected.parquet of a finished build, write "
                    "PNG plots under OUT/plots/, list them in report.json and rewrite the dataset card "
                    "OUT/README.md so it shows them.")
    parser.add_argument("out", metavar="OUT", help="output directory of a finished `mg-geo build` (local or gs://)")
    parser.set_defaults(func=run, accepts_extra=False)


def run(args) -> int:
    # Imported here so `mg-geo --help` does not load Beam, pyarrow or matplotlib.
    from apache_beam.io.filesystems import FileSystems

    from pipeline.io import outdir
    from pipeline.report.card import count_shards, render_card
    from pipeline.report.plots import make_plots

    report_path = outdir.join(args.out, "report.json")
    if not FileSystems.exists(report_path):
        print(f"mg-geo stats: {report_path} not found; run `mg-geo build --out {args.out}` first",
              file=sys.stderr)
        return 2
    rep = json.loads(outdir.read_text(report_path))
    rep["plots"] = make_plots(args.out, rep)
    outdir.write_text(report_path, json.dumps(rep, indent=1, sort_keys=True))
    outdir.write_text(outdir.join(args.out, "README.md"), render_card(rep, count_shards(args.out, rep["config"]["parts"])))
    for path in rep["plots"]:
        print(outdir.join(args.out, path))
    return 0
