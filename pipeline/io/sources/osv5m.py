"""`osv5m:DIR` — OpenStreetView-5M as it is distributed (huggingface.co/datasets/osv5m/osv5m).

Layout: DIR/train.csv and DIR/test.csv (id, latitude, longitude, country, region, sub-region,
city and many optional columns), images unzipped to DIR/images/{train,test}/NN/ID.jpg. Every csv
row is one input; an image file without a row is not an input (it is counted in a log line).

The subfolder NN of an image cannot be derived from its id, so each split's image folder is
listed once per process into an id -> path index (`image_index`), never per record. A row whose
image is not in the index is rejected here as `missing_file`, the reason the read stage gives a
table row whose file is missing, with a detail naming the folder searched.

Units are row-aligned byte ranges of a csv (OSV-5M's train.csv has ~5M rows; the stages after the
source are fused with it, so one unit per csv would put the whole build on one worker). The driver
cuts the ranges in one pass over the csv bytes, which also gives the counts for the log line and
the ids repeated on several rows (their input ids get `#rowN`, as in the table source).
Rows are parsed by the table source's csv reader: every value stays text.

OSV-5M's official test split stays our test split: a test.csv row's record has split "test" fixed
(`FIXED_SPLITS`), which the split step keeps, whatever its geographic unit would draw, and which
also pulls that unit's other photos into test (pipeline.global_steps.split, rule 5). A benchmark
scored on OSV-5M's test set therefore never meets one of its images, or a photo within link_km
of one, in our train or val. train.csv rows are split geographically like any other source's.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import posixpath
from dataclasses import dataclass

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.report.agreement import LEVELS
from pipeline.core.record import Record, Reject, make_key
from pipeline.io.sources.base import IMAGE_EXTENSIONS, Source, SourceError, join, relative_to
from pipeline.io.sources.columns import ID_COLUMNS, LAT_COLUMNS, LON_COLUMNS, find_column
from pipeline.io.sources.table import BadRow, _csv_table, _Lines

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FIXED_SPLITS = {"test": "test"}  # csv -> the split its rows' records are fixed to (train: none)
DEFAULT_CHUNK_BYTES = 32 << 20  # ~100k OSV-5M rows per unit; option chunk_bytes


@dataclass(frozen=True)
class Columns:
    id: str
    lat: str
    lon: str


@dataclass(frozen=True)
class Chunk:
    """One unit: the csv bytes [start, end), whole rows only."""
    split: str
    csv: str
    header: bytes            # the csv's header line: each chunk is parsed as header + its rows
    start: int
    end: int
    first_row: int           # number of the chunk's first row in its csv (blank lines not counted)
    repeated_ids: frozenset  # ids on more than one row of this csv


@dataclass
class _Scan:
    header: bytes
    chunks: list  # (start, end, first_row)
    ids: set
    repeated: set
    rows: int


def split_dir(location: str, split: str) -> str:
    return join(join(location, "images"), split)


@functools.lru_cache(maxsize=8)
def image_index(folder: str) -> dict[str, str]:
    """id -> image path relative to `folder` ("07/12345.jpg"), from one listing of the folder.

    Cached per process: the driver builds it for check() and units(), each worker once for all
    its chunks of that split. Also accepts images directly in the folder (no NN level). Where an
    id has several files, the first path in sort order wins, so every worker picks the same."""
    index: dict[str, str] = {}
    for pattern in (folder.rstrip("/") + "/*/*", folder.rstrip("/") + "/*"):
        for meta in FileSystems.match([pattern])[0].metadata_list:
            rel = relative_to(folder, meta.path)
            stem, ext = posixpath.splitext(posixpath.basename(rel))
            if ext.lower() in IMAGE_EXTENSIONS and (stem not in index or rel < index[stem]):
                index[stem] = rel
    return index


def _open(path: str):
    # UNCOMPRESSED: the chunks are byte offsets into the file as stored.
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _header_names(header: bytes) -> list[str]:
    return next(csv.reader([header.decode("utf-8-sig").rstrip("\r\n")]), [])


def _row_id(row: bytes, position: int, n_fields: int):
    text = row.decode("utf-8", errors="replace")
    if '"' in text:
        cells = next(csv.reader(io.StringIO(text, newline="")), [])
    else:
        cells = text.rstrip("\r\n").split(",")
    return cells[position].strip() if len(cells) == n_fields else None


def scan_csv(path: str, id_column: str, chunk_bytes: int) -> _Scan:
    """One pass over the csv's bytes: row-aligned chunk boundaries and every row's id.

    A row ends at a newline outside quotes; csv writers double a quote inside a quoted field, so
    an odd count of quotes so far means the newline belongs to a quoted field."""
    with _open(path) as handle:
        header = handle.readline()
        names = _header_names(header)
        position = names.index(id_column)
        offset = start = len(header)
        chunks, ids, repeated = [], set(), set()
        rows = first_row = 0
        pending = b""
        for line in handle:
            offset += len(line)
            row = pending + line
            if row.count(b'"') % 2:
                pending = row
                continue
            pending = b""
            if row.strip(b"\r\n"):  # blank lines are not rows, as in the table source's reader
                rows += 1
                row_id = _row_id(row, position, len(names))
                if row_id:
                    (repeated if row_id in ids else ids).add(row_id)
            if offset - start >= chunk_bytes:
                chunks.append((start, offset, first_row))
                start, first_row = offset, rows
        if pending.strip(b"\r\n"):
            rows += 1  # an unclosed quote runs to the end of the file: the reader makes one row of it
        if offset > start:
            chunks.append((start, offset, first_row))
    return _Scan(header, chunks, ids, repeated, rows)


class Osv5mSource(Source):
    """Options: chunk_bytes (unit size), id_column, lat_column, lon_column (default: OSV-5M's)."""
    kind = "osv5m"

    def _csvs(self) -> list[tuple[str, str]]:
        found = [(split, join(self.location, f"{split}.csv")) for split in SPLITS]
        return [(split, path) for split, path in found if FileSystems.exists(path)]

    def columns(self, names: list[str], where: str) -> Columns:
        opt = self.options.get
        return Columns(
            id=find_column(names, ID_COLUMNS[:1], opt("id_column"), "id", "id_column", where),
            lat=find_column(names, LAT_COLUMNS, opt("lat_column"), "latitude", "lat_column", where),
            lon=find_column(names, LON_COLUMNS, opt("lon_column"), "longitude", "lon_column", where))

    def _chunk_bytes(self) -> int:
        value = int(self.options.get("chunk_bytes") or DEFAULT_CHUNK_BYTES)
        if value < 1:
            raise SourceError(f"osv5m: chunk_bytes must be positive, got {value}")
        return value

    def check(self):
        self._chunk_bytes()
        csvs = self._csvs()
        if not csvs:
            raise SourceError(f"osv5m source {self.location}: neither train.csv nor test.csv is there "
                              f"(expected the layout of huggingface.co/datasets/osv5m/osv5m)")
        for split, path in csvs:
            try:
                with _open(path) as handle:
                    names = _header_names(handle.readline())
            except Exception as exc:  # noqa: BLE001 - any reader error means "not a readable csv"
                raise SourceError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
            self.columns(names, path)
            folder = split_dir(self.location, split)
            if not image_index(folder):
                zips = FileSystems.match([folder.rstrip("/") + "/*.zip"])[0].metadata_list
                hint = (f"; {len(zips)} zip files are there: unzip them in place (NN.zip -> NN/)"
                        if zips else "")
                raise SourceError(f"osv5m source: no images under {folder}/NN/ for {path}{hint}")

    def units(self):
        chunk_bytes = self._chunk_bytes()
        for split, path in self._csvs():
            folder = split_dir(self.location, split)
            with _open(path) as handle:
                columns = self.columns(_header_names(handle.readline()), path)
            scan = scan_csv(path, columns.id, chunk_bytes)
            index = image_index(folder)
            orphans = sum(1 for image_id in index if image_id not in scan.ids)
            missing = sum(1 for image_id in scan.ids if image_id not in index)
            (log.warning if orphans or missing else log.info)(
                "osv5m %s: %d rows in %s, %d images under %s; %d images have no csv row (not inputs, "
                "ignored); %d row ids have no image (ledger: missing_file); %d units",
                split, scan.rows, path, len(index), folder, orphans, missing, len(scan.chunks))
            repeated = frozenset(scan.repeated)
            for start, end, first_row in scan.chunks:
                yield Chunk(split, path, scan.header, start, end, first_row, repeated)

    def records(self, chunk: Chunk):
        folder = split_dir(self.location, chunk.split)
        done = 0
        try:
            with _open(chunk.csv) as handle:
                handle.seek(chunk.start)
                data = handle.read(chunk.end - chunk.start)
            index = image_index(folder)
            names, rows = _csv_table(_Lines(io.BytesIO(chunk.header + data), "utf-8"), ",")
            columns = self.columns(names, chunk.csv)
            for row in rows:
                yield self._row_record(chunk, columns, index, folder, chunk.first_row + done, row)
                done += 1
        except Exception as exc:  # noqa: BLE001 - a csv broken mid-way must not lose rows silently
            input_id = f"{chunk.split}/bytes{chunk.start}#corrupt"
            yield (Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                          provenance={"table": chunk.csv}),
                   Reject("table_corrupt", f"bytes {chunk.start}-{chunk.end}: {done} rows read, the rest "
                                           f"could not be read: {type(exc).__name__}: {exc}"))

    def _row_record(self, chunk: Chunk, columns: Columns, index: dict, folder: str, n: int, row):
        where = f"{chunk.split}.csv row {n}"
        image_id = "" if isinstance(row, BadRow) else row.get(columns.id, "").strip()
        input_id = f"{chunk.split}/{image_id or f'row{n}'}"
        if image_id in chunk.repeated_ids:
            input_id = f"{input_id}#row{n}"
        record = Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                        split=FIXED_SPLITS.get(chunk.split))
        if isinstance(row, BadRow):
            return record, Reject(row.reason, f"{where}: {row.detail}")
        relative = index.get(image_id)
        record = record.replace(
            image_path=join(folder, relative) if relative else None,
            coords_raw={"kind": "table", "lat": row.get(columns.lat, "").strip(),
                        "lon": row.get(columns.lon, "").strip()},
            # Their labels, for the report's agreement with ours (pipeline.report.agreement).
            provenance={lv.provenance: row[lv.column] for lv in LEVELS if lv.column in row})
        if not image_id:
            return record, Reject("id_missing", f"{where}: column {columns.id!r} is empty")
        if relative is None:
            return record, Reject("missing_file", f"{where}: no image {image_id}.* under {folder}/NN/")
        return record, None
