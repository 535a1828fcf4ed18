"""Read stage: load the source bytes of each record from its image_path.

Paths go through Beam's FileSystems so local paths and gs:// (or any registered scheme) read
the same way. URLs are not fetched here: downloading is its own stage (`mg-geo download`), with
its own retries and politeness, so a URL reaching this stage means that stage was skipped.
"""
from __future__ import annotations

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.core.record import Record, Reject
from pipeline.io.sources.base import is_url
from pipeline.core.stage import Outcome, Stage

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_BUGS = (AttributeError, NameError, TypeError)


class ReadStage(Stage):
    name = "read"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes

    def process(self, record: Record) -> Outcome:
        if record.image_bytes is not None:
            if not record.image_bytes:
                return Reject("empty_file", "the record carries zero image bytes")
            return record  # bytes came with the input (wds shard, table blob): nothing to read
        path = record.image_path
        if not path:
            return Reject("missing_file", "the record has neither image bytes nor an image path")
        if is_url(path):
            return Reject("url_not_downloaded",
                          f"{path} is a URL; URLs need the download stage first "
                          f"(`mg-geo download`)")
        data = self._read(path)
        if isinstance(data, Reject):
            return data
        return record.replace(image_bytes=data)

    def _read(self, path: str) -> bytes | Reject:
        # Any filesystem (local, GCS client, unknown scheme) raises its own exception types; all of
        # them mean "this one input could not be read", which is a ledger row, not a failed job.
        # Errors that mean a bug in this code are not disguised as unreadable inputs.
        try:
            if not FileSystems.exists(path):
                return Reject("missing_file", f"no file at {path}")
            size = FileSystems.get_filesystem(path).metadata(path).size_in_bytes
        except _BUGS:
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            return Reject("unreadable", f"cannot stat {path}: {type(exc).__name__}: {exc}")
        # Checked before reading so a huge file is never pulled into memory.
        if size > self.max_bytes:
            return Reject("too_large",
                          f"{path} has {size} bytes, over the limit of {self.max_bytes}")
        try:
            # UNCOMPRESSED: AUTO would silently gunzip a file that happens to be named *.gz.
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                # read(n) allocates n bytes up front: ask for the stat size (+1 to notice a file
                # that grew since), not the 64 MiB limit, which made every read a 64 MiB allocation.
                data = handle.read(size + 1)
                if len(data) > size:
                    data += handle.read(self.max_bytes + 1 - len(data))
        except FileNotFoundError:
            return Reject("missing_file", f"{path} disappeared before it could be read")
        except _BUGS:
            raise
        except Exception as exc:  # noqa: BLE001 - see _read's first comment
            return Reject("unreadable", f"cannot read {path}: {type(exc).__name__}: {exc}")
        if not data:
            return Reject("empty_file", f"{path} is empty (0 bytes)")
        if len(data) > self.max_bytes:
            return Reject("too_large", f"{path} has more than {self.max_bytes} bytes")
        return data
