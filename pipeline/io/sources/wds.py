"""`wds:PATTERN` — WebDataset shards as img2dataset writes them: KEY.jpg + KEY.json (+ KEY.txt).

PATTERN is a brace pattern (`/data/{00000..00009}.tar`), a glob (`/data/*.tar`) or both; each
shard is one unit. Coordinates come from the json (img2dataset's `save_additional_columns`).
Tar members are grouped into samples as webdataset's own iterators group them
(pipeline.io.tar_reader, tested against webdataset), without importing webdataset, which imports
torch whenever torch is installed.
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import Optional

import braceexpand
from apache_beam.io.filesystems import FileSystems

from pipeline.io import tar_reader
from pipeline.io.download import failed_downloads
from pipeline.core.record import Record, Reject, make_key
from pipeline.io.sources.base import IMAGE_EXTENSIONS, Source, SourceError, relative_to
from pipeline.io.sources.columns import LAT_COLUMNS, LON_COLUMNS, open_decompressed, value_text

IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # preference order
_GLOB = re.compile(r"[*?\[]")
_TAR_NAME = re.compile(r"\.(tar(\.[a-z0-9]+)?|tgz)$", re.IGNORECASE)
_BLOCK = 512


class _TailTracker:
    """Passes reads through and remembers the last tar block of the file.

    Python's tarfile, in the stream mode webdataset and tar_reader use, ends quietly when the file
    stops at (or inside) a member header, so a shard cut short by a killed writer would read as a
    shorter good shard. Every tar writer ends the archive with zero blocks; a file whose last block
    is not zero was truncated."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name
        self.size = 0
        self.tail = b""

    def read(self, size=-1):
        data = self.handle.read(size)
        self.size += len(data)
        self.tail = (self.tail + data)[-_BLOCK:]
        return data

    def ends_with_end_marker(self) -> bool:
        while self.read(1 << 20):
            pass  # tarfile stops at the first end block; what follows it is padding
        return self.size >= _BLOCK and self.tail == bytes(_BLOCK)

    def __repr__(self):  # error messages may name the stream
        return self.name


class _Truncated(Exception):
    pass


def _members(stream, shard: str, errors: list):
    """The shard's tar members until the tar breaks; the error (naming the shard) is kept so that
    the sample being grouped still comes out (group_samples would drop it with the exception)."""
    try:
        yield from tar_reader.tar_members(stream)
    except Exception as exc:  # noqa: BLE001 - reported by the caller as shard_corrupt
        if exc.args:
            exc.args = (f"{exc.args[0]} @ {shard}",) + exc.args[1:]
        errors.append(exc)


def _json_key(meta: dict, explicit: Optional[str], candidates: tuple[str, ...]) -> Optional[str]:
    """The json key holding a coordinate with a value, or None. img2dataset writes a column it
    could not fill as null, so an empty value counts as absent."""
    lowered = {k.lower(): k for k in meta}
    names = [explicit] if explicit else [lowered[c] for c in candidates if c in lowered]
    return next((k for k in names if meta.get(k) not in (None, "")), None)


class WdsSource(Source):
    """Options: lat_column, lon_column (json keys; default lat/latitude and lon/lng/long/longitude)."""
    kind = "wds"

    def _match(self) -> tuple[list[str], list[str], list[str]]:
        """(shard paths, brace-expanded literal paths that do not exist, globbed non-tar files)."""
        shards, missing, skipped = set(), [], []
        for pattern in braceexpand.braceexpand(self.location):
            found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
            if not _GLOB.search(pattern):
                if not found:
                    missing.append(pattern)
                shards.update(found)
                continue
            # img2dataset writes NNNNN.parquet and NNNNN_stats.json beside the tars; a glob like
            # /data/* means the tars.
            for path in found:
                if _TAR_NAME.search(path):
                    shards.add(path)
                else:
                    skipped.append(path)
        return sorted(shards), missing, skipped

    def check(self):
        try:
            shards, missing, skipped = self._match()
        except Exception as exc:  # noqa: BLE001 - bad brace syntax, unknown filesystem scheme
            raise SourceError(f"wds pattern {self.location!r} cannot be expanded: "
                              f"{type(exc).__name__}: {exc}") from exc
        if missing:
            raise SourceError(f"wds pattern {self.location!r}: {len(missing)} shard(s) do not exist, "
                              f"e.g. {missing[:3]}")
        if not shards:
            extra = f" (only non-tar files, e.g. {skipped[:3]})" if skipped else ""
            raise SourceError(f"wds pattern {self.location!r} matches no tar shard{extra}")

    def units(self):
        yield from self._match()[0]

    def _root(self) -> str:
        # Shards are named relative to the pattern's fixed folder, so shards with one basename in
        # two folders (/data/a/00000.tar, /data/b/00000.tar) keep distinct input ids.
        fixed = re.split(r"[*?\[{]", self.location, maxsplit=1)[0]
        return posixpath.dirname(fixed) if "/" in fixed else ""

    def records(self, shard):
        yield from self._tar_records(shard)
        # img2dataset's NNNNN.parquet beside the shard lists the URLs it could not fetch: each
        # becomes a ledger row, so `mg-geo download` + build account for every URL.
        yield from failed_downloads(self.spec, relative_to(self._root(), shard), shard)

    def _tar_records(self, shard):
        name = relative_to(self._root(), shard)
        done, held, problem = 0, None, None
        try:
            with open_decompressed(shard) as handle:  # .tar.gz/.tgz shards are gunzipped
                stream = _TailTracker(handle, shard)
                errors: list[Exception] = []
                for sample in tar_reader.group_samples(_members(stream, shard, errors)):
                    if held is not None:
                        yield self._sample_record(name, held)
                        done += 1
                    held = sample  # yielded once the next sample is whole, or the shard ends well
                if errors:
                    problem = errors[0]
                elif not stream.ends_with_end_marker():
                    problem = _Truncated("the shard ends without the tar end-of-archive blocks")
        except Exception as exc:  # noqa: BLE001 - a broken shard is a ledger row, not a failed job
            problem = exc
        if problem is None:
            if held is not None:
                yield self._sample_record(name, held)
            return
        # The sample being read when the shard broke may lack members: it joins the lost rest
        # rather than reaching the ledger as a misleading image_missing or coords_missing.
        last = f"; sample {held['__key__']} may be incomplete" if held is not None else ""
        message = str(problem.args[0]) if problem.args else ""
        input_id = f"{name}#corrupt"
        yield (Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id,
                      provenance={"shard": shard}),
               Reject("shard_corrupt", f"{done} samples read, the rest is lost{last}: "
                                       f"{type(problem).__name__}: {message}"))

    def _sample_record(self, shard_name: str, sample: dict):
        input_id = f"{shard_name}/{sample['__key__']}"
        record = Record(key=make_key(self.spec, input_id), source=self.spec, input_id=input_id)
        image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
        meta, problem = {}, "no json member"
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                problem = "" if isinstance(meta, dict) else "the json is not an object"
            except ValueError as exc:
                problem = f"the json cannot be parsed: {exc}"
            meta = meta if isinstance(meta, dict) else {}
        lat_key = _json_key(meta, self.options.get("lat_column"), LAT_COLUMNS)
        lon_key = _json_key(meta, self.options.get("lon_column"), LON_COLUMNS)
        provenance = {k: value_text(v) for k, v in meta.items() if k not in (lat_key, lon_key)}
        if "txt" in sample:
            provenance["txt"] = value_text(sample["txt"])  # img2dataset's caption
        record = record.replace(
            image_bytes=image, provenance=provenance,
            coords_raw={"kind": "given", "lat": meta.get(lat_key), "lon": meta.get(lon_key)})
        if image is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            return record, Reject("image_missing", f"{input_id}: no image member among {members}")
        if problem or lat_key is None or lon_key is None:
            return record, Reject("coords_missing",
                                  f"{input_id}: {problem or 'the json has no latitude/longitude'}")
        return record, None
