"""The built-in `digits` dataset: scikit-learn's handwritten digits, with captions.

1,797 real 8x8 greyscale scans (values 0..16) of the digits 0-9, shipped inside scikit-learn
(the test set of UCI's optdigits, written by 13 people), so the dataset needs no download.
Unlike `shapes`, the pixels are real handwriting; the captions are templated from the label.

Everything here is a pure function of its arguments: the dataset can be rebuilt bit for bit
anywhere. `digits_builder.py` writes it as a tfds dataset.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
# sklearn stores pixel intensities as counts of set pixels in a 4x4 block of the 32x32 scan.
MAX_VALUE = 16

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_WORDS_ZH = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")

# Captions per example: English first (index 0 is canonical), then Chinese. Every caption
# names the digit, as a word or as a numeral, so a model has to read both forms; mixing them
# ties "7" and "seven" to the same images.
_EN_TEMPLATES = (
    "a handwritten digit {word}",  # canonical: the caption evaluation uses
    "the number {numeral}",
    "a handwritten {word}",
    "the digit {numeral} written by hand",
)
_ZH_TEMPLATES = (
    "手写数字{word}",
    "数字{numeral}",
    "一个手写的{word}",
)
NUM_EN_CAPTIONS = len(_EN_TEMPLATES)
NUM_ZH_CAPTIONS = len(_ZH_TEMPLATES)


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] with values 0..16, labels int64 [1797]) from scikit-learn.

    Cached, as every builder or test call would otherwise re-parse sklearn's CSV; the arrays
    are read-only so one caller cannot change what the next one sees.
    """
    # Imported here: only building the dataset needs scikit-learn, not reading it.
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.uint8)  # stored as float64 but integral, 0..16
    labels = bunch.target.astype(np.int64)
    if not np.array_equal(images, bunch.images) or images.max() > MAX_VALUE:
        raise ValueError("scikit-learn's digits are no longer integers in 0..16")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def to_rgb(image8x8: np.ndarray, image_size: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) as uint8 [S, S, 3]: white ink on black, grey in RGB.

    Upsampled with bilinear interpolation, in float so that 0..16 is rescaled to 0..255 only
    once, before rounding. Bilinear rather than bicubic: from 8 px any kernel gives a soft
    image, but bicubic overshoots next to strokes (ringing), which clips at 0 and 255 and
    draws dark halos around the ink; bilinear stays within the input range. Nearest would
    keep the 8x8 blocks, whose edges are a grid artefact, not part of the handwriting.
    """
    if image8x8.shape != (8, 8):
        raise ValueError(f"expected an 8x8 image, got shape {image8x8.shape}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    scaled = np.asarray(image8x8, dtype=np.float32) * (255.0 / MAX_VALUE)
    resized = Image.fromarray(scaled, mode="F").resize(
        (image_size, image_size), Image.Resampling.BILINEAR
    )
    grey = np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def canonical_caption(label: int) -> str:
    """The English caption used for evaluation, e.g. "a handwritten digit seven"."""
    return _EN_TEMPLATES[0].format(word=DIGIT_WORDS[label], numeral=label)


def captions(label: int) -> list[str]:
    """NUM_EN_CAPTIONS English then NUM_ZH_CAPTIONS Chinese captions of digit `label`.

    Index 0 is `canonical_caption(label)`. The list depends only on the label: with a single
    attribute per image there is nothing to vary per example, and the training pipeline
    already samples one caption per step.
    """
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    en = [t.format(word=DIGIT_WORDS[label], numeral=label) for t in _EN_TEMPLATES]
    zh = [t.format(word=DIGIT_WORDS_ZH[label], numeral=label) for t in _ZH_TEMPLATES]
    return en + zh


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into the n examples, each sorted, disjoint, covering 0..n-1.

    A seeded random permutation rather than a contiguous block: sklearn's order is not
    random (it starts 0, 1, ..., 9, 0, 1, ...), so a block could differ from the rest in
    writers or class balance. The validation size is round(n * val_fraction); both splits
    must be non-empty, as tfds rejects an empty split. Sorting keeps each split in
    sklearn's order, so record i of a split maps monotonically to sklearn indices (the
    pipeline shuffles anyway).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    num_val = round(n * val_fraction)
    if not 0 < num_val < n:
        raise ValueError(f"{val_fraction=} of {n} examples leaves a split empty")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
