"""The built-in `shapes` dataset: one coloured shape on a dark background, with captions.

Every example is a pure function of (dataset seed, split, index), so the dataset can be
regenerated bit for bit anywhere, in any order, by any number of workers.

Why several caption *kinds*: a contrastive model that only ever sees full descriptions
("a large red triangle in the top left") can match images to text by colour and position
alone, which are the easiest cues, and never learn shape. Captions that name only the shape
("a triangle"), or only shape and position, make shape the sole way to pick the right image
among the negatives, so the model has to learn it. The same holds for size and colour.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# --- Attribute vocabularies (index = class label) -----------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
SHAPES_ZH = ("圆形", "正方形", "三角形", "星形", "六边形", "十字形")
# Circumradius multipliers that give every shape the same area (about 2.2 r^2), so a size
# class means the same amount of ink whatever the shape; otherwise a "large triangle" would
# be smaller than a "medium circle" and size would be confounded with shape.
SHAPE_SCALE = (0.84, 1.05, 1.3, 1.29, 0.92, 1.04)

# Saturated hues spread around the colour wheel plus white, all far from the dark background
# and from each other (no pink next to red, no grey next to white).
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
COLORS_ZH = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色", "青色", "白色")
COLOR_RGB = np.array(
    [
        (220, 35, 35),
        (40, 175, 55),
        (45, 85, 235),
        (240, 220, 35),
        (150, 55, 205),
        (245, 135, 25),
        (35, 210, 220),
        (240, 240, 240),
    ],
    dtype=np.float32,
)

SIZES = ("small", "medium", "large")
SIZES_ZH = ("小", "中等大小", "大")
# Radius as a fraction of the image side. Neighbouring classes differ by ~1.4x and the
# per-example jitter is +-8%, so the classes never overlap; "small" stays big enough (about
# 11 px across at 64 px) for its shape to be recognisable.
SIZE_RADIUS = (0.085, 0.12, 0.165)

# A 3x3 grid, row-major: index = 3 * row + col.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = (
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
)
POSITIONS_ZH = ("左上方", "上方", "右上方", "左侧", "中间", "右侧", "左下方", "下方", "右下方")

# Held-out compositions, never in the train split: colour c is held out with shape
# c mod len(SHAPES). This "diagonal" rule holds out every colour exactly once and every shape
# at least once (8 pairs for 6x8), so each attribute value is seen in training, but some of
# its combinations are only seen at evaluation: the model must compose shape and colour.
HELDOUT_PAIRS = frozenset((c % len(SHAPES), c) for c in range(len(COLORS)))

NUM_EN_CAPTIONS = 6
NUM_ZH_CAPTIONS = 3

# Zero-shot evaluation prompts. Training captions never use these phrasings, so zero-shot
# accuracy measures transfer to unseen wording rather than template recall.
ZEROSHOT = {
    "shape": (
        SHAPES,
        (
            "a photo of a {}.",
            "an image of a {} shape.",
            "a {} object.",
            "a drawing of a {}.",
            "a picture showing a {}.",
        ),
    ),
    "color": (
        COLORS,
        (
            "a photo of something {}.",
            "an image of a {} shape.",
            "a {} object.",
            "a drawing in {}.",
            "the colour {}.",
        ),
    ),
}

# Paraphrased prompts: synonyms for every class name and reordered sentences, none of whose
# words name a class in training captions. They test whether a text tower brings language
# knowledge of its own (LiT with a pretrained tower) or only learned the training vocabulary.
ZEROSHOT_PARAPHRASE = {
    "shape": (
        (
            "round disk",
            "four-sided box",
            "three-cornered figure",
            "five-pointed asterisk",
            "six-sided polygon",
            "plus sign",
        ),
        ("this picture contains a {}.", "what you see here is a {}.", "there is a {} in it."),
    ),
    "color": (
        ("scarlet", "emerald", "azure", "golden", "violet", "tangerine", "turquoise", "snowy"),
        ("something coloured {} is shown.", "the thing here is {}.", "its colour is {}."),
    ),
}

SPLITS = ("train", "validation")


class Attributes(NamedTuple):
    """Class indices of one example."""

    shape: int
    color: int
    size: int
    position: int

    @property
    def heldout(self) -> bool:
        return (self.shape, self.color) in HELDOUT_PAIRS


# --- Sampling ------------------------------------------------------------------------------


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one example: independent of generation order and worker count."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_attributes(split: str, index: int, rng: np.random.Generator) -> Attributes:
    """Attributes of example `index` of `split`.

    train: uniform over compositions that are not held out (resampled until allowed).
    validation: shape and colour cycle through all compositions, so every composition,
    held-out ones included, appears equally often; size and position are uniform.
    """
    num_pairs = len(SHAPES) * len(COLORS)
    if split == "train":
        while True:
            shape, color = divmod(int(rng.integers(num_pairs)), len(COLORS))
            if (shape, color) not in HELDOUT_PAIRS:
                break
    elif split == "validation":
        shape, color = divmod(index % num_pairs, len(COLORS))
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    size = int(rng.integers(len(SIZES)))
    position = int(rng.integers(len(POSITIONS)))
    return Attributes(shape, color, size, position)


# --- Rendering -----------------------------------------------------------------------------

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap, clean anti-aliasing.


def _polygon(shape: str, radius: float, angle: float) -> np.ndarray:
    """Vertices [k, 2] of a shape centred at the origin with the given circumradius."""
    if shape == "square":
        angles, radii = np.pi / 4 + np.arange(4) * np.pi / 2, np.ones(4)
    elif shape == "triangle":
        # Point up (image y grows downwards); recentred below.
        angles, radii = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, np.ones(3)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    elif shape == "hexagon":
        angles, radii = np.arange(6) * np.pi / 3, np.ones(6)
    elif shape == "cross":
        # A plus sign with arms of half-width w: 12 vertices, listed as (x, y) in units of r.
        # Its right half, then the same points mirrored (x -> -x) in reverse order.
        w = 0.34
        half = np.array([(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1)])
        xy = np.concatenate([half, half[::-1] * np.array([-1, 1])])
        angles, radii = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(xy[:, 0], xy[:, 1])
        radii = radii / radii.max()
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    angles = angles + angle
    points = (radius * radii)[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    if shape == "triangle":
        # Centre the bounding box rather than the circumcentre, else it looks too high.
        points[:, 1] += 0.25 * radius
    return points


def _shape_mask(attrs: Attributes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 [S, S]."""
    radius = SIZE_RADIUS[attrs.size] * SHAPE_SCALE[attrs.shape] * image_size
    radius *= rng.uniform(0.92, 1.08)
    row, col = divmod(attrs.position, 3)
    cell = image_size / 3
    center = np.array([(col + 0.5) * cell, (row + 0.5) * cell])
    center += rng.uniform(-0.12, 0.12, size=2) * cell  # jitter, but stay inside the cell
    # Keep the whole shape on the canvas, even a large one in a corner.
    center = np.clip(center, radius + 1, image_size - radius - 1)
    # Small rotation only: a square turned 45 degrees would read as a diamond.
    angle = np.deg2rad(rng.uniform(-15, 15))

    big = image_size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    c = center * _SUPERSAMPLE
    r = radius * _SUPERSAMPLE
    name = SHAPES[attrs.shape]
    if name == "circle":
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
    else:
        points = _polygon(name, r, angle) + c
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(attrs: Attributes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one example: uint8 [S, S, 3].

    The background is a dark, slightly tinted grey with a gentle gradient and a mottled
    texture, and the shape colour is jittered a little, so no two images are identical and
    the model cannot key on exact pixel values.
    """
    return render_scene([attrs], image_size, rng)


def render_scene(
    objects: list[Attributes], image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws `objects` (in order, later ones on top) on one background: uint8 [S, S, 3].
    One object draws exactly what `render` does (the generator is used in the same order)."""
    s = image_size
    base = (rng.uniform(15, 55) + rng.uniform(-8, 8, size=3)).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
    gy, gx = rng.uniform(-10, 10, size=2).astype(np.float32)
    gradient = (gy * ramp)[:, None, None] + (gx * ramp)[None, :, None]
    image = base + gradient
    for attrs in objects:
        color = COLOR_RGB[attrs.color] * rng.uniform(0.85, 1.05) + rng.uniform(-12, 12, size=3)
        mask = _shape_mask(attrs, s, rng)[:, :, None]
        # Blend towards the shape colour by the anti-aliased coverage.
        image = image + mask * (color.astype(np.float32) - image)
    # Mottled lighting: coarse luminance noise, bilinearly upsampled. Smooth noise keeps PNGs
    # small (~3 KB at 64 px versus ~8 KB with per-pixel noise) and fast to encode.
    coarse = rng.standard_normal(size=(max(2, s // 8),) * 2, dtype=np.float32) * 6.0
    mottle = Image.fromarray(coarse).resize((s, s), Image.Resampling.BILINEAR)
    image += np.asarray(mottle)[:, :, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- Captions ------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """Prefixes the right English indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# Each group names a different subset of attributes; one template per group is drawn for
# every example. Keys: shape, color, size, pos (a phrase such as "in the top left corner").
_EN_GROUPS = (
    # 0: full description (group 0 template 0 is the canonical caption used for evaluation).
    ("{a_size_color_shape} {pos}", "{pos_cap}, {a_size_color_shape}"),
    # 1: colour + shape
    ("{a_color_shape}", "a single {color} {shape}", "{color} {shape} on a dark background"),
    # 2: shape only: the caption that forces the image tower to see shape
    ("{a_shape}", "one {shape}", "a lone {shape} on a plain background", "{shape}"),
    # 3: shape + position
    ("{a_shape} {pos}", "{pos_cap} there is {a_shape}"),
    # 4: size + shape
    ("{a_size_shape}", "the {shape} is {size}"),
    # 5: colour + position, no shape
    ("something {color} {pos}", "{a_color} thing {pos}", "{a_color} blob {pos}"),
)
_ZH_GROUPS = (
    ("{pos}有一个{size}的{color}{shape}", "一个{size}的{color}{shape}，位于{pos}"),
    ("一个{color}的{shape}", "{color}{shape}"),
    ("一个{shape}", "{pos}有一个{shape}", "图中有一个{shape}"),
)
assert len(_EN_GROUPS) == NUM_EN_CAPTIONS and len(_ZH_GROUPS) == NUM_ZH_CAPTIONS


def canonical_caption(attrs: Attributes, language: str = "en") -> str:
    """The full description, e.g. "a large red triangle in the top left corner"; language
    "zh": the first template of the Chinese full description (caption index NUM_EN_CAPTIONS's
    group), e.g. "左上角有一个大的红色三角形"."""
    if language == "zh":
        return _ZH_GROUPS[0][0].format(**_chinese_fields(attrs))
    if language != "en":
        raise ValueError(f"language={language!r}: en or zh")
    return _EN_GROUPS[0][0].format(**_english_fields(attrs))


def _chinese_fields(attrs: Attributes) -> dict[str, str]:
    return dict(
        shape=SHAPES_ZH[attrs.shape],
        color=COLORS_ZH[attrs.color],
        size=SIZES_ZH[attrs.size],
        pos=POSITIONS_ZH[attrs.position],
    )


def _english_fields(attrs: Attributes) -> dict[str, str]:
    shape, color, size = SHAPES[attrs.shape], COLORS[attrs.color], SIZES[attrs.size]
    pos = POSITION_PHRASES[attrs.position]
    return dict(
        shape=shape,
        color=color,
        size=size,
        pos=pos,
        pos_cap=pos[0].upper() + pos[1:],
        a_shape=_a(shape),
        a_color=_a(color),
        a_color_shape=_a(f"{color} {shape}"),
        a_size_shape=_a(f"{size} {shape}"),
        a_size_color_shape=_a(f"{size} {color} {shape}"),
    )


def captions(attrs: Attributes, rng: np.random.Generator) -> list[str]:
    """NUM_EN_CAPTIONS English then NUM_ZH_CAPTIONS Chinese captions; the first is canonical."""
    en, zh = _english_fields(attrs), _chinese_fields(attrs)
    out = [canonical_caption(attrs)]
    for group in _EN_GROUPS[1:]:
        out.append(group[rng.integers(len(group))].format(**en))
    for group in _ZH_GROUPS:
        out.append(group[rng.integers(len(group))].format(**zh))
    return out


def generate_example(
    split: str, index: int, *, image_size: int, seed: int
) -> tuple[np.ndarray, list[str], Attributes]:
    """(image uint8 [S, S, 3], captions, attributes) of example `index` of `split`."""
    rng = example_rng(seed, split, index)
    attrs = sample_attributes(split, index, rng)
    image = render(attrs, image_size, rng)
    return image, captions(attrs, rng), attrs
