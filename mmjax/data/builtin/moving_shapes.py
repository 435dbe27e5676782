"""The built-in `moving_shapes` video dataset: a coloured shape gliding across a dark canvas.

Every clip is a pure function of (dataset seed, split, index), like the `shapes` images, and
uses the same shape, colour and size vocabularies, drawing and held-out shape-colour pairs,
so image and video models trained on the two can be compared class for class.

One shape moves in a straight line at constant speed in one of 8 directions and stays fully
inside the frame; half of the clips add a still distractor of another colour that the moving
shape never touches. Direction is only visible across frames (any single frame is a still
image), so captions and questions about it test whether a video tower uses time at all, and
the distractor makes "the moving shape" a question about motion rather than presence.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from mmjax.data.builtin import shapes
from mmjax.data.builtin.shapes import COLORS, COLORS_ZH, SHAPES, SHAPES_ZH

# Index = class label. Unit steps (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
DIRECTION_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, -1), (-1, 1), (1, 1))
DIRECTION_PHRASES = (
    "to the left",
    "to the right",
    "up",
    "down",
    "up and to the left",
    "up and to the right",
    "down and to the left",
    "down and to the right",
)
DIRECTIONS_ZH = ("向左", "向右", "向上", "向下", "向左上", "向右上", "向左下", "向右下")

# Moving shapes are small or medium only: a large one leaves too little room to travel on a
# 32-pixel canvas for the motion to be clearly visible.
MOVING_SIZES = (0, 1)

SPLITS = shapes.SPLITS

# Answer vocabulary for classification-style QA: one class per attribute value, plus yes/no.
ANSWERS = (*DIRECTIONS, *COLORS, *SHAPES, "yes", "no")


class MotionAttributes(NamedTuple):
    """Class indices of one clip; the distractor fields are -1 when there is no distractor."""

    shape: int
    color: int
    size: int
    direction: int
    distractor_shape: int
    distractor_color: int

    @property
    def heldout(self) -> bool:
        return (self.shape, self.color) in shapes.HELDOUT_PAIRS

    @property
    def has_distractor(self) -> bool:
        return self.distractor_shape >= 0


def _sample_motion(split: str, index: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(shape, colour, direction) of clip `index`.

    train: uniform over the shape-colour pairs that `shapes` does not hold out.
    validation: cycles through all shape × colour × direction compositions (direction fastest,
    so any 8 consecutive clips show all 8 directions), held-out pairs included.
    """
    num_dirs = len(DIRECTIONS)
    if split == "train":
        while True:
            shape, color = divmod(int(rng.integers(len(SHAPES) * len(COLORS))), len(COLORS))
            if (shape, color) not in shapes.HELDOUT_PAIRS:
                break
        direction = int(rng.integers(num_dirs))
    elif split == "validation":
        pair, direction = divmod(index % (len(SHAPES) * len(COLORS) * num_dirs), num_dirs)
        shape, color = divmod(pair, len(COLORS))
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return shape, color, direction


def _radius(shape: int, size: int, image_size: int, rng: np.random.Generator) -> float:
    # The same equal-area radii as the still images, with the same +-8% jitter.
    radius = shapes.SIZE_RADIUS[size] * shapes.SHAPE_SCALE[shape] * image_size
    return float(radius * rng.uniform(0.92, 1.08))


def _mask(shape: int, center: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage [S, S] in [0, 1] of one shape at a sub-pixel centre (x, y).

    shapes._shape_mask places a shape in a grid cell; a moving shape needs an arbitrary centre,
    so only its polygon outlines and supersampling factor are reused.
    """
    ss = shapes._SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    c, r = center * ss, radius * ss
    if SHAPES[shape] == "circle":
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)
    else:
        points = shapes._polygon(SHAPES[shape], r, angle) + c
        draw.polygon([tuple(q) for q in points.tolist()], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark tinted gradient with coarse mottling, float32 [S, S, 3], fixed over the clip.

    A still background means every frame-to-frame change is the moving shape.
    """
    base = (rng.uniform(15, 55) + rng.uniform(-8, 8, size=3)).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gy, gx = rng.uniform(-10, 10, size=2).astype(np.float32)
    coarse = rng.standard_normal(size=(max(2, size // 8),) * 2, dtype=np.float32) * 6.0
    mottle = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    return base + (gy * ramp)[:, None, None] + (gx * ramp)[None, :, None] + mottle[:, :, None]


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment a-b."""
    ab = b - a
    u = np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + u * ab)))


def generate_clip(
    split: str, index: int, *, num_frames: int = 8, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, list[str], MotionAttributes]:
    """(frames uint8 [F, S, S, 3], captions, attributes) of clip `index` of `split`.

    The shape's centre moves by the same (sub-pixel) step every frame, in its direction, from
    a random start chosen so that the whole path stays inside the frame with a 1-pixel margin.
    """
    if num_frames < 2:
        raise ValueError(f"a moving shape needs num_frames >= 2, got {num_frames}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for shapes to move visibly, got {image_size}")
    s = image_size
    rng = shapes.example_rng(seed, split, index)
    shape, color, direction = _sample_motion(split, index, rng)
    size = int(rng.choice(MOVING_SIZES))
    radius = _radius(shape, size, s, rng)
    lo, hi = radius + 1, s - radius - 1  # range of centres that keep the shape on the canvas
    unit = np.array(DIRECTION_STEPS[direction], np.float64)
    unit /= np.linalg.norm(unit)
    # Travel 60-100% of the longest path that fits, so speed varies but motion is always clear.
    longest = (hi - lo) / np.abs(unit).max()
    step = unit * rng.uniform(0.6, 1.0) * longest / (num_frames - 1)
    extent = step * (num_frames - 1)
    start = np.array(
        [rng.uniform(lo - min(e, 0.0), hi - max(e, 0.0)) for e in extent], dtype=np.float64
    )
    centers = start[None] + np.arange(num_frames)[:, None] * step[None]
    angle = np.deg2rad(rng.uniform(-15, 15))  # fixed over the clip: the shape slides, not spins

    background = _background(s, rng)
    # Colour jitter as in `shapes`: constant over the clip, since it is one object.
    rgb = shapes.COLOR_RGB[color] * rng.uniform(0.85, 1.05) + rng.uniform(-12, 12, size=3)
    still = background
    d_shape = d_color = -1
    if rng.uniform() < 0.5:
        d_shape = int(rng.integers(len(SHAPES)))
        d_color = int((color + rng.integers(1, len(COLORS))) % len(COLORS))  # never the same
        d_radius = _radius(d_shape, int(rng.integers(2)), s, rng)
        d_angle = np.deg2rad(rng.uniform(-15, 15))
        d_rgb = shapes.COLOR_RGB[d_color] * rng.uniform(0.85, 1.05) + rng.uniform(-12, 12, size=3)
        # Rejection-sample a spot off the moving shape's path (circumradii + 1 px apart), so
        # the two never overlap; a clip where none is found after a few tries has no distractor.
        for _ in range(20):
            d_center = rng.uniform(d_radius + 1, s - d_radius - 1, size=2)
            if _segment_distance(d_center, centers[0], centers[-1]) > radius + d_radius + 1:
                d_mask = _mask(d_shape, d_center, d_radius, d_angle, s)[:, :, None]
                still = background + d_mask * (d_rgb.astype(np.float32) - background)
                break
        else:
            d_shape = d_color = -1
    frames = np.empty((num_frames, s, s, 3), np.uint8)
    for i, center in enumerate(centers):
        m = _mask(shape, center, radius, angle, s)[:, :, None]
        frame = still + m * (rgb.astype(np.float32) - still)
        frames[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    attrs = MotionAttributes(shape, color, size, direction, d_shape, d_color)
    return frames, captions(attrs, rng), attrs


# --- Captions ------------------------------------------------------------------------------

# As in `shapes`, caption groups name different attribute subsets: a direction-only caption
# ("something moving to the left") can only be matched by a tower that sees motion, and a
# shape-only one only by one that sees shape. Group 0 template 0 is the canonical caption.
_EN_GROUPS = (
    ("{a_color_shape} moving {dir}", "{a_color_shape} that moves {dir}"),
    ("{a_shape} moving {dir}", "{a_shape} sliding {dir}", "a moving {shape} heading {dir}"),
    ("something moving {dir}", "an object moving {dir}", "motion {dir}"),
    ("{a_color} thing moving {dir}", "something {color} drifting {dir}"),
    ("{a_color_shape} in motion", "a moving {color} {shape}"),
)
_ZH_GROUPS = (
    ("一个{dir}移动的{color}{shape}", "{color}{shape}{dir}移动"),
    ("一个{dir}移动的{shape}", "{shape}正在{dir}移动"),
    ("有东西在{dir}移动", "一个物体{dir}移动"),
)
NUM_EN_CAPTIONS = len(_EN_GROUPS)
NUM_ZH_CAPTIONS = len(_ZH_GROUPS)


def canonical_caption(attrs: MotionAttributes) -> str:
    """e.g. "a red circle moving to the left"."""
    return _EN_GROUPS[0][0].format(**_english_fields(attrs))


def _english_fields(attrs: MotionAttributes) -> dict[str, str]:
    shape, color = SHAPES[attrs.shape], COLORS[attrs.color]
    return dict(
        shape=shape,
        color=color,
        dir=DIRECTION_PHRASES[attrs.direction],
        a_shape=shapes._a(shape),
        a_color=shapes._a(color),
        a_color_shape=shapes._a(f"{color} {shape}"),
    )


def captions(attrs: MotionAttributes, rng: np.random.Generator) -> list[str]:
    """NUM_EN_CAPTIONS English then NUM_ZH_CAPTIONS Chinese captions; the first is canonical."""
    en = _english_fields(attrs)
    zh = dict(
        shape=SHAPES_ZH[attrs.shape],
        color=COLORS_ZH[attrs.color],
        dir=DIRECTIONS_ZH[attrs.direction],
    )
    out = [canonical_caption(attrs)]
    out += [group[rng.integers(len(group))].format(**en) for group in _EN_GROUPS[1:]]
    out += [group[rng.integers(len(group))].format(**zh) for group in _ZH_GROUPS]
    return out


# --- Question answering --------------------------------------------------------------------


def video_qa(attrs: MotionAttributes, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Questions about one clip with answers from ANSWERS.

    Always asks the moving shape's direction (referred to by colour or by shape), colour and
    shape, and a yes/no direction question (true or a random wrong direction, 50/50); with a
    distractor also the still shape's colour and shape, and whether it moves (always "no").
    Every answer is determined by the pixels: the distractor never shares the mover's colour.
    """
    shape, color = SHAPES[attrs.shape], COLORS[attrs.color]
    direction = DIRECTIONS[attrs.direction]
    ref = f"the {color} shape" if rng.uniform() < 0.5 else f"the {shape}"
    if attrs.has_distractor and attrs.distractor_shape == attrs.shape:
        ref = f"the {color} shape"  # "the circle" would be ambiguous with two circles
    ask_color = ("what colour is the moving shape?", "what color is the shape that moves?")
    ask_shape = ("what shape is moving?", "which shape is in motion?")
    qa = [
        (f"which way is {ref} moving?", direction),
        (ask_color[rng.integers(2)], color),
        (ask_shape[rng.integers(2)], shape),
    ]
    asked = attrs.direction
    if rng.uniform() < 0.5:
        asked = int((attrs.direction + rng.integers(1, len(DIRECTIONS))) % len(DIRECTIONS))
    qa.append(
        (
            f"is the moving shape going {DIRECTION_PHRASES[asked]}?",
            "yes" if asked == attrs.direction else "no",
        )
    )
    if attrs.has_distractor:
        d_shape, d_color = SHAPES[attrs.distractor_shape], COLORS[attrs.distractor_color]
        qa += [
            ("what colour is the shape that is standing still?", d_color),
            ("what shape is not moving?", d_shape),
            (f"is the {d_color} {d_shape} moving?", "no"),
        ]
    return qa
