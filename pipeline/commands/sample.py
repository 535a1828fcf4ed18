"""`mg-geo sample --out DIR --n N [--seed S]`: write a small test input set (see sample_images)."""
from __future__ import annotations

import sys
from pipeline.commands.argtypes import positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="write sample JPEGs with EXIF GPS (every continent) plus a few bad files",
        description="Write N JPEGs with real EXIF GPS tags at populated places on every inhabited "
                    "continent, plus one file of each bad kind (no GPS, truncated, null island, "
                    "empty), and expected.jsonl describing them. Use DIR as an exif: source.")
    parser.add_argument("--out", required=True, help="directory to write into (created if missing)")
    parser.add_argument("--n", type=positive_int, default=24, help="number of good images (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="same n and seed give identical files")
    parser.set_defaults(func=run)


def run(args) -> int:
    # Imported here so `mg-geo --help` does not load the place list and polygons.
    from pipeline.io.sample_set import EXPECTED_FILE, write_samples

    try:
        entries = write_samples(args.out, args.n, seed=args.seed)
    except OSError as exc:
        print(f"mg-geo sample: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 2
    good = sum(e["expected"] == "ok" for e in entries)
    print(f"wrote {good} images with GPS and {len(entries) - good} bad files to {args.out} "
          f"(described in {EXPECTED_FILE}); use it as the source exif:{args.out}")
    return 0
