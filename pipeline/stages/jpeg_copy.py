"""A JPEG's own compressed data without its metadata: the lossless alternative to re-encoding.

A photo that needs no change (already upright, RGB, small enough, no colour profile to convert)
loses quality and gains nothing when it is decoded and encoded again. `strip_metadata` keeps
exactly the segments a decoder needs and the entropy-coded scans, byte for byte, and drops every
other segment: EXIF and XMP (APP1), ICC and MPF (APP2), IPTC (APP13), comments (COM), JFXX
thumbnails, any other APPn, and whatever follows the end-of-image marker (the second picture of
an MPO, phone "trailers"). Pillow reads and writes JPEGs but has no such copy, so it is written
here, strictly: anything unexpected gives None and the caller re-encodes instead.

Segment layout (ITU T.81, B.1): SOI, then marker segments (FF xx, 2-byte length including
itself), then for each scan an SOS segment followed by entropy-coded data in which a data byte FF
is always followed by 00 (stuffing) or a restart marker D0-D7; the next other marker ends the
scan. Progressive files put further DHT/SOS (and possibly other) segments between scans.
"""
from __future__ import annotations

import re

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
# Segments a decoder needs: quantisation and Huffman tables, restart interval, line count.
TABLE_MARKERS = frozenset({0xDB, 0xC4, 0xDD, 0xDC})
# Frames Pillow and every browser decode: baseline, extended sequential, progressive (Huffman).
# Arithmetic-coded, lossless and hierarchical frames are refused (None): re-encoding them is safer.
COPYABLE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
APP0, APP14, COM = 0xE0, 0xEE, 0xFE
RESTARTS = frozenset(range(0xD0, 0xD8))
# In entropy-coded data FF is followed by 00 (a stuffed data byte), a restart marker D0-D7, or FF
# (fill before a marker); the first FF followed by anything else is the marker that ends the scan.
# One regex search in C instead of walking every FF in Python.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

# IJG's luminance quantisation table at quality 50 (Annex K.1, natural order, as Pillow's
# `quantization` gives it), whose scaled copies libjpeg, Pillow and most cameras and phones write.
IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def _kept(marker: int, payload: bytes) -> bool:
    """Whether a segment before or between scans goes into the copy."""
    if marker in TABLE_MARKERS or marker in COPYABLE_FRAMES or marker == SOS:
        return True
    if marker == APP0:
        return payload.startswith(b"JFIF\x00")  # density only; JFXX carries a thumbnail
    if marker == APP14:
        # Adobe's colour-transform flag: it tells a decoder whether 3 components are YCbCr or RGB.
        return payload.startswith(b"Adobe")
    return False  # APP1..APP13, APP15, COM: metadata


def strip_metadata(data: bytes) -> bytes | None:
    """The JPEG in `data` with only its decoding segments and scans, or None when the file is not
    one this copy handles (not a JPEG, a frame type outside COPYABLE_FRAMES, 12-bit samples, a
    segment running past the end, no scan, no end-of-image marker: truncated)."""
    if data[:2] != b"\xff\xd8":
        return None
    out = [b"\xff\xd8"]
    pos, end, seen_frame, seen_scan = 2, len(data), False, False
    while True:
        if pos + 2 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == EOI:
            return b"".join(out) + b"\xff\xd9" if seen_scan else None
        if marker == SOI or marker in RESTARTS or marker == 0x01 or marker in OTHER_FRAMES:
            return None
        if pos + 4 > end:
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        payload = data[pos + 4:pos + 2 + length]
        if marker in COPYABLE_FRAMES:
            if seen_frame or not payload or payload[0] != 8:  # one frame, 8-bit samples
                return None
            seen_frame = True
        if _kept(marker, payload):
            out.append(data[pos:pos + 2 + length])
        pos += 2 + length
        if marker == SOS:
            if not seen_frame:
                return None
            seen_scan = True
            scan_end = _scan_end(data, pos)
            if scan_end is None:
                return None
            out.append(data[pos:scan_end])
            pos = scan_end


def _scan_end(data: bytes, pos: int) -> int | None:
    """Offset of the marker that ends the entropy-coded data starting at `pos` (None: none)."""
    found = _SCAN_END.search(data, pos)
    return found.start() if found else None


def estimated_quality(quantization: dict | None) -> float | None:
    """The IJG quality (1-100) whose luminance table matches the file's table 0, or None when there
    is none. libjpeg scales the base table by 5000/q (q < 50) or 200 - 2q (q >= 50) percent and
    clips entries to 1..255; the ratio of sums over the entries not clipped at 255 inverts that to
    within about one step."""
    if not quantization or 0 not in quantization:
        return None
    table = list(quantization[0])
    if len(table) != 64:
        return None
    pairs = [(q, base) for q, base in zip(table, IJG_LUMA) if q < 255] or [(255, max(IJG_LUMA))]
    scale = 100.0 * sum(q for q, _ in pairs) / sum(base for _, base in pairs)  # % of quality 50
    if scale <= 0:
        return None
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return max(1.0, min(100.0, quality))
