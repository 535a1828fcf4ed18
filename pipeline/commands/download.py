"""`mg-geo download`: a table of photo URLs -> WebDataset shards (through img2dataset), then print the
`mg-geo build` command that builds the corpus from them."""
from __future__ import annotations

import json
import shlex
import sys
from pipeline.commands.argtypes import at_least, positive_seconds


def register(sub) -> None:
    p = sub.add_parser(
        "download", help="download the photos of a URL table into WebDataset shards (img2dataset)",
        description="Fetch every URL of a table:FILE source (csv/tsv/parquet/jsonl with an image URL "
        "column and lat/lon) with img2dataset into DL_DIR/NNNNN.tar shards that keep the original "
        "bytes, the coordinates and every other column; URLs that fail are listed in "
        "DL_DIR/NNNNN.parquet and reach the build's ledger with their reason. Needs the `download` "
        "extra (pip install 'mg-geo[download]').")
    p.add_argument("--source", required=True, metavar="table:FILE", help="the URL table")
    p.add_argument("--out", required=True, metavar="DL_DIR", help="shard directory (local or a fsspec URL)")
    p.add_argument("--processes", type=at_least(1), default=1, help="download processes (default 1)")
    p.add_argument("--threads", type=at_least(1), default=32, help="threads per process (default 32)")
    p.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--retries", type=at_least(0), default=0, help="extra tries per URL (default 0)")
    p.add_argument("--samples-per-shard", type=at_least(1), default=None,
                   help="rows per shard (default: the table in 8 shards of 100 to 10000 rows, so that "
                        "several processes download and several workers build)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards of an earlier run first (only NNNNN.tar, .parquet, _stats.json; "
                   "default: resume, keeping the shards already finished)")
    p.add_argument("--image-column", help="URL column (auto: image, url, image_url, path ...)")
    p.add_argument("--lat-column", help="latitude column (auto: lat, latitude)")
    p.add_argument("--lon-column", help="longitude column (auto: lon, lng, longitude)")
    p.add_argument("--id-column", help="id column (auto: id, key, image_id)")
    p.add_argument("--encoding", help="text encoding of a csv/tsv/jsonl table (default utf-8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.io.download import DownloadIncomplete, DownloadOptions, run_download
    from pipeline.core.errors import BadArgument

    source_options = {k: getattr(args, k) for k in ("image_column", "lat_column", "lon_column", "id_column", "encoding")
                      if getattr(args, k, None)}
    options = DownloadOptions(processes=args.processes, threads=args.threads, timeout_s=args.timeout,
                              retries=args.retries, samples_per_shard=args.samples_per_shard,
                              overwrite=args.overwrite)
    try:
        summary = run_download(args.source, args.out, options, source_options)
    except BadArgument as exc:
        print(f"mg-geo download: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"mg-geo download: error: img2dataset is not installed ({exc}); "
              f"install the extra: pip install 'mg-geo[download]'", file=sys.stderr)
        return 2
    except DownloadIncomplete as exc:
        print(f"mg-geo download: error: {exc}", file=sys.stderr)
        return 1
    corpus = summary["out"] + "-corpus"  # a suggestion: any --out works
    summary["next"] = (f"mg-geo build --source {shlex.quote('wds:' + summary['wds_pattern'])} "
                       f"--out {shlex.quote(corpus)}")
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, indent=1))
    print(f"next: {summary['next']}")
    return 0
