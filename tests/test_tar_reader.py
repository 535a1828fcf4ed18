"""pipeline.io.tar_reader groups tar members into samples exactly as webdataset does."""
from __future__ import annotations

import io
import tarfile

import pytest
from webdataset import tariterators

from pipeline.io.tar_reader import group_samples, tar_members


def _tar(members: list[tuple[str, bytes]], extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def ours(data: bytes):
    return list(group_samples(tar_members(io.BytesIO(data))))


def webdataset_s(data: bytes):
    expanded = tariterators.tar_file_expander([{"url": "x.tar", "stream": io.BytesIO(data)}])
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tariterators.group_by_keys(expanded)]


def test_same_samples_as_webdataset_on_img2dataset_and_odd_names(exif_samples):
    jpg = (exif_samples / "gps" / "DSCN0010.jpg").read_bytes()
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    members = [("000000000.jpg", jpg), ("000000000.json", b'{"lat": 1}'), ("000000000.txt", b"cap"),
               ("000000001.JPG", jpg), ("000000001.json", b"{}"),
               ("sub/dir/a.b.seg.png", b"p"), ("sub/dir/a.b.json", b"{}"),  # key up to the first dot
               ("__meta__", b"skipped"), ("noext", b"skipped too"), ("k.__x__", b"x"),
               ("000000002.json", b"{}")]
    data = _tar(members, extra=[folder])
    got = ours(data)
    assert got == webdataset_s(data)
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "sub/dir/a", "k", "000000002"]
    assert got[1]["jpg"] == jpg and got[2]["b.seg.png"] == b"p"


def test_repeated_extension_in_a_sample_is_an_error_in_both():
    data = _tar([("a.jpg", b"1"), ("a.json", b"{}"), ("a.jpg", b"2")])
    with pytest.raises(ValueError, match="duplicate"):
        ours(data)
    with pytest.raises(ValueError, match="duplicate"):
        webdataset_s(data)


@pytest.mark.parametrize("cut", [700, 1024, 1500])
def test_truncated_tar_fails_or_stops_where_webdataset_does(cut):
    data = _tar([(f"{i:03d}.json", b"{}" * 200) for i in range(4)])[:cut]

    def outcome(read):
        try:
            return [s["__key__"] for s in read(data)], None
        except Exception as exc:  # noqa: BLE001
            return None, type(exc).__name__

    assert outcome(ours) == outcome(webdataset_s)
