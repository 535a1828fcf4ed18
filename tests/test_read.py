"""Read stage: bytes from image_path through Beam FileSystems, or a reason why not."""
from __future__ import annotations

import gzip

import pytest

from pipeline.stages.read import DEFAULT_MAX_BYTES, ReadStage
from pipeline.core.record import Record, Reject
from pipeline.core.stage import run_stage


def record(path=None, data=None) -> Record:
    return Record(key="k-000000000000", source="exif:/x", input_id=str(path), image_path=path,
                  image_bytes=data, coords_raw={"kind": "exif"})


def test_reads_real_photo_bytes_exactly(exif_samples):
    path = exif_samples / "gps" / "DSCN0010.jpg"
    out = ReadStage().process(record(str(path)))
    assert isinstance(out, Record)
    assert out.image_bytes == path.read_bytes()
    assert out.image_path == str(path) and out.coords_raw == {"kind": "exif"}


def test_bytes_already_present_pass_through_without_reading():
    # The path does not exist: a read attempt would turn this into missing_file.
    given = record("/nonexistent/photo.jpg", b"\xff\xd8 raw bytes")
    assert ReadStage().process(given) is given


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "https://example.com/a.jpg",
                                 "HTTPS://EXAMPLE.COM/A.JPG", "ftp://example.com/a.jpg"])
def test_urls_are_rejected_with_a_pointer_to_the_download_stage(url):
    out = ReadStage().process(record(url))
    assert out.reason == "url_not_downloaded"
    assert "mg-geo download" in out.detail and url in out.detail


def test_missing_file(tmp_path):
    out = ReadStage().process(record(str(tmp_path / "gone.jpg")))
    assert out == Reject("missing_file", f"no file at {tmp_path / 'gone.jpg'}")


def test_record_without_path_or_bytes_is_missing_file():
    assert ReadStage().process(record(None)).reason == "missing_file"


def test_zero_byte_file_and_zero_given_bytes_are_empty(tmp_images):
    assert ReadStage().process(record(str(tmp_images("empty.jpg", b"")))).reason == "empty_file"
    assert ReadStage().process(record("/x.jpg", b"")).reason == "empty_file"


def test_directory_named_like_a_photo_is_unreadable(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    out = ReadStage().process(record(str(tmp_path / "album.jpg")))
    assert out.reason == "unreadable"
    assert "album.jpg" in out.detail


def test_too_large_is_checked_against_the_configured_limit(exif_samples):
    path = exif_samples / "gps" / "DSCN0010.jpg"
    size = path.stat().st_size
    too_large = ReadStage(max_bytes=size - 1).process(record(str(path)))
    assert too_large.reason == "too_large"
    assert f"{size} bytes" in too_large.detail  # known from the file size, before reading it
    assert ReadStage(max_bytes=size).process(record(str(path))).image_bytes == path.read_bytes()
    assert DEFAULT_MAX_BYTES == 64 * 1024 * 1024


def test_compressed_looking_names_are_not_decompressed(tmp_images):
    # FileSystems' default AUTO compression would gunzip this; an input is read byte for byte.
    data = gzip.compress(b"not really a photo")
    path = tmp_images("photo.jpg.gz", data)
    assert ReadStage().process(record(str(path))).image_bytes == data


def test_run_stage_gives_one_ledger_row_per_bad_input(exif_samples, tmp_images):
    good = record(str(exif_samples / "misc" / "no_exif.jpg"))
    bad = [record("https://example.com/x.jpg"), record(str(tmp_images("e.jpg", b"")))]
    kept, rejected = run_stage(ReadStage(), [good] + bad)
    assert [r.input_id for r in kept] == [good.input_id]
    assert [(r.stage, r.reason) for r in rejected] == [("read", "url_not_downloaded"),
                                                       ("read", "empty_file")]
