"""`table:FILE` — a csv/tsv/parquet/jsonl table with one row per photo: an image path or URL,
latitude and longitude as text, and any other columns (kept as provenance).

Every value is read as text, never through type inference: Namibia's country code "NA" must not
become a missing value, and "48.8566" must reach the validate stage exactly as the user wrote it.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.core.record import Record, Reject, make_key
from pipeline.io.sources.base import Source, SourceError, is_url, join
from pipeline.io.sources.columns import (DECOMPRESSORS, ID_COLUMNS, IMAGE_COLUMNS, LAT_COLUMNS, LON_COLUMNS,
                                      RawAdapter, find_column, open_decompressed, value_text)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl"}
PARQUET_BATCH_ROWS = 10_000
@dataclass(frozen=True)
class Columns:
    image: str
    lat: str
    lon: str
    id: Optional[str]


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed (ragged csv row, invalid json line): one ledger row."""
    reason: str
    detail: str


def table_format(path: str, explicit: Optional[str] = None) -> str:
    if explicit:
        if explicit not in set(FORMATS.values()):
            raise SourceError(f"unknown --table-format {explicit!r} (formats: csv, tsv, parquet, jsonl)")
        return explicit
    name, ext = posixpath.splitext(path.lower())
    if ext in DECOMPRESSORS:
        ext = posixpath.splitext(name)[1]  # table.csv.gz is a csv table
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise SourceError(f"cannot tell the format of table {path} from its extension "
                          f"({', '.join(FORMATS)}; compressed: {', '.join(DECOMPRESSORS)}); "
                          f"name it with --table-format")
    return fmt


@contextlib.contextmanager
def open_table(path: str, fmt: str, encoding: str = "utf-8"):
    """Yields (column names, rows): each row is a dict of column -> text, or a BadRow."""
    if fmt == "parquet":
        # Parquet compresses inside the file; pyarrow needs the seekable raw handle.
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            yield parquet.schema_arrow.names, _parquet_rows(parquet)
        return
    with open_decompressed(path) as handle:
        lines = _Lines(io.BufferedReader(RawAdapter(handle)), encoding)
        if fmt == "jsonl":
            yield _jsonl_table(lines)
        else:
            yield _csv_table(lines, "\t" if fmt == "tsv" else ",")


def check_encoding(encoding: str) -> str:
    """The name of a codec that can decode a table line by line (--encoding), else SourceError."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise SourceError(f"unknown --encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    if name.startswith(("utf-16", "utf-32")):
        raise SourceError(f"--encoding {encoding}: tables are read line by line, which needs an "
                          f"encoding where a line ends in a newline byte; convert the table to utf-8")
    return name


class _Lines:
    """A table's physical lines, each decoded on its own (in --encoding), numbered from 1.

    Line by line, not through one TextIOWrapper: a wrapper fails on the 8 KB chunk that holds a
    bad byte, so the rows after it were lost in one `table_corrupt` row in a large file while a
    small file (one chunk) stopped the run. Here a line that does not decode is kept (with U+FFFD
    where the bad bytes were) and its number noted: the row it belongs to becomes a ledger row
    (`row_encoding`), every other row is read. Lines can be pushed back to be read again."""

    def __init__(self, binary, encoding: str):
        self.binary = iter(binary)
        self.encoding = check_encoding(encoding)
        self.count = 0            # lines handed out so far (the number of the last one)
        self.undecodable: dict[int, str] = {}  # line number -> what was wrong with it
        self.replay: list[tuple[int, str]] = []  # (number, text) pushed back, next first
        self.taken: list[tuple[int, str]] = []   # lines handed out since mark()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.replay:
            self.count, text = self.replay.pop(0)
        else:
            raw = next(self.binary)
            self.count += 1
            try:
                text = raw.decode(self.encoding)
            except UnicodeDecodeError as exc:
                text = raw.decode(self.encoding, errors="replace")
                self.undecodable[self.count] = (
                    f"line {self.count} is not valid {self.encoding} (byte 0x{raw[exc.start]:02x} at "
                    f"column {exc.start + 1}); if the table is in another encoding, name it, e.g. "
                    f"--encoding latin-1")
            if self.count == 1:
                text = text.lstrip("\ufeff")  # a byte-order mark is not part of the header
        self.taken.append((self.count, text))
        return text

    def mark(self) -> int:
        """Start a row: returns the number of the line before it."""
        self.taken = []
        return self.count

    def read_again_after_first(self) -> None:
        """The lines of the row begun at mark(), but its first, are read again (a broken row)."""
        self.replay = self.taken[1:] + self.replay
        self.taken = []

    def encoding_problem(self, first: int, last: int) -> Optional[str]:
        return next((self.undecodable[n] for n in range(first, last + 1) if n in self.undecodable), None)


def _csv_table(lines: _Lines, delimiter: str):
    # The csv module reads every cell as text by construction and lets one ragged row become one
    # ledger row (pandas would stop the read or drop the row). strict=True: a stray quote is an
    # error, not a cell that quietly swallows the lines after it.
    def reader():
        return csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = next(reader(), None)
    except csv.Error as exc:
        raise SourceError(f"the header row is not valid csv: {exc}") from None
    if header is None:
        raise SourceError("the table is empty (no header row)")
    problem = lines.encoding_problem(1, lines.count)
    if problem:
        raise SourceError(f"the header: {problem}")

    def rows():
        """Every physical line ends in a row or a ledger row that names it: a row the csv module
        cannot parse (an unclosed quote at the end) is one ledger row whose later lines are read
        again as rows of their own; a row whose quoted cell swallowed whole rows (a quote closed
        lines later) is one ledger row naming its lines. Quoted line breaks in text stay valid."""
        cells_of = reader()
        while True:
            before = lines.mark()
            try:
                cells = next(cells_of, None)
            except csv.Error as exc:
                # An unclosed quote runs to the end of the file (or the field size limit): the
                # lines it swallowed are read again, each as the row it was meant to be.
                yield BadRow("row_malformed", f"line {before + 1}: {exc} (an unclosed quote?); "
                                              f"the lines after it are read again")
                lines.read_again_after_first()
                cells_of = reader()
                continue
            if cells is None:
                return
            first, last = before + 1, lines.count
            problem = lines.encoding_problem(first, last)
            if problem:
                yield BadRow("row_encoding", problem)
            elif not cells:
                continue  # a blank line is not a row
            elif last > first and _swallows_rows(cells, len(header), delimiter):
                yield BadRow("row_multiline", f"lines {first}-{last} were read as one row: a quoted "
                                              f"cell holds lines that are whole rows (an unclosed quote?)")
            elif len(cells) != len(header):
                yield BadRow("row_malformed", f"line {first}: {len(cells)} fields where the header "
                                              f"has {len(header)}")
            else:
                yield dict(zip(header, cells))
    return header, rows()


def _swallows_rows(cells: list[str], n_fields: int, delimiter: str) -> bool:
    """Whether a multi-line cell holds a line that is a whole row by itself: a quote opened by
    mistake and closed lines later. A cell with line breaks of its own (an address, a name) is text."""
    inner = [line for cell in cells if "\n" in cell or "\r" in cell for line in cell.splitlines()[1:]]
    return any(len(next(csv.reader([line], delimiter=delimiter), [])) == n_fields for line in inner)


def _jsonl_object(line: str):
    # parse_float/parse_int=str keep numbers as the user wrote them ("1.10" stays "1.10").
    obj = json.loads(line, parse_float=str, parse_int=str, parse_constant=str)
    if not isinstance(obj, dict):
        raise ValueError(f"a line is a JSON {type(obj).__name__}, not an object")
    if any(isinstance(v, (dict, list)) for v in obj.values()):
        plain = json.loads(line)  # nested values become JSON text with their numbers as numbers
        obj = {k: plain[k] if isinstance(v, (dict, list)) else v for k, v in obj.items()}
    return {k: value_text(v) for k, v in obj.items()}


def _jsonl_table(lines: _Lines):
    numbered = ((lines.count, line) for line in lines if line.strip())
    first = next(numbered, None)
    if first is None:
        raise SourceError("the table is empty (no json lines)")
    problem = lines.encoding_problem(first[0], first[0])
    if problem:
        raise SourceError(f"the first line: {problem}")
    try:
        first_row = _jsonl_object(first[1])
    except ValueError as exc:
        raise SourceError(f"the first line is not a JSON object: {exc}") from exc

    def rows():
        yield first_row
        for number, line in numbered:
            problem = lines.encoding_problem(number, number)
            if problem:
                yield BadRow("row_encoding", problem)
                continue
            try:
                yield _jsonl_object(line)
            except ValueError as exc:
                yield BadRow("row_malformed", f"line {number}: not a JSON object: {exc}")
    # Columns come from the first object; keys other rows add still reach provenance.
    return list(first_row), rows()


def _column_text(array) -> list[str]:
    try:
        return pc.cast(array, pa.string()).fill_null("").to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # nested types, non-UTF-8 binary
        return [value_text(v) for v in array.to_pylist()]


def _parquet_rows(parquet):
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        names = batch.schema.names
        columns = [_column_text(batch.column(i)) for i in range(batch.num_columns)]
        for values in zip(*columns):
            yield dict(zip(names, values))


class TableSource(Source):
    """Options: image_column, lat_column, lon_column, id_column, format (csv/tsv/parquet/jsonl),
    encoding (csv/tsv/jsonl; default utf-8)."""
    kind = "table"

    def _format(self) -> str:
        return table_format(self.location, self.options.get("format"))

    def _encoding(self) -> str:
        return self.options.get("encoding") or "utf-8"

    def columns(self, names: list[str]) -> Columns:
        where = f"table {self.location}"
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise SourceError(f"{where}: column names repeat: {twice}; columns: {names}")
        opt = self.options.get
        id_column = opt("id_column")
        if id_column and id_column not in names:
            raise SourceError(f"{where}: --id-column {id_column!r} is not a column; columns: {names}")
        if not id_column:
            lowered = {n.strip().lower(): n for n in names}
            id_column = next((lowered[c] for c in ID_COLUMNS if c in lowered), None)
        return Columns(
            image=find_column(names, IMAGE_COLUMNS, opt("image_column"), "image", "image_column", where),
            lat=find_column(names, LAT_COLUMNS, opt("lat_column"), "latitude", "lat_column", where),
            lon=find_column(names, LON_COLUMNS, opt("lon_column"), "longitude", "lon_column", where),
            id=id_column)

    def check(self):
        fmt = self._format()
        check_encoding(self._encoding())
        if not FileSystems.exists(self.location):
            raise SourceError(f"table file does not exist: {self.location}")
        try:
            with open_table(self.location, fmt, self._encoding()) as (names, _rows):
                pass
        except SourceError as exc:
            raise SourceError(f"table {self.location}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any reader error means "not a readable table"
            raise SourceError(f"cannot read {fmt} table {self.location}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.columns(names)

    def is_url_table(self, rows: int = 100) -> bool:
        """Whether the table's images are URLs: every non-empty image cell of its first `rows`
        rows is one (`mg-geo build` then downloads it by default). A mixed table is not."""
        seen = 0
        with open_table(self.location, self._format(), self._encoding()) as (names, parsed):
            column = self.columns(names).image
            for row in parsed:
                image = "" if isinstance(row, BadRow) else row.get(column, "").strip()
                if image:
                    if not is_url(image):
                        return False
                    seen += 1
                    if seen >= rows:
                        break
        return seen > 0

    def units(self):
        # One unit per table: rows are cheap (a path and two numbers); the work they cause is
        # spread by the stages after the source. Row-range units would need a table-wide view of
        # duplicate ids to keep keys unique.
        yield self.location

    def records(self, path):
        for _columns, _row, record, reject in self.row_records(path):
            yield record, reject

    def row_records(self, path):
        """(columns, row, record, reject) per row: the parsed row (dict of text, a BadRow, or None
        for the table_corrupt record) beside what `records` yields; `mg-geo download` needs the
        row's own cells (the id column too) to hand every column to img2dataset."""
        folder = FileSystems.split(path)[0]
        used_ids: set[str] = set()
        done = 0  # rows turned into records so far
        columns = None
        try:
            with open_table(path, self._format(), self._encoding()) as (names, rows):
                columns = self.columns(names)
                for row in rows:
                    yield (columns, row, *self._row_record(columns, folder, done, row, used_ids))
                    done += 1
        except Exception as exc:  # noqa: BLE001 - a table broken mid-way must not lose rows silently
            input_id = f"{posixpath.basename(path)}#corrupt"
            yield (columns, None,
                   Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                          provenance={"table": path}),
                   Reject("table_corrupt", f"{done} rows read, the rest could not be read: "
                                           f"{type(exc).__name__}: {exc}"))

    def _row_record(self, columns: Columns, folder: str, n: int, row, used_ids: set[str]):
        user_id = "" if isinstance(row, BadRow) or not columns.id else row.get(columns.id, "").strip()
        # Keys hash (source, input_id), so input ids must be unique within the table; a repeated
        # id keeps the user's text first so the ledger still names it.
        input_id = user_id or f"row{n}"
        if input_id in used_ids:
            input_id = f"{input_id}#row{n}"
        used_ids.add(input_id)
        record = Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id)
        if isinstance(row, BadRow):
            return record, Reject(row.reason, f"row {n}: {row.detail}")
        image = row.get(columns.image, "").strip()
        lat = row.get(columns.lat, "").strip()
        lon = row.get(columns.lon, "").strip()
        record = record.replace(
            image_path=self._image_path(folder, image) if image else None,
            coords_raw={"kind": "table", "lat": lat, "lon": lon},
            provenance={k: v for k, v in row.items()
                        if k not in (columns.image, columns.lat, columns.lon, columns.id)})
        if not image:
            return record, Reject("image_missing", f"row {n}: column {columns.image!r} is empty")
        if not lat or not lon:
            return record, Reject("coords_missing", f"row {n}: column {columns.lat!r} or "
                                                    f"{columns.lon!r} is empty")
        return record, None

    @staticmethod
    def _image_path(folder: str, image: str) -> str:
        # URLs pass as they are (`mg-geo download` fetches them; a build straight from the table
        # names them url_not_downloaded); other schemes (gs://) and absolute paths too; a relative
        # path is relative to the table's folder.
        if is_url(image) or "://" in image or image.startswith("/"):
            return image
        joined = join(folder, image)
        return joined if "://" in joined else posixpath.normpath(joined)
