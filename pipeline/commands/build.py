"""`mg-geo build`: sources in, corpus out. Flags it does not know go to Beam's PipelineOptions."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from pipeline.io.shard_limits import ShardLimits
from pipeline.core.record import PARTS
from pipeline.commands.argtypes import positive_int

log = logging.getLogger("pipeline.beam.run")


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"split ratios must be three numbers like 0.9,0.05,0.05, got {text!r}")
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"split ratios must be three non-negative numbers summing to 1, got {text!r}")
    return values


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"--parts takes a comma list of {', '.join(PARTS)}; got {text!r}")
    return tuple(p for p in PARTS if p in parts)  # canonical order


def register(sub) -> None:
    p = sub.add_parser("build", help="build the corpus (WebDataset shards) from geotagged images",
                       description="Build the MG-Geo corpus. Unknown flags (--runner, --direct_num_workers, "
                       "--direct_running_mode, --setup_file, --temp_location ...) go to Apache Beam.")
    p.add_argument("--source", action="append", required=True, metavar="KIND:LOCATION",
                   help="exif:DIR, table:FILE (csv/tsv/parquet/jsonl), wds:PATTERN or osv5m:DIR; repeat to mix")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    p.add_argument("--parts", type=_parts, default=("meta",), help="comma list of meta,clue,dialogue (default meta)")
    p.add_argument("--max-side", type=int, default=768, help="longer image side after resizing (default 768)")
    p.add_argument("--reencode-jpeg", action="store_true",
                   help="decode and re-encode every JPEG (default: a JPEG that is already upright, RGB, small "
                        "enough, without a colour profile and at no more than quality 90 keeps its own data, "
                        "metadata removed, so it loses nothing)")
    p.add_argument("--max-place-km", type=float, default=50.0,
                   help="reject points farther than this from any geocoder place and from land (default 50)")
    p.add_argument("--max-city-km", type=float, default=25.0,
                   help="the text names a city only within this distance of a place of the photo's own country, "
                        "'near' one up to twice it, none beyond (default 25)")
    p.add_argument("--meta-templates", choices=("v1", "v2"), default="v2",
                   help="Meta part templates: v2 (varied single- and multi-turn, default) or v1 (four fixed turns)")
    p.add_argument("--coast-km", type=float, default=25.0,
                   help="points outside every country polygon take the nearest one within this distance (default 25)")
    p.add_argument("--dedupe-radius", type=int, default=4, help="perceptual-hash Hamming radius for near duplicates (default 4)")
    p.add_argument("--split-ratios", type=_ratios, default=(0.90, 0.05, 0.05), help="train,val,test (default 0.9,0.05,0.05)")
    p.add_argument("--split-link-km", type=float, default=1.0,
                   help="photos closer than this always share a split (default 1 km)")
    p.add_argument("--shard-max-samples", type=positive_int, default=ShardLimits.max_samples,
                   help="samples per shard at most (default %(default)s)")
    p.add_argument("--shard-max-bytes", type=positive_int, default=ShardLimits.max_bytes,
                   help="bytes per shard at most (default %(default)s)")
    p.add_argument("--shard-min-count", type=positive_int, default=ShardLimits.min_shards,
                   help="shards per part and split at least, while each keeps %d samples (default "
                        "%%(default)s): DataLoader workers and nodes read whole shards"
                        % ShardLimits.min_shard_samples)
    p.add_argument("--image-column", help="table/wds: image column (auto-detected by default)")
    p.add_argument("--lat-column", help="table/wds: latitude column (auto: lat, latitude)")
    p.add_argument("--lon-column", help="table/wds: longitude column (auto: lon, lng, longitude)")
    p.add_argument("--id-column", help="table: id column (auto: id, key, image_id)")
    g = p.add_argument_group("URL tables (img2dataset; the `download` extra)")
    g.add_argument("--download", action="store_true",
                   help="fetch the images of every table: source (as `mg-geo download` does) into "
                        "OUT/_download/, kept across runs so a rerun resumes; failed URLs become ledger rows; "
                        "then the build reads the downloaded shards")
    g.add_argument("--download-processes", type=positive_int, default=1, help="download processes (default 1)")
    g.add_argument("--download-threads", type=positive_int, default=32, help="threads per process (default 32)")
    g.add_argument("--download-timeout", type=float, default=10.0, help="seconds per request (default 10)")
    try:
        from pipeline.lvlm.options import add_lvlm_arguments
        from pipeline.commands.part_arguments import add_part_arguments
    except ImportError:  # the LVLM stack is optional for a meta-only build
        pass
    else:
        add_lvlm_arguments(p)
        add_part_arguments(p)
    p.set_defaults(func=run, accepts_extra=True)


def config_from_args(args):
    from pipeline.beam.run import BuildConfig

    source_options = {k: getattr(args, k) for k in ("image_column", "lat_column", "lon_column", "id_column")
                      if getattr(args, k, None)}
    return BuildConfig(
        sources=args.source, out=args.out.rstrip("/") or "/", parts=args.parts, max_side=args.max_side,
        copy_jpeg=not args.reencode_jpeg,
        max_place_km=args.max_place_km, coast_km=args.coast_km, max_city_km=args.max_city_km,
        meta_templates=args.meta_templates, dedupe_radius=args.dedupe_radius,
        split_ratios=args.split_ratios, split_link_km=args.split_link_km,
        limits=ShardLimits(args.shard_max_samples, args.shard_max_bytes, min_shards=args.shard_min_count),
        source_options=source_options, lvlm_args=args)


def download_tables(config, args, stack: contextlib.ExitStack) -> list[str]:
    """Each table: source -> its images fetched with img2dataset (its public `download()`, its own
    processes) -> the wds: source of those shards, which the build then reads (the ledger names
    the shard/KEY of a row; the row's own columns are in the provenance). Returns the build's sources."""
    from pipeline.io.download import DownloadOptions, prepared_download

    options = DownloadOptions(processes=args.download_processes, threads=args.download_threads,
                              timeout_s=args.download_timeout)
    sources = list(config.sources)
    for i, spec in enumerate(config.sources):
        if not spec.startswith("table:"):
            continue
        download = stack.enter_context(prepared_download(
            spec, f"{config.out}/_download/table-{i}", options, config.source_options))
        summary = download.run()
        log.info("downloaded %s: %s", spec, {k: summary[k] for k in ("rows", "downloaded")})
        sources[i] = download.wds_spec
    return sources


def run(args) -> int:
    from pipeline.beam.run import run_build
    from pipeline.io.download import DownloadIncomplete
    from pipeline.core.errors import BadArgument

    try:
        with contextlib.ExitStack() as stack:
            config = config_from_args(args)
            if args.download:
                config.sources = download_tables(config, args, stack)
            report = run_build(config, args.extra)
    except BadArgument as exc:
        # A bad argument: one clear message, no traceback, nothing built.
        print(f"mg-geo build: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if "img2dataset" not in str(exc):
            raise
        print(f"mg-geo build: error: --download needs img2dataset: pip install 'mg-geo[download]' ({exc})",
              file=sys.stderr)
        return 2
    except DownloadIncomplete as exc:
        print(f"mg-geo build: error: {exc} (run again to resume)", file=sys.stderr)
        return 1
    if report.get("dry_run"):
        print(json.dumps(report, indent=1))
        return 0
    summary = {"out": config.out, "inputs": report["inputs_total"], "samples": report["samples"],
               "rejected": report["rejected_total"], "conservation_ok": report["conservation_ok"]}
    print(json.dumps(summary, indent=1))
    return 0 if report["conservation_ok"] else 1
