"""WebDataset tar writing with the standard library only.

The build writes its shards with this instead of `webdataset.TarWriter` because `import webdataset`
imports torch when it is installed (seconds and hundreds of MB in every Beam worker), and the build
only writes tars. The output is byte-identical to `webdataset.TarWriter(stream, mtime=0,
encoder=False)` (tests/test_tar_writer.py compares them): members `KEY.EXT` in sorted order of EXT,
mode 0o444, owner bigdata:bigdata, uid/gid 0, a fixed mtime, Python's default tar format (PAX,
which for short ASCII names writes plain ustar headers), padded to a whole tar record on close.

webdataset opens the tar as a stream (`w|`); tarfile's stream mode then hands the file 10 KiB
blocks, a write call each (with a copy of the rest of its buffer each time). Here the plain `w`
mode writes the same bytes through _Buffered, which passes them on in writes of WRITE_BUFFER bytes
and answers tarfile's one question about the position (an object store's upload stream may not
tell).
"""
from __future__ import annotations

import io
import tarfile

USER = GROUP = "bigdata"
MODE = 0o444


WRITE_BUFFER = 1 << 20


class _Buffered:
    """Write-only: collects writes and passes them on WRITE_BUFFER bytes at a time (`flush` for the
    rest); knows how many bytes went through (tarfile's `w` mode asks once)."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = bytearray()
        self.written = 0

    def write(self, data) -> int:
        self.buffer += data
        self.written += len(data)
        if len(self.buffer) >= WRITE_BUFFER:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.stream.write(bytes(self.buffer))
            self.buffer = bytearray()

    def tell(self) -> int:
        return self.written


class ShardTarWriter:
    """Writes samples (`{"__key__": KEY, EXT: bytes, ...}`) to an open binary stream as a tar.

    Closing ends the archive but leaves the stream open; the caller owns it."""

    def __init__(self, stream, mtime: int = 0):
        self.mtime = mtime
        self.out = _Buffered(stream)
        self.tar = tarfile.open(fileobj=self.out, mode="w")  # the bytes of webdataset's "w|"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, sample: dict) -> int:
        """Add one sample's members; returns the bytes of their contents (headers and padding not
        counted), as webdataset's TarWriter.write does. Keys starting with `_` are not written."""
        if "__key__" not in sample:
            raise ValueError("sample must contain a __key__")
        members = {k: v for k, v in sample.items() if not k.startswith("_")}
        for ext, value in members.items():
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{ext} is not bytes ({type(value)})")
        key = sample["__key__"]
        total = 0
        for ext in sorted(members):
            data = bytes(members[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = MODE
            info.uname, info.gname = USER, GROUP
            self.tar.addfile(info, io.BytesIO(data))
            total += info.size
        return total

    def close(self) -> None:
        self.tar.close()
        self.out.flush()
