"""Built-in labelled image+text datasets, generated in memory from the shapes renderer.

  shapes_mmc  multimodal classification: the text names the shape (English or Chinese), the
              image shows it in some colour; the label is the (shape, colour) pair, so neither
              modality alone can reach more than 1/8 (text) or 1/6 (image) of the classes.
  shapes_vqa  VQA as answer classification: two objects, one in the left and one in the right
              column, and a generated question about them ("what color is the shape on the
              left?", "is there a red shape?", "how many blue shapes are there?", ...).

Every example is a function of (seed, split, index) only, so a split is the same whatever
order or number of processes generates it. Splits are cached per process (`load`).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np

from mmjax.data import sources
from mmjax.data.builtin import shapes
from mmjax.data.builtin.shapes import COLORS, SHAPES, SHAPES_ZH, Attributes

DATASETS = ("shapes_mmc", "shapes_vqa")


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """A split of (image, text, label) examples; `groups` says which kind of text each example
    has (language, question type), named by `group_names`. A grain source: len + getitem."""

    images: np.ndarray  # uint8 [n, S, S, 3]
    texts: tuple[str, ...]
    labels: np.ndarray  # int32 [n], indices into `classes`
    groups: np.ndarray  # int32 [n], indices into `group_names`
    classes: tuple[str, ...]
    group_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.texts[i], "label": self.labels[i]}


def _rng(seed: int, name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DATASETS.index(name), shapes.SPLITS.index(split), index])


# --- shapes_mmc ----------------------------------------------------------------------------

_MMC_TEXTS = (
    ("a {shape}", "the object is a {shape}", "there is one {shape} in the picture"),
    ("一个{shape}", "图中有一个{shape}"),
)
MMC_CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)


def _mmc_example(split: str, index: int, size: int, seed: int):
    rng = _rng(seed, "shapes_mmc", split, index)
    shape, color = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLORS)))
    attrs = Attributes(shape, color, int(rng.integers(3)), int(rng.integers(9)))
    language = int(rng.random() < 0.25)  # a quarter of the texts are Chinese
    templates = _MMC_TEXTS[language]
    name = (SHAPES, SHAPES_ZH)[language][shape]
    text = templates[rng.integers(len(templates))].format(shape=name)
    return shapes.render(attrs, size, rng), text, shape * len(COLORS) + color, language


# --- shapes_vqa ----------------------------------------------------------------------------

VQA_ANSWERS = (*COLORS, *SHAPES, "yes", "no", "0", "1", "2", "left", "right")
VQA_QUESTIONS = (
    "color_left",
    "color_right",
    "shape_left",
    "shape_right",
    "exists_color",
    "count_color",
    "side_of_shape",
)
_LEFT_CELLS, _RIGHT_CELLS = (0, 3, 6), (2, 5, 8)  # the 3x3 grid's left and right columns


def _vqa_question(kind: int, left: Attributes, right: Attributes, rng) -> tuple[str, str]:
    q = VQA_QUESTIONS[kind]
    if q in ("color_left", "color_right"):
        obj, side = (left, "left") if q == "color_left" else (right, "right")
        return f"what color is the shape on the {side}?", COLORS[obj.color]
    if q in ("shape_left", "shape_right"):
        obj, side = (left, "left") if q == "shape_left" else (right, "right")
        return f"what shape is on the {side}?", SHAPES[obj.shape]
    present = {left.color, right.color}
    if q == "exists_color":
        # Half the questions ask about a colour in the picture, so "yes" is not a free 50%.
        if rng.random() < 0.5:
            color = (left.color, right.color)[rng.integers(2)]
        else:
            color = int(rng.choice([c for c in range(len(COLORS)) if c not in present]))
        return f"is there a {COLORS[color]} shape?", "yes" if color in present else "no"
    if q == "count_color":
        pool = [left.color, right.color, int(rng.integers(len(COLORS)))]
        color = pool[rng.integers(3)]
        count = (left.color == color) + (right.color == color)
        return f"how many {COLORS[color]} shapes are there?", str(count)
    obj, side = (left, "left") if rng.random() < 0.5 else (right, "right")
    return f"which side is the {SHAPES[obj.shape]} on?", side


def _vqa_example(split: str, index: int, size: int, seed: int):
    rng = _rng(seed, "shapes_vqa", split, index)
    left_shape, right_shape = rng.choice(len(SHAPES), size=2, replace=False)  # distinct shapes
    objects = []
    for shape, cells in ((left_shape, _LEFT_CELLS), (right_shape, _RIGHT_CELLS)):
        # The objects are two columns apart, so even two large ones never overlap.
        attrs = Attributes(
            int(shape),
            int(rng.integers(len(COLORS))),
            int(rng.integers(len(shapes.SIZES))),
            int(cells[rng.integers(3)]),
        )
        objects.append(attrs)
    kind = int(rng.integers(len(VQA_QUESTIONS)))
    question, answer = _vqa_question(kind, *objects, rng)
    return shapes.render_scene(objects, size, rng), question, VQA_ANSWERS.index(answer), kind


_GENERATORS = {
    "shapes_mmc": (_mmc_example, MMC_CLASSES, ("english", "chinese")),
    "shapes_vqa": (_vqa_example, VQA_ANSWERS, VQA_QUESTIONS),
}


@functools.lru_cache(maxsize=8)
def load(name: str, split: str, num: int, image_size: int, seed: int) -> LabelledSplit:
    """The first `num` examples of `split` of the built-in dataset `name`."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown labelled dataset {name!r}; use one of {', '.join(DATASETS)}")
    generate, classes, group_names = _GENERATORS[name]
    images, texts, labels, groups = zip(
        *(generate(split, i, image_size, seed) for i in range(num)), strict=True
    )
    return LabelledSplit(
        images=np.stack(images),
        texts=tuple(texts),
        labels=np.array(labels, np.int32),
        groups=np.array(groups, np.int32),
        classes=classes,
        group_names=group_names,
    )


def split_of(data_cfg: ml_collections.ConfigDict, split: str) -> LabelledSplit:
    """The split of `data.name` a run reads."""
    num = sources.split_size(data_cfg, split)
    return load(data_cfg.name, split, num, data_cfg.image_size, data_cfg.dataset_seed)


def prior_accuracy(train: LabelledSplit, evaluated: LabelledSplit) -> float:
    """Accuracy of a blind baseline that answers every example with the most frequent training
    label of its group (question type / language): what text priors alone achieve."""
    correct = 0
    for g in range(len(train.group_names)):
        in_group = evaluated.groups == g
        if not in_group.any():
            continue
        train_labels = train.labels[train.groups == g]
        guess = np.bincount(train_labels).argmax() if len(train_labels) else 0
        correct += int(np.sum(evaluated.labels[in_group] == guess))
    return correct / len(evaluated)
