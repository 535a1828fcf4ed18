"""The lossless JPEG copy: same pixels as the source, no metadata, or None when it cannot be sure."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from pipeline.stages.jpeg_copy import estimated_quality, strip_metadata

DECODING_MARKERS = {0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, 0xDA, 0xE0, 0xEE}


def pixels(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(im)


def markers(data: bytes) -> list[int]:
    """Every marker segment's marker, scans skipped (what a decoder walks through)."""
    found, pos = [], 2
    while True:
        while data[pos + 1] == 0xFF:
            pos += 1
        marker = data[pos + 1]
        found.append(marker)
        if marker == 0xD9:
            return found
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:  # skip the entropy-coded data up to the next real marker
            while not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1


def photo(size=(320, 240), **save) -> bytes:
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    im = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (43.0, 28.0, 2.81), 3: "E", 4: (11.0, 53.0, 6.45)}
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), comment=b"shot at 43.4674N 11.8851E",
            xmp=b"<x:xmpmeta>GPS</x:xmpmeta>", **save)
    return buf.getvalue()


def assert_same_picture_without_metadata(source: bytes, copy: bytes) -> None:
    assert np.array_equal(pixels(copy), pixels(source))
    assert set(markers(copy)) - {0xD9} <= DECODING_MARKERS, [hex(m) for m in markers(copy)]
    for needle in (b"Exif\x00\x00", b"ICC_PROFILE", b"http://ns.adobe.com", b"xmpmeta", b"43.4674N", b"MPF\x00"):
        assert needle not in copy
    assert len(Image.open(io.BytesIO(copy)).getexif()) == 0


def test_every_shared_jpeg_copies_to_the_same_pixels_or_is_refused(exif_samples):
    copied = 0
    for path in sorted(exif_samples.rglob("*.jpg")):
        source = path.read_bytes()
        copy = strip_metadata(source)
        if copy is None:
            continue
        copied += 1
        assert_same_picture_without_metadata(source, copy)
        assert len(copy) < len(source)
    assert copied >= 30  # all but the broken ones: the copy is not a rare path


def test_gps_photo_copy_keeps_no_gps(exif_samples):
    source = (exif_samples / "gps" / "DSCN0010.jpg").read_bytes()
    assert Image.open(io.BytesIO(source)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert_same_picture_without_metadata(source, strip_metadata(source))


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"restart_marker_blocks": 3},
                                  {"progressive": True, "restart_marker_rows": 1}, {"subsampling": 0}])
def test_baseline_progressive_and_restart_markers(save):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = photo(icc_profile=icc, quality=85, **save)
    copy = strip_metadata(source)
    assert_same_picture_without_metadata(source, copy)
    if save.get("progressive"):
        assert markers(copy).count(0xDA) > 1  # every scan came along


def test_segments_between_progressive_scans_are_dropped():
    source = photo(progressive=True)
    second_scan = source.index(b"\xff\xda", source.index(b"\xff\xda") + 2)
    comment = b"GPS 43.4674N"
    between = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    app1 = b"\xff\xe1" + struct.pack(">H", 8) + b"Exif\x00\x00"
    source = source[:second_scan] + between + app1 + source[second_scan:]
    assert_same_picture_without_metadata(source, strip_metadata(source))


def test_data_after_the_end_marker_is_dropped():
    first, second = photo(), photo(size=(64, 48))
    copy = strip_metadata(first + second)  # how an MPO or a phone trailer looks
    assert copy == strip_metadata(first)
    assert_same_picture_without_metadata(first, copy)


def test_fill_bytes_before_markers_are_allowed():
    source = photo()
    sos = source.index(b"\xff\xda")
    padded = source[:sos] + b"\xff\xff" + source[sos:-2] + b"\xff\xff\xd9"
    assert np.array_equal(pixels(strip_metadata(padded)), pixels(source))


def test_what_it_refuses():
    good = photo()
    sof = good.index(b"\xff\xc0")
    assert strip_metadata(b"") is None
    assert strip_metadata(b"GIF89a" + good) is None
    assert strip_metadata(good[: len(good) // 2]) is None  # truncated in the scan: no end marker
    assert strip_metadata(good[:sof + 5]) is None  # truncated in a segment
    assert strip_metadata(good[:sof + 1] + b"\xc9" + good[sof + 2:]) is None  # arithmetic coding
    assert strip_metadata(good[:sof + 4] + b"\x0c" + good[sof + 5:]) is None  # 12-bit samples
    assert strip_metadata(good[:2] + good[sof:]) is not None  # tables missing is the decoder's call
    no_frame = good[:sof] + good[good.index(b"\xff\xda"):]
    assert strip_metadata(no_frame) is None  # a scan before any frame header
    assert strip_metadata(good[:good.index(b"\xff\xda")] + b"\xff\xd9") is None  # headers, no scan


def test_a_bad_segment_length_is_refused():
    good = photo()
    app1 = good.index(b"\xff\xe1")
    assert strip_metadata(good[:app1 + 2] + b"\x00\x01" + good[app1 + 4:]) is None  # length < 2
    assert strip_metadata(good[:app1 + 2] + b"\xff\xf0" + good[app1 + 4:]) is None  # past the end


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 85, 90, 95, 100])
def test_estimated_quality_matches_the_encoder(quality):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "JPEG", quality=quality)
    assert estimated_quality(Image.open(buf).quantization) == pytest.approx(quality, abs=1.0)


def test_estimated_quality_without_tables():
    assert estimated_quality(None) is None
    assert estimated_quality({}) is None
    assert estimated_quality({1: [1] * 64}) is None
