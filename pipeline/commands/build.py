"""`mg-geo build`: sources in, corpus out. Flags it does not know go to Beam's PipelineOptions."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from pipeline.io.shard_limits import ShardLimits
from pipeline.core.record import PARTS
from pipeline.commands.argtypes import finite, int_between, positive_int

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
    p.add_argument("--out", required=True, help="output directory (local or gs://); a non-empty folder "
                   "that mg-geo did not make (no OUT/.mg-geo mark) is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="build into a non-empty OUT that mg-geo did not make; its README.md, plots/, meta/, "
                        "clue/, dialogue/, manifest.parquet, rejected.parquet and report.json are replaced")
    p.add_argument("--parts", type=_parts, default=("meta",), help="comma list of meta,clue,dialogue (default meta)")
    p.add_argument("--max-side", type=int_between(32, 65536), default=768, help="longer image side after resizing (default 768)")
    p.add_argument("--reencode-jpeg", action="store_true",
                   help="decode and re-encode every JPEG (default: a JPEG that is already upright, RGB, small "
                        "enough, without a colour profile and at no more than quality 90 keeps its own data, "
                        "metadata removed, so it loses nothing)")
    p.add_argument("--max-place-km", type=finite(0, inclusive=False), default=50.0,
                   help="reject points farther than this from any geocoder place and from land (default 50)")
    p.add_argument("--max-city-km", type=finite(0, inclusive=False), default=25.0,
                   help="the text names a city only within this distance of a place of the photo's own country, "
                        "'near' one up to twice it, none beyond (default 25)")
    p.add_argument("--meta-templates", choices=("v1", "v2"), default="v2",
                   help="Meta part templates: v2 (varied single- and multi-turn, default) or v1 (four fixed turns)")
    p.add_argument("--coast-km", type=finite(0), default=25.0,
                   help="points outside every country polygon take the nearest one within this distance (default 25)")
    p.add_argument("--dedupe-radius", type=int_between(0, 63), default=4, help="perceptual-hash Hamming radius for near duplicates (default 4)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="benchmark images that must not enter the corpus: a folder (recursive) or a .csv/.txt list "
                        "of image paths (relative to the list); an input with the same bytes, or a perceptual hash "
                        "within --dedupe-radius of one, is a ledger row (benchmark_overlap); repeat for several")
    p.add_argument("--split-ratios", type=_ratios, default=(0.90, 0.05, 0.05), help="train,val,test (default 0.9,0.05,0.05)")
    p.add_argument("--split-link-km", type=finite(0), default=1.0,
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
    p.add_argument("--table-format", dest="format", choices=("csv", "tsv", "parquet", "jsonl"),
                   help="table: its format when the file name does not say (default: from the extension)")
    p.add_argument("--encoding", help="table: text encoding of csv/tsv/jsonl tables (default utf-8); a row "
                   "that does not decode is a ledger row (row_encoding)")
    g = p.add_argument_group("URL tables (img2dataset; the `download` extra)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch the images of every table: source (as `mg-geo download` does) into "
                        "OUT/_download/, kept across runs so a rerun resumes; failed URLs become ledger rows; "
                        "then the build reads the downloaded shards. Default: a table whose images are all "
                        "URLs is downloaded (a log line says so); --no-download builds from the table "
                        "itself, where every URL row is a ledger row (url_not_downloaded)")
    g.add_argument("--download-processes", type=positive_int, default=1, help="download processes (default 1)")
    g.add_argument("--download-threads", type=positive_int, default=32, help="threads per process (default 32)")
    g.add_argument("--download-timeout", type=finite(0, inclusive=False), default=10.0, help="seconds per request (default 10)")
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

    source_options = {k: getattr(args, k) for k in ("image_column", "lat_column", "lon_column", "id_column", "encoding", "format")
                      if getattr(args, k, None)}
    return BuildConfig(
        sources=args.source, out=args.out.rstrip("/") or "/", parts=args.parts, max_side=args.max_side,
        copy_jpeg=not args.reencode_jpeg,
        max_place_km=args.max_place_km, coast_km=args.coast_km, max_city_km=args.max_city_km,
        meta_templates=args.meta_templates, dedupe_radius=args.dedupe_radius,
        split_ratios=args.split_ratios, split_link_km=args.split_link_km,
        limits=ShardLimits(args.shard_max_samples, args.shard_max_bytes, min_shards=args.shard_min_count),
        source_options=source_options, overwrite=args.overwrite, lvlm_args=args,
        exclude=tuple(args.exclude))


def download_tables(config, args, specs: list[str], stack: contextlib.ExitStack) -> list[str]:
    """Each table: source in `specs` -> its images fetched with img2dataset (its public `download()`,
    its own processes) -> the wds: source of those shards, which the build then reads (the ledger
    names the shard/KEY of a row; the row's own columns are in the provenance). Returns the build's sources."""
    from pipeline.io.download import DownloadOptions, prepared_download

    options = DownloadOptions(processes=args.download_processes, threads=args.download_threads,
                              timeout_s=args.download_timeout)
    sources = list(config.sources)
    for i, spec in enumerate(config.sources):
        if spec not in specs:
            continue
        download = stack.enter_context(prepared_download(
            spec, f"{config.out}/_download/table-{i}", options, config.source_options))
        summary = download.run()
        log.info("downloaded %s: %s", spec, {k: summary[k] for k in ("rows", "downloaded")})
        sources[i] = download.wds_spec
    return sources


def tables_to_download(config, download) -> list[str]:
    """--download: every table; --no-download: none; neither: the tables whose images are URLs."""
    from pipeline.io.sources import parse_source

    tables = [spec for spec in config.sources if spec.startswith("table:")]
    if download is not None:
        return tables if download else []
    chosen = []
    for spec in tables:
        source = parse_source(spec, config.source_options)
        source.check()
        if source.is_url_table():
            log.info("%s lists image URLs: downloading them into %s/_download (--no-download builds "
                     "without, every URL row a ledger row)", spec, config.out)
            chosen.append(spec)
    return chosen


def _fail(message: str, status: int) -> int:
    print(f"mg-geo build: {message}", file=sys.stderr)
    return status


def run(args) -> int:
    """Any failure ends in one line on stderr: 2 for a bad argument, 1 for a failed run, 130 for
    Ctrl-C (`-v` adds the traceback to the log). A failed run leaves nothing outside OUT/_tmp."""
    from pipeline.beam.run import run_build
    from pipeline.io import outdir
    from pipeline.io.download import DownloadIncomplete
    from pipeline.core.errors import BadArgument

    try:
        with contextlib.ExitStack() as stack:
            config = config_from_args(args)
            specs = tables_to_download(config, args.download)
            if specs:
                # OUT is checked, marked and locked before the download writes OUT/_download.
                stack.enter_context(outdir.locked(config.out))
                outdir.claim(config.out, config.overwrite)
                config.sources = download_tables(config, args, specs, stack)
            report = run_build(config, args.extra)
    except BadArgument as exc:
        # A bad argument: one clear message, no traceback, nothing built.
        return _fail(f"error: {exc}", 2)
    except ImportError as exc:
        if "img2dataset" not in str(exc):
            return _failed(exc)
        return _fail(f"error: downloading URL tables needs img2dataset: pip install 'mg-geo[download]' "
                     f"(or --no-download) ({exc})", 2)
    except DownloadIncomplete as exc:
        return _fail(f"error: {exc} (run again to resume)", 1)
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback with -v
        if isinstance(_root_cause(exc), KeyboardInterrupt):  # Beam wraps a Ctrl-C in its own error
            return _interrupted()
        return _failed(exc)
    if report.get("dry_run"):
        print(json.dumps(report, indent=1))
        return 0
    summary = {"out": config.out, "inputs": report["inputs_total"], "samples": report["samples"],
               "rejected": report["rejected_total"], "conservation_ok": report["conservation_ok"]}
    print(json.dumps(summary, indent=1))
    return 0 if report["conservation_ok"] else 1


def _interrupted() -> int:
    return _fail("interrupted; OUT/_tmp was removed, run again to build", 130)


def _failed(exc: BaseException) -> int:
    log.debug("the build failed", exc_info=exc)
    cause = _root_cause(exc)
    return _fail(f"failed: {type(cause).__name__}: {_last_line(cause)} (OUT/_tmp was removed; -v shows "
                 f"the traceback)", 1)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: Beam wraps a worker's error in its own (the text repeats it)."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else ""
