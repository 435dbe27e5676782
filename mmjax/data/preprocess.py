"""Image preprocessing: decode, resize, crops, flips and CLIP normalisation.

Training and evaluation views:
- eval (`augment="none"`): resize the shorter side to S (bicubic, antialiased), center crop S×S;
- train `augment="random_resized_crop"`: a crop covering a fraction `crop_scale` of the area
  with aspect ratio in [3/4, 4/3], resized to S×S; with `flip`, a horizontal flip with
  probability 1/2. Flips are off by default: they change meaning for digits and for captions
  that say "left"/"right".

Randomness comes from a numpy Generator that the pipeline seeds from (run seed, stream
position), and every call draws the same count of numbers whatever the outcome, so the stream
of crops is a pure function of the seed. An image that already is S×S passes `augment="none"`
untouched (no resampling), so the built-in datasets keep their exact pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# CLIP's image normalisation constants (RGB), so pretrained CLIP towers see familiar inputs.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

AUGMENTATIONS = ("none", "random_resized_crop")
# Random-resized-crop draws this many candidate boxes before falling back to a center crop.
_CROP_TRIES = 10


def decode(value) -> np.ndarray:
    """uint8 [H, W, 3] from encoded image bytes, or from an already decoded array."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return value if value.shape[-1] == 3 else np.repeat(value[..., :1], 3, axis=-1)
    with Image.open(io.BytesIO(bytes(value))) as image:
        return np.asarray(image.convert("RGB"))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size`, then the central size×size window."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize(image, nw, nh)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def crop_box(
    height: int, width: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop of area fraction in `scale` and aspect ratio (w/h)
    log-uniform in [3/4, 4/3]; the largest centered box of a clamped ratio if no draw fits."""
    area = height * width
    fractions = rng.uniform(scale[0], scale[1], size=_CROP_TRIES)
    log_ratios = rng.uniform(math.log(3 / 4), math.log(4 / 3), size=_CROP_TRIES)
    offsets = rng.random(size=(_CROP_TRIES, 2))
    for frac, log_ratio, (oy, ox) in zip(fractions, log_ratios, offsets, strict=True):
        ratio = math.exp(log_ratio)
        w = round(math.sqrt(area * frac * ratio))
        h = round(math.sqrt(area * frac / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(oy * (height - h + 1)), int(ox * (width - w + 1)), h, w
    # No draw fitted (e.g. a very elongated image): the largest centered box whose aspect ratio
    # is the image's clamped to [3/4, 4/3].
    ratio = min(max(width / height, 3 / 4), 4 / 3)
    w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(
    image: np.ndarray,
    size: int,
    *,
    augment: str,
    crop_scale: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """The training view of one image, uint8 [size, size, 3] (see the module doc)."""
    if augment == "none":
        out = resize_center_crop(image, size)
    elif augment == "random_resized_crop":
        top, left, h, w = crop_box(image.shape[0], image.shape[1], tuple(crop_scale), rng)
        out = _resize(image[top : top + h, left : left + w], size, size)
    else:
        raise ValueError(f"augment={augment!r} is unknown; use one of {AUGMENTATIONS}")
    flip_now = rng.random() < 0.5  # always drawn, so later draws do not depend on `flip`
    return out[:, ::-1] if flip and flip_now else out


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, as one fused multiply-add."""
    scale = 1.0 / (255.0 * IMAGE_STD)
    return images.astype(np.float32) * scale - IMAGE_MEAN / IMAGE_STD
