"""tensorflow-datasets builder for the built-in `shapes` dataset, and `ensure_built`.

Works without TensorFlow: images are PNG-encoded with PIL in `builtin_build.encode_png`
(tfds would otherwise encode numpy arrays with `tf.image.encode_png`), tfds serializes
examples with its own vendored `tf.train.Example` proto, and `as_data_source` decodes PNGs
with PIL (or OpenCV if present).

Every parameter that changes the content (image size, split sizes, dataset seed) is part of
the builder config *name*, and the code version is the builder VERSION, so a different
setting or a changed generator lands in a different directory and never reuses stale files.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data.builtin import common as builtin_build
from mmjax.data.builtin import shapes

# Shared with the other built-in datasets; re-exported because callers import them from here.
from mmjax.data.builtin.common import DATA_DIR_ENV, DEFAULT_DATA_DIR, encode_png, resolve_data_dir

__all__ = [
    "DATASET_NAME",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "MmjaxShapes",
    "ShapesConfig",
    "encode_png",
    "ensure_built",
    "make_config",
    "resolve_data_dir",
]

DATASET_NAME = "mmjax_shapes"


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    num_train: int = 20000
    num_val: int = 1000
    seed: int = 0


def make_config(*, image_size: int, num_train: int, num_val: int, seed: int) -> ShapesConfig:
    """A config whose name spells out every content parameter, e.g. `s64_t20000_v1000_seed0`."""
    for name, value in [("image_size", image_size), ("num_train", num_train)]:
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if num_val < 0 or seed < 0:
        raise ValueError(f"num_val and seed must be >= 0, got {num_val=} {seed=}")
    return ShapesConfig(
        name=f"s{image_size}_t{num_train}_v{num_val}_seed{seed}",
        description=f"{image_size}px, {num_train} train / {num_val} validation, seed {seed}",
        image_size=image_size,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
    )


class MmjaxShapes(builtin_build.IndexedSplitsBuilder):
    """Procedurally generated shapes with English and Chinese captions (see `shapes.py`)."""

    # Bump when `shapes.py` changes what is generated for a given config.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    # The default run's config, so `tfds.data_source("mmjax_shapes", data_dir=...)` finds it;
    # other settings pass `config=make_config(...)` (tfds logs "custom data configuration").
    BUILDER_CONFIGS: ClassVar[list[ShapesConfig]] = [
        make_config(image_size=64, num_train=20000, num_val=1000, seed=0)
    ]
    # tfds 4.9.10 finds a builder's source file through an `isinstance` check against
    # `importlib_resources`, a package it only requires on Python < 3.9, so on 3.11 preparing
    # any builder defined outside tfds fails with ModuleNotFoundError. Naming the file here
    # skips that lookup (it is only used to find an optional checksums.tsv next to it).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: ShapesConfig = self.builder_config
        s = cfg.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    # English captions first (index 0: full description), then Chinese.
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "shape": tfds.features.ClassLabel(names=shapes.SHAPES),
                    "color": tfds.features.ClassLabel(names=shapes.COLORS),
                    "size": tfds.features.ClassLabel(names=shapes.SIZES),
                    "position": tfds.features.ClassLabel(names=shapes.POSITIONS),
                    "heldout": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            supervised_keys=None,
            homepage="https://example.invalid/mmjax",  # generated locally; nothing to fetch
            # Keep generation order, so record i of a split is example i of `shapes.py`.
            disable_shuffling=True,
        )

    def _example(self, split: str, index: int) -> dict:
        cfg: ShapesConfig = self.builder_config
        image, caps, attrs = shapes.generate_example(
            split, index, image_size=cfg.image_size, seed=cfg.seed
        )
        return {
            "image": encode_png(image),
            "captions": caps,
            "shape": attrs.shape,
            "color": attrs.color,
            "size": attrs.size,
            "position": attrs.position,
            "heldout": attrs.heldout,
        }


def ensure_built(
    data_dir: str | None,
    *,
    image_size: int = 64,
    num_train: int = 20000,
    num_val: int = 1000,
    seed: int = 0,
) -> MmjaxShapes:
    """Returns the prepared builder, generating the dataset on first use (once, even when
    several processes call it at once: see `builtin_build.build_once`)."""
    data_dir = resolve_data_dir(data_dir)
    config = make_config(image_size=image_size, num_train=num_train, num_val=num_val, seed=seed)
    return builtin_build.build_once(
        lambda: builtin_build.builder_for(MmjaxShapes, data_dir, config), data_dir=data_dir
    )
