"""Validation and normalisation of one image for `mmjax.data.build` (policy: see dataset.py).

`check_image(data, max_side=..., max_decoded_bytes=...)` decodes the bytes with PIL and returns
either the bytes to store (the original file when it already is an 8-bit RGB JPEG/PNG that
needs no change, else a PNG of the normalised 8-bit RGB image) or a skip reason.

Memory: an image is decoded only if its pixels fit `max_decoded_bytes` as PIL holds them (the
header gives size and mode before anything is decoded; JPEGs count at the reduced scale they
are decoded at), and a large one is downscaled before any conversion that would copy it, so
the peak stays near the decoded size.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

MIN_SIDE = 8
MAX_ASPECT = 10.0
# Only formats whose PIL plugins decode in-process. Image.open otherwise also tries e.g. EPS,
# whose loader runs Ghostscript on untrusted input. MPO is how PIL opens many phone JPEGs.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
BACKGROUND = (255, 255, 255, 255)  # transparent pixels are composited on white
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "PA")
_SUPPORTED_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "F", *_SIXTEEN_BIT, *_WITH_ALPHA)
_ORIENTATION_TAG = 0x0112
# Bytes per pixel as PIL stores a decoded image: one for bilevel, grayscale and palette, two
# for 16-bit grayscale, four for everything else (RGB is padded to four).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, **dict.fromkeys(_SIXTEEN_BIT[1:], 2)}
# Modes whose downscale before the conversion to RGB gives the same image (up to rounding:
# PIL resizes RGBA and LA premultiplied, as compositing on white is linear in that space).
_RESIZE_FIRST = ("L", "LA", "RGB", "RGBA", *_SIXTEEN_BIT)
# PNG IHDR: 8-byte signature, 4-byte length, b"IHDR", width, height, then bit depth, colour type.
_PNG_BIT_DEPTH, _PNG_COLOR_TYPE, _PNG_TRUECOLOR = 24, 25, 2


@dataclasses.dataclass(frozen=True)
class Checked:
    """The outcome for one image: `data` to store, or `reason` (and `detail`) to skip it."""

    data: bytes | None = None
    reason: str | None = None
    detail: str = ""
    # What normalisation changed, e.g. ("grayscale", "downscaled"); empty when kept as is.
    fixes: tuple[str, ...] = ()
    size: tuple[int, int] = (0, 0)  # (width, height) of the stored image


def _skip(reason: str, detail: str = "") -> Checked:
    return Checked(reason=reason, detail=detail)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with the longer side at most `max_side`, aspect ratio kept."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _is_plain_rgb8(img: Image.Image, data: bytes) -> bool:
    """Whether tfds' decoders (PIL or OpenCV) read the original bytes as the final image."""
    if img.mode != "RGB" or "transparency" in img.info:
        return False
    if img.format == "JPEG":
        return True
    # PIL reads 16-bit RGB PNGs as 8-bit "RGB", but OpenCV would return uint16: check IHDR.
    return (
        img.format == "PNG"
        and data[_PNG_BIT_DEPTH] == 8
        and data[_PNG_COLOR_TYPE] == _PNG_TRUECOLOR
    )


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # malformed EXIF must not reject a decodable image; treat as upright
        return 1


def _to_rgb(img: Image.Image, fixes: list[str]) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # 16-bit samples (0..65535) to 8 bits with rounding; mode "I" is assumed to hold
        # 16-bit data too, as PIL uses it for 16-bit grayscale PNG and TIFF.
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        fixes.append("16bit")
    if img.mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND)
        fixes.append("transparency")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        names = {"1": "grayscale", "L": "grayscale", "F": "grayscale", "P": "palette"}
        fixes.append(names.get(img.mode, img.mode.lower()))  # e.g. "cmyk"
        img = img.convert("RGB")
    return img


def _encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # PIL's default level 6: on a 512x384 photo-like image 25 ms and 364 KB against 20 ms and
    # 399 KB at level 1; the dataset is written once and read many times.
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _allowed_formats() -> list[str]:
    Image.init()  # registers every plugin; Image.open(formats=...) rejects unregistered names
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]


def decoded_bytes(img: Image.Image) -> int:
    """The memory PIL takes for the pixels of `img` (as opened: nothing decoded yet)."""
    width, height = img.size
    return width * height * _BYTES_PER_PIXEL.get(img.mode, 4)


def check_image(data: bytes, *, max_side: int, max_decoded_bytes: int = 256 << 20) -> Checked:
    """Decodes `data` fully and returns what to store, or why the image is skipped."""
    if not data:
        return _skip("empty_file")
    try:
        with warnings.catch_warnings():  # PIL warns above half its limit; ours decides first
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as error:
        return _skip("too_many_pixels", str(error))
    except Exception as error:  # PIL raises many types on bad data (OSError, SyntaxError, ...)
        return _skip("undecodable", f"{type(error).__name__}: {error}")
    with img:
        width, height = img.size
        if min(width, height) < MIN_SIDE:
            return _skip("too_small", f"{width}x{height}")
        if max(width, height) / min(width, height) > MAX_ASPECT:
            return _skip("extreme_aspect_ratio", f"{width}x{height}")
        if img.mode not in _SUPPORTED_MODES:
            return _skip("unsupported_mode", img.mode)
        fits = max(width, height) <= max_side
        try:
            if img.format in ("JPEG", "MPO") and not fits:
                # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the final size:
                # much faster for camera-sized photos; the resize below does the rest.
                img.draft(None, fit_size(width, height, max_side))
            if decoded_bytes(img) > max_decoded_bytes:
                detail = f"{img.size[0]}x{img.size[1]} {img.mode}: {decoded_bytes(img)} bytes"
                return _skip("decoded_too_large", f"{detail}, over --max-decoded-mib")
            img.load()  # decodes every pixel: raises on truncated or corrupt data
        except Exception as error:
            return _skip("undecodable", f"{type(error).__name__}: {error}")
        # Only decoding is guarded: an error below is a bug to see, not a bad image to count.
        return _normalise(img, data, max_side, fits=fits)


def _normalise(img: Image.Image, data: bytes, max_side: int, *, fits: bool) -> Checked:
    # `fits` is about the file's own size: after `draft` the decoded image may be smaller.
    orientation = _orientation(img)
    if orientation == 1 and fits and _is_plain_rgb8(img, data):
        return Checked(data=data, size=img.size)
    fixes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        fixes.append("first_frame")  # animated GIF/WebP/PNG: only the first frame is stored
    if orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
            fixes.append("exif_rotated")
        except Exception:  # malformed EXIF: store the pixels as they are
            fixes.append("exif_unreadable")
    target = fit_size(*img.size, max_side)
    if target != img.size and img.mode in _RESIZE_FIRST and "transparency" not in img.info:
        img = img.resize(target, Image.Resampling.LANCZOS)  # converting now costs little
    img = _to_rgb(img, fixes)
    if target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS)
    if not fits:
        fixes.append("downscaled")
    if not fixes:
        fixes.append("reencoded")  # e.g. a WebP/GIF/BMP/TIFF or a 16-bit RGB PNG
    return Checked(data=_encode_png(img), fixes=tuple(fixes), size=img.size)
