"""WebDataset tar writing with the standard library only.

The build writes its shards with this instead of `webdataset.TarWriter` because `import webdataset`
imports torch when it is installed (seconds and hundreds of MB in every Beam worker), and the build
only writes tars. The output is byte-identical to `webdataset.TarWriter(stream, mtime=0,
encoder=False)` (tests/test_tar_writer.py compares them): members `KEY.EXT` in sorted order of EXT,
mode 0o444, owner bigdata:bigdata, uid/gid 0, a fixed mtime, Python's default tar format (PAX,
which for short ASCII names writes plain ustar headers), padded to a whole tar record on close.

Each member is written as tarfile's `TarFile.addfile` writes it: the header from
`TarInfo.tobuf()` (tarfile still encodes it, with the defaults a TarFile uses: PAX format), then
the contents and NUL padding to a whole 512-byte block; closing adds the two zero blocks and pads
to a whole record, as `TarFile.close` does. addfile would copy the contents out of a file object
in 16 KiB reads, and a buffer behind it copied them twice more; here pieces smaller than
WRITE_BUFFER (headers, padding, a sample's jpg and json) are collected and passed on joined, in
writes of about WRITE_BUFFER bytes, and a larger piece is passed on as it is. A local file or an
object store's upload stream gets few large writes, not several small ones per sample.
"""
from __future__ import annotations

import tarfile

USER = GROUP = "bigdata"
MODE = 0o444


WRITE_BUFFER = 1 << 20
BLOCK = 512  # a tar block: a header, and the unit contents are padded to (tarfile.BLOCKSIZE)
RECORD = 20 * BLOCK  # a whole archive is padded to a multiple of this (tarfile.RECORDSIZE)


class ShardTarWriter:
    """Writes samples (`{"__key__": KEY, EXT: bytes, ...}`) to an open binary stream as a tar.

    Closing ends the archive but leaves the stream open; the caller owns it."""

    def __init__(self, stream, mtime: int = 0):
        self.stream = stream
        self.mtime = mtime
        self.offset = 0  # bytes of the archive so far
        self.pending: list = []  # small pieces not yet passed on, self.pending_bytes in all
        self.pending_bytes = 0

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
            data = bytes(members[ext])  # no copy for bytes; a memoryview's len may not count bytes
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = MODE
            info.uname, info.gname = USER, GROUP
            self._put(info.tobuf())
            self._put(data)
            self._put(bytes(-info.size % BLOCK))
            total += info.size
        if self.pending_bytes >= WRITE_BUFFER:
            self._flush()
        return total

    def close(self) -> None:
        self._put(bytes(2 * BLOCK))  # the end-of-archive marker
        self._put(bytes(-self.offset % RECORD))
        self._flush()

    def _put(self, piece: bytes) -> None:
        self.offset += len(piece)
        if len(piece) >= WRITE_BUFFER:
            self._flush()  # what came before it first
            self.stream.write(piece)
        elif piece:
            self.pending.append(piece)
            self.pending_bytes += len(piece)

    def _flush(self) -> None:
        if self.pending:
            self.stream.write(b"".join(self.pending))
            self.pending, self.pending_bytes = [], 0
