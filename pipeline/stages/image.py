"""Image stage: source bytes -> clean, upright RGB JPEG without any metadata.

What the stage guarantees for every kept record:
- the picture is upright (EXIF orientation applied with ImageOps.exif_transpose);
- RGB, longer side <= max_side (never upscaled);
- no metadata at all in the output: no EXIF, XMP, ICC, comment. GPS must never leak into a
  training image, and keeping nothing is simpler to guarantee than keeping "safe" parts;
- colours are in sRGB: an embedded ICC profile is converted to sRGB with ImageCms (littlecms)
  and then dropped; if the profile cannot be used the pixels are kept as they are (no reject);
- record.image describes it. orig_width/orig_height are the *upright* full-resolution size (as a
  viewer displays the photo), i.e. stored width/height swapped for orientations 5-8;
  jpeg_copied says whether the JPEG is the source's own compressed data (see below).

A JPEG that needs no change at all (upright, RGB, longer side <= max_side, no ICC profile, and
compressed at no more than our quality, judged from its quantisation table) is not decoded and
encoded again: re-encoding would only add a generation of loss. Its scans are copied byte for
byte without the metadata segments (pipeline.stages.jpeg_copy), and the copy is decoded (at reduced
scale and luma only: libjpeg still reads every coded byte, so a broken file still fails) for the
perceptual hash. Any other image, and any JPEG the strict copy does not handle, is re-encoded as before.

Decompression bombs are refused from the header size before any pixel is decoded, with a
per-stage limit; Pillow's global settings (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) are never
changed, since they would leak into every other user of Pillow in the worker.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import re

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without littlecms: profiles are dropped, pixels kept as is
    ImageCms = None

from pipeline.stages import jpeg_copy
from pipeline.core.record import Record, Reject
from pipeline.core.stage import Outcome, Stage

log = logging.getLogger(__name__)

# Pillow's own default MAX_IMAGE_PIXELS (about 89.5 Mpx, a 1 GB RGBA buffer): the size above which
# Pillow itself warns of a decompression bomb. Spelled out so a changed global cannot move it.
DEFAULT_MAX_PIXELS = 89_478_485
# Formats a photo corpus can hold. Pillow's plug-ins for other formats (EPS runs Ghostscript, ...)
# are a needless attack surface for untrusted input. (The JPEG opener also returns multi-picture
# phone JPEGs, whose im.format is "MPO"; "MPO" itself is not an opener name.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF") + (("AVIF",) if features.check("avif") else ())
# A picture whose sides differ more than this is a strip, not a photo; and one whose shorter side
# would be under min_side after the resize (33x30000 became 1x768) is no sample either.
MAX_ASPECT = 20.0
_JPEG_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255)
# A copied JPEG's estimated quality may exceed ours by this much: the estimate is exact to about
# one step, and a file made at our own quality must not be re-encoded for a rounding.
QUALITY_SLACK = 1.0


def open_image(data: bytes) -> Image.Image:
    """Image.open on bytes, limited to ACCEPTED_FORMATS. Reads the header only."""
    return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def reject_for_pillow_error(exc: Exception, action: str) -> Reject:
    """One vocabulary for what Pillow raises while opening or decoding untrusted bytes."""
    # Pillow names the stream it read (<_io.BytesIO object at 0x7f...>): an address that differs
    # between processes and runs would make the ledger differ too, and says nothing.
    message = _OBJECT_REPR.sub("the bytes", str(exc))
    text = f"{action}: {type(exc).__name__}: {message}"
    if isinstance(exc, UnidentifiedImageError):
        return Reject("not_image", f"not an image Pillow can identify (accepted: "
                                   f"{', '.join(ACCEPTED_FORMATS)}): {message}")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return Reject("decompression_bomb", text)
    # Pillow reports a short file as "image file is truncated" (pixel data) or
    # "Truncated File Read" (header/segments); LOAD_TRUNCATED_IMAGES stays off on purpose.
    if "truncated" in str(exc).lower():
        return Reject("truncated", text)
    return Reject("decode_error", text)


PHASH_MIN_SIDE = 64  # phash looks at a 32x32 LANCZOS thumbnail; twice that is plenty of signal


def phash_reduction(size: tuple[int, int]) -> int:
    """The power of two that brings the shorter side into [PHASH_MIN_SIDE, 2 * PHASH_MIN_SIDE)
    (1 for smaller pictures). A power of two, because libjpeg decodes a copied JPEG at exactly
    1/2, 1/4 or 1/8 scale: the same reduction whichever way a picture reached the hash."""
    factor = 1
    while min(size) // (2 * factor) >= PHASH_MIN_SIDE:
        factor *= 2
    return factor


def perceptual_hash(pixels: Image.Image) -> str:
    """imagehash.phash after a box reduction by phash_reduction: LANCZOS from the full picture to
    32x32 is costly, and the DCT only keeps the lowest frequencies, which the reduction does not
    touch (a scaled decode and a full one hash at most 2 bits apart: tests/test_image.py)."""
    factor = phash_reduction(pixels.size)
    small = pixels.reduce(factor) if factor > 1 else pixels
    return str(imagehash.phash(small))


class ImageStage(Stage):
    name = "image"

    def __init__(self, max_side: int = 768, quality: int = 90,
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 32, copy_jpeg: bool = True):
        if max_side < 1 or min_side < 1 or max_pixels < 1 or not 1 <= quality <= 100:
            raise ValueError("max_side, min_side, max_pixels must be >= 1 and quality in 1..100")
        self.max_side = max_side
        self.quality = quality
        # Image.open itself raises above 2x Pillow's global MAX_IMAGE_PIXELS, so a limit above
        # that only takes effect if the caller raises the global too.
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.copy_jpeg = copy_jpeg  # False: every image is decoded and re-encoded

    def process(self, record: Record) -> Outcome:
        data = record.image_bytes
        if not data:
            return Reject("no_image_bytes", "record has no image bytes (read stage not run?)")
        try:
            im = open_image(data)
        except Exception as exc:  # noqa: BLE001 - any failure on untrusted bytes is a reject
            return reject_for_pillow_error(exc, "open")
        with im:
            return self._convert(record, im, data)

    def _convert(self, record: Record, im: Image.Image, data: bytes) -> Outcome:
        width, height = im.size
        source_format = im.format
        if width * height > self.max_pixels:
            return Reject("decompression_bomb", f"header says {width}x{height} = {width * height} "
                                                f"pixels, over the limit of {self.max_pixels}")
        if min(width, height) < self.min_side:
            return Reject("too_small", f"{width}x{height} has a side under {self.min_side} px")
        degenerate = self._degenerate(width, height)
        if degenerate:
            return degenerate
        if source_format in _JPEG_FORMATS:
            copied = self._copied_jpeg(record, im, data)
            if copied is not None:
                return copied
            self._draft(im)
        try:
            im.load()
        except Exception as exc:  # noqa: BLE001 - any failure on untrusted bytes is a reject
            return reject_for_pillow_error(exc, "decode")
        upright, orientation = self._make_upright(im)
        try:
            pixels = _to_rgb_base(upright)
            pixels = self._resize(pixels)
            pixels = _flatten_to_srgb(pixels, im.info.get("icc_profile"))
        except Exception as exc:  # noqa: BLE001 - exotic modes (LAB, ...) Pillow cannot convert
            return reject_for_pillow_error(exc, f"convert {im.mode} to RGB")
        pixels.info = {}  # JPEG save copies im.info["comment"] etc.: nothing may travel along
        out = io.BytesIO()
        pixels.save(out, "JPEG", quality=self.quality)
        jpeg = out.getvalue()
        orig_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        return _with_jpeg(record, data, jpeg, pixels.size, orig_size, source_format, orientation,
                          perceptual_hash(pixels), copied=False)

    def _degenerate(self, width: int, height: int) -> Reject | None:
        """Reject a strip: the shorter side after the resize (an orientation swaps the sides, not
        their lengths) under min_side, or an aspect ratio over MAX_ASPECT."""
        scale = min(1.0, self.max_side / max(width, height))
        shorter = max(1, round(min(width, height) * scale))
        ratio = max(width, height) / min(width, height)
        if shorter < self.min_side or ratio > MAX_ASPECT:
            return Reject("degenerate_aspect", f"{width}x{height} (aspect {ratio:.1f}:1) would be "
                                               f"{shorter} px on its shorter side at --max-side "
                                               f"{self.max_side} (at least {self.min_side} px, aspect "
                                               f"at most {MAX_ASPECT:g}:1)")
        return None

    def _copied_jpeg(self, record: Record, im: Image.Image, data: bytes) -> Record | None:
        """The record with the source's own JPEG data, metadata stripped, when nothing about the
        picture has to change; None otherwise (the caller re-encodes)."""
        if not self.copy_jpeg or im.mode != "RGB" or max(im.size) > self.max_side \
                or im.info.get("icc_profile") or _orientation(im) != 1:
            return None
        quality = jpeg_copy.estimated_quality(getattr(im, "quantization", None))
        if quality is None or quality > self.quality + QUALITY_SLACK:
            return None  # finer than ours: re-encoding makes it smaller, which is what quality asks
        jpeg = jpeg_copy.strip_metadata(data)
        if jpeg is None:
            return None
        try:
            copy = Image.open(io.BytesIO(jpeg), formats=("JPEG",))
            factor = phash_reduction(copy.size)
            # DCT-domain scaling to 1/factor, and only the luma plane (phash converts to L
            # anyway): every coded byte is still read and checked, but no chroma is upsampled
            # or converted.
            copy.draft("L", (-(-copy.width // factor), -(-copy.height // factor)))
            copy.load()
        except Exception:  # noqa: BLE001 - the re-encoding path decodes again and gives the reason
            return None
        if copy.mode != "L":
            return None
        return _with_jpeg(record, data, jpeg, im.size, im.size, im.format, 1, perceptual_hash(copy),
                          copied=True)

    def _draft(self, im: Image.Image) -> None:
        # libjpeg can decode at 1/2, 1/4 or 1/8 scale for almost no cost; draft picks the
        # strongest reduction that still leaves the longer side >= max_side.
        scale = self.max_side / max(im.size)
        if scale <= 0.5:
            im.draft(im.mode, (int(im.width * scale) + 1, int(im.height * scale) + 1))

    @staticmethod
    def _make_upright(im: Image.Image) -> tuple[Image.Image, int]:
        """The upright image and the EXIF orientation applied (1 = none or unreadable EXIF)."""
        orientation = _orientation(im)
        if orientation == 1:
            return im, 1  # skips exif_transpose's full-size copy for upright photos
        try:
            return ImageOps.exif_transpose(im), orientation
        except Exception as exc:  # noqa: BLE001 - unreadable EXIF: the pixels are still usable
            log.debug("EXIF orientation not applied: %s", exc)
            return im, 1

    def _resize(self, im: Image.Image) -> Image.Image:
        longer = max(im.size)
        if longer <= self.max_side:
            return im
        scale = self.max_side / longer
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        # reducing_gap: cheap integer reduce() first, LANCZOS for the last factor <= 3.
        return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _with_jpeg(record: Record, data: bytes, jpeg: bytes, size: tuple[int, int],
               orig_size: tuple[int, int], source_format: str, orientation: int, phash: str,
               copied: bool) -> Record:
    """The record with its output JPEG and the facts record.image holds about it."""
    facts = {
        "width": size[0], "height": size[1],
        "orig_width": orig_size[0], "orig_height": orig_size[1],
        "orig_format": source_format,
        "orientation": orientation,
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": phash,
        "jpeg_bytes": len(jpeg),
        "jpeg_copied": copied,
    }
    return record.replace(image_bytes=jpeg, image=facts)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 2..8, or 1 (none, out of range, or EXIF unreadable: pixels as stored)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - unreadable EXIF: the pixels are still usable
        log.debug("EXIF unreadable, orientation not applied: %s", exc)
        return 1
    return orientation if orientation in range(2, 9) else 1


def _to_rgb_base(im: Image.Image) -> Image.Image:
    """Bring any mode to L, RGB, RGBA or CMYK: modes that resize and ICC transforms handle."""
    mode = im.mode
    if mode in ("L", "RGB", "RGBA", "CMYK"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    if mode == "F":
        # Float images have no agreed range: stretch what is there to 0..255.
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        low, high = float(arr.min()), float(arr.max())
        arr = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    return im.convert("RGB")  # YCbCr, RGBX, ...; LAB/HSV raise and become decode_error


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str):
    # Cameras repeat the same few profiles, so the built transforms are worth keeping.
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, out_mode)


def _flatten_to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert colours to sRGB when a profile says how, then put alpha over white -> RGB."""
    if icc and ImageCms is not None:
        try:
            im = ImageCms.applyTransform(im, _srgb_transform(icc, im.mode))
        except Exception as exc:  # noqa: BLE001 - broken or mismatched profile: keep the pixels
            log.debug("ICC profile not usable, dropped: %s", exc)
    if im.mode == "RGBA":
        flat = Image.new("RGB", im.size, _WHITE)
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")
