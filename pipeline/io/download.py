"""The download stage: a `table:` source whose image column holds URLs -> WebDataset shards, through
img2dataset's Python API (`img2dataset.download`), ready for `mg-geo build --source wds:...`.

Decisions:
- The original bytes are kept (`disable_all_reencoding=True`): img2dataset's OpenCV re-encode would
  drop EXIF and ignore the orientation tag; our image stage turns the photo upright, resizes it and
  strips metadata. A non-image therefore downloads "successfully" and is rejected by the image stage
  as `not_image`, a reason distinct from the download failures below.
- Every row of the table goes to img2dataset, in table order, so every row ends in img2dataset's
  per-shard NNNNN.parquet (status/error_message). Rows the table source already rejects (no image,
  no coordinates, malformed rows) are not fetched: their url is empty and `download_skip` says why.
- The wds source reads that parquet beside each shard (`failed_downloads`) and turns every failed
  row into a ledger row, so download + build conserve every row with nothing added to the build.
- Coordinates are handed over as text under the names `lat`/`lon` (what the wds source looks for);
  every other column (the id column too) keeps its name, unless img2dataset reserves it (`key`,
  `status`, ...), which gets a `table_` prefix. Values stay text: Namibia's "NA" stays "NA".
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import BadArgument
from pipeline.core.record import Record, Reject, make_key

URL_COLUMN = "url"
LAT_COLUMN = "lat"
LON_COLUMN = "lon"
SKIP_COLUMN = "download_skip"  # "reason: detail" for rows not fetched; empty otherwise
# Columns img2dataset refuses in save_additional_columns (it writes them itself).
IMG2DATASET_RESERVED = ("key", "caption", "url", "width", "height", "original_width",
                        "original_height", "status", "error_message", "exif", "md5", "sha256",
                        "sha512")
OOM_SHARD_COUNT = 5  # img2dataset's default: shards are 00000.tar, 00001.tar, ...
_TAR_SUFFIX = re.compile(r"\.(tar(\.[a-z0-9]+)?|tgz)$", re.IGNORECASE)
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
log = logging.getLogger(__name__)


class DownloadIncomplete(RuntimeError):
    """img2dataset gave up on whole shards (it prints why): rerunning resumes (incremental mode)."""


@dataclass(frozen=True)
class DownloadOptions:
    processes: int = 1
    threads: int = 32
    timeout_s: float = 10.0
    retries: int = 0
    samples_per_shard: Optional[int] = None  # None: shard_size() from the table's row count
    overwrite: bool = False  # False: img2dataset's incremental mode skips shards already done
    user_agent_token: Optional[str] = "mg-geo"


# img2dataset works a shard per task and a wds: build reads a shard per unit, so a table that
# fits in one shard is fetched by one process and built by one worker. Without a size given, a
# table is cut into AUTO_SHARDS shards (a few per process of a laptop's download and build, and
# under img2dataset's 5 tasks per process, after which it spawns a new one), of
# MIN..MAX_AUTO_SHARD_ROWS rows. It depends on the row count alone, so a rerun resumes the same shards.
AUTO_SHARDS = 8
MIN_AUTO_SHARD_ROWS = 100
MAX_AUTO_SHARD_ROWS = 10_000  # img2dataset's own default


def shard_size(n_rows: int, requested: Optional[int] = None) -> int:
    """Rows per shard: `requested`, or the automatic size described above."""
    if requested is not None:
        return requested
    return max(MIN_AUTO_SHARD_ROWS, min(MAX_AUTO_SHARD_ROWS, math.ceil(n_rows / AUTO_SHARDS)))


# --- failures: img2dataset's status/error_message -> ledger reason ------------------------------

def failure_reason(status: str, error_message: Optional[str], skip: Optional[str]) -> tuple[str, str]:
    """(reason, detail) for a row img2dataset did not turn into a sample. urllib's messages are
    stable text (`HTTP Error 404: Not Found`, `timed out`), so they are matched here, in one place."""
    if skip:
        reason, _, detail = skip.partition(": ")
        return reason, detail
    message = error_message or ""
    lowered = message.lower()
    http = _HTTP_ERROR.search(message)
    if http:
        reason = f"http_{http.group(1)}"
    elif "timed out" in lowered:
        reason = "download_timeout"
    elif "unknown url type" in lowered:
        reason = "url_unsupported"
    elif "x-robots-tag" in lowered:
        reason = "robots_disallowed"  # the site asks not to be used for AI training
    elif "connection refused" in lowered:
        reason = "connection_refused"
    elif "name or service not known" in lowered or "nodename nor servname" in lowered \
            or "name resolution" in lowered:
        reason = "dns_failed"
    elif "hash mismatch" in lowered:
        reason = "hash_mismatch"
    elif status == "failed_to_resize":
        reason = "download_decode_failed"
    else:
        reason = "download_failed"
    return reason, message


def sibling_parquet(shard: str) -> Optional[str]:
    """img2dataset's NNNNN.parquet beside NNNNN.tar (None for a name that is not a tar)."""
    stem, n = _TAR_SUFFIX.subn("", shard)
    return stem + ".parquet" if n else None


def failed_downloads(spec: str, shard_name: str, shard: str) -> Iterator[tuple[Record, Reject]]:
    """(record, reject) for every row of the shard's img2dataset parquet that is not a sample.

    Shards img2dataset did not write (no parquet beside them, or one without its status column)
    give nothing. Input ids are `shard_name/KEY`, the form the wds source gives samples."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipeline.io.sources.columns import value_text  # lazy: pipeline.io.sources imports this module

    path = sibling_parquet(shard)
    if path is None or not FileSystems.exists(path):
        return
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.read_table(pa.BufferReader(handle.read()))
    except Exception as exc:  # noqa: BLE001 - see below
        # img2dataset marks a finished shard with NNNNN_stats.json: then its parquet must list the
        # failures, and not being able to read it is one visible ledger row. Without the marker the
        # file is not (a finished) img2dataset's; a killed shard shows as shard_corrupt anyway.
        if not FileSystems.exists(path[: -len(".parquet")] + "_stats.json"):
            log.warning("ignoring %s beside %s: not a readable parquet (%s)", path, shard, exc)
            return
        input_id = f"{shard_name}#download-parquet"
        yield (Record(key=make_key(spec, input_id), source=spec, input_id=input_id,
                      provenance={"parquet": path}),
               Reject("download_parquet_corrupt", f"{path}: the failed downloads of this shard "
                                                  f"are unknown: {type(exc).__name__}: {exc}"))
        return
    if not {"key", "status"} <= set(table.column_names):
        return
    failed = table.filter(pc.not_equal(table["status"].fill_null(""), "success"))
    for row in failed.to_pylist():
        reason, detail = failure_reason(row.get("status") or "", row.get("error_message"),
                                        row.get(SKIP_COLUMN))
        url = row.get(URL_COLUMN) or ""
        input_id = f"{shard_name}/{row['key']}"
        provenance = {k: value_text(v) for k, v in row.items()
                      if k not in IMG2DATASET_RESERVED and k not in (LAT_COLUMN, LON_COLUMN)}
        provenance[URL_COLUMN] = url
        yield (Record(key=make_key(spec, input_id), source=spec, input_id=input_id,
                      image_path=url or None, provenance=provenance,
                      coords_raw={"kind": "given", "lat": row.get(LAT_COLUMN),
                                  "lon": row.get(LON_COLUMN)}),
               Reject(reason, f"{url}: {detail}" if url else detail))


# --- the url list handed to img2dataset ----------------------------------------------------------

def _fetchable(image_path: str) -> str:
    """What urllib can open: URLs as they are, local paths as file:// URLs (a table may mix both),
    other schemes (gs://) as they are, which urllib refuses: url_unsupported."""
    from pipeline.io.sources.base import is_url

    if is_url(image_path) or "://" in image_path:
        return image_path
    return Path(image_path).resolve().as_uri()


def _renamer():
    taken = {URL_COLUMN, LAT_COLUMN, LON_COLUMN, SKIP_COLUMN}
    from pipeline.io.sources.columns import LAT_COLUMNS, LON_COLUMNS
    # A second latitude-like column would compete with `lat` in the wds source's auto-detection.
    reserved = set(IMG2DATASET_RESERVED) | set(LAT_COLUMNS) | set(LON_COLUMNS) | taken
    names: dict[str, str] = {}

    def rename(column: str) -> str:
        if column not in names:
            new = column
            while new.strip().lower() in reserved or new in names.values():
                new = f"table_{new}"
            names[column] = new
        return names[column]
    return rename


def write_url_list(source, path: str) -> int:
    """Write img2dataset's input (parquet, every column text) for a table source; returns rows."""
    from pipeline.io.sources.columns import value_text

    rename = _renamer()
    rows: list[dict] = []
    order: dict[str, None] = {URL_COLUMN: None, LAT_COLUMN: None, LON_COLUMN: None, SKIP_COLUMN: None}
    for unit in source.units():
        for columns, row, record, reject in source.row_records(unit):
            raw = row if isinstance(row, dict) else {}
            out = {rename(k): value_text(v) for k, v in raw.items()
                   if columns is None or k not in (columns.image, columns.lat, columns.lon)}
            coords = record.coords_raw or {}
            out[LAT_COLUMN] = coords.get("lat", "")
            out[LON_COLUMN] = coords.get("lon", "")
            if reject is None:
                out[URL_COLUMN], out[SKIP_COLUMN] = _fetchable(record.image_path), ""
            else:  # not fetched: the reason travels in the row, to the shard parquet, to the ledger
                out[URL_COLUMN] = ""
                where = f" ({record.image_path})" if record.image_path else ""
                out[SKIP_COLUMN] = f"{reject.reason}: {reject.detail}{where}"
            order.update(dict.fromkeys(out))
            rows.append(out)
    schema = pa.schema([(name, pa.string()) for name in order])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return len(rows)


# --- running img2dataset -------------------------------------------------------------------------

@contextlib.contextmanager
def _stdout_to_stderr():
    """img2dataset and its worker processes print progress on stdout; ours carries the summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def img2dataset_download(**kwargs) -> None:
    """img2dataset.download (its public API, its own worker processes) with the settings it needs:
    no update check (albumentations phones home at import otherwise), no wandb, progress on
    stderr, and our SIGINT handler restored (img2dataset installs one that exits with status 0)."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # read at import, inherited by its workers
    os.environ.setdefault("WANDB_MODE", "disabled")
    import img2dataset

    previous = signal.getsignal(signal.SIGINT)
    try:
        with _stdout_to_stderr():
            img2dataset.download(enable_wandb=False, distributor="multiprocessing", **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


_IMG2DATASET_FILE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")


def remove_previous_shards(out: str) -> int:
    """--overwrite: delete img2dataset's files in `out` (and only those: `out` may hold other
    things). img2dataset's own overwrite mode deletes its temporary folder along with `out` and
    then fails to write its input shards there."""
    import fsspec  # img2dataset's dependency: the same file systems it writes to

    fs, path = fsspec.core.url_to_fs(out)
    if not fs.exists(path):
        return 0
    doomed = [p for p in fs.ls(path, detail=False) if _IMG2DATASET_FILE.match(p.rstrip("/").rsplit("/", 1)[-1])]
    for p in doomed:
        fs.rm(p)
    return len(doomed)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def summarize(out: str, n_rows: int, samples_per_shard: int) -> dict:
    """Check that img2dataset accounted for every row (tar + parquet per shard, one parquet row
    per input row) and count the outcomes with the reasons the build's ledger will show. Read
    through fsspec, as img2dataset wrote them."""
    import fsspec  # img2dataset's dependency

    fs, root = fsspec.core.url_to_fs(out)
    n_shards = max(1, math.ceil(n_rows / samples_per_shard))
    missing, outcomes, accounted = [], Counter(), 0
    for shard_id in range(n_shards):
        base = f"{root}/{shard_name(shard_id)}"
        if not all(fs.exists(base + ext) for ext in (".tar", ".parquet", "_stats.json")):
            missing.append(shard_name(shard_id))
            continue
        with fs.open(base + ".parquet", "rb") as handle:
            table = pq.read_table(pa.BufferReader(handle.read())).to_pydict()
        accounted += len(table["status"])
        skips = table.get(SKIP_COLUMN) or [None] * len(table["status"])
        for status, message, skip in zip(table["status"], table["error_message"], skips):
            outcomes["downloaded" if status == "success"
                     else failure_reason(status or "", message, skip)[0]] += 1
    if missing:
        raise DownloadIncomplete(f"img2dataset did not finish shard(s) {', '.join(missing)} in {out}; "
                                 f"run the same command again: finished shards are kept "
                                 f"(incremental mode) and only these are fetched")
    if accounted != n_rows:
        raise DownloadIncomplete(f"{out} accounts for {accounted} rows, the table has {n_rows}: "
                                 f"a shard from an earlier run of another table? rerun with --overwrite")
    shards = [f"{out}/{shard_name(i)}.tar" for i in range(n_shards)]
    return {"out": out, "rows": n_rows, "downloaded": outcomes.pop("downloaded", 0),
            "failed": dict(sorted(outcomes.items())), "shards": shards,
            "wds_pattern": wds_pattern(out, n_shards)}


def wds_pattern(out: str, n_shards: int) -> str:
    if n_shards == 1:
        return f"{out}/{shard_name(0)}.tar"
    return f"{out}/{{{shard_name(0)}..{shard_name(n_shards - 1)}}}.tar"


@dataclass
class PreparedDownload:
    """A table source's url list written (in `tmp`) and its shards sized: what img2dataset is given."""
    spec: str
    out: str
    url_list: str
    n_rows: int
    per_shard: int
    options: DownloadOptions
    tmp: str  # removed when the `prepared_download` context ends

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n_rows / self.per_shard))

    @property
    def wds_spec(self) -> str:
        """The wds: source of the shards this download writes."""
        return "wds:" + wds_pattern(self.out, self.n_shards)

    def run(self) -> dict:
        """img2dataset over the url list; returns summarize()'s summary."""
        options = self.options
        columns = [c for c in pq.read_schema(self.url_list).names if c != URL_COLUMN]
        if options.overwrite:
            remove_previous_shards(self.out)
        img2dataset_download(
            url_list=self.url_list, input_format="parquet", url_col=URL_COLUMN,
            save_additional_columns=columns, output_folder=self.out, output_format="webdataset",
            processes_count=options.processes, thread_count=options.threads,
            timeout=options.timeout_s, retries=options.retries,
            number_sample_per_shard=self.per_shard,
            disable_all_reencoding=True,  # the original bytes: see the module docstring
            extract_exif=False,           # our image stage reads EXIF from the bytes themselves
            compute_hash=None,            # our image stage records the source bytes' sha256
            oom_shard_count=OOM_SHARD_COUNT,
            incremental_mode="incremental",  # shards with a _stats.json are done: kept
            user_agent_token=options.user_agent_token)
        return summarize(self.out, self.n_rows, self.per_shard)


@contextlib.contextmanager
def prepared_download(spec: str, out: str, options: DownloadOptions = DownloadOptions(),
                      source_options: Optional[dict] = None) -> Iterator[PreparedDownload]:
    """Check a download's arguments and write img2dataset's input for the `table:` source `spec`."""
    from pipeline.io.sources import parse_source
    from pipeline.io.sources.table import TableSource

    source = parse_source(spec, source_options or {})
    if not isinstance(source, TableSource):
        raise BadArgument(f"download takes a table:FILE source (a csv/tsv/parquet/jsonl list of "
                          f"URLs with lat/lon), got {spec!r}")
    source.check()
    checks = [("processes", options.processes, 1), ("threads", options.threads, 1), ("retries", options.retries, 0)]
    if options.samples_per_shard is not None:  # None: automatic (shard_size)
        checks.append(("samples_per_shard", options.samples_per_shard, 1))
    for name, value, low in checks:
        if value < low:
            raise BadArgument(f"{name} must be >= {low}, got {value}")
    if not options.timeout_s > 0:
        raise BadArgument(f"timeout must be positive, got {options.timeout_s}")
    out = out.rstrip("/") if "://" in out else os.path.abspath(out)
    with tempfile.TemporaryDirectory(prefix="mg-geo-download-") as tmp:
        # Outside `out`: img2dataset takes every file there for its own (*.json for shard stats).
        url_list = os.path.join(tmp, "urls.parquet")
        n_rows = write_url_list(source, url_list)
        if n_rows == 0:
            raise BadArgument(f"table {source.location} has no rows: nothing to download")
        yield PreparedDownload(spec, out, url_list, n_rows, shard_size(n_rows, options.samples_per_shard),
                               options, tmp)


def run_download(spec: str, out: str, options: DownloadOptions = DownloadOptions(),
                 source_options: Optional[dict] = None) -> dict:
    """Download the images of a `table:` source into WebDataset shards under `out`; returns the
    summary (rows, downloaded, failed by reason, shards, wds_pattern for `mg-geo build`)."""
    with prepared_download(spec, out, options, source_options) as download:
        return download.run()
