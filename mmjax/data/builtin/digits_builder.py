"""tensorflow-datasets builder for the built-in `digits` dataset, and `ensure_built`.

Same design as `shapes_builder`: no TensorFlow (PNG bytes from PIL, array_record files), every
content parameter (image size, validation fraction, split seed) in the builder config *name*
and the code version in VERSION, so a different setting never reuses stale files; building
happens once per setting, under a file lock (`builtin_build.build_once`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data.builtin import common as builtin_build
from mmjax.data.builtin import digits

DATASET_NAME = "mmjax_digits"


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0


def make_config(*, image_size: int, val_fraction: float, seed: int) -> DigitsConfig:
    """A config whose name spells out every content parameter, e.g. `s32_v0.2_seed0`."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0.0 < val_fraction < 1.0 or seed < 0:
        raise ValueError(f"need 0 < val_fraction < 1 and seed >= 0, got {val_fraction=} {seed=}")
    # `float` so 1 and 1.0 can't name two directories; repr is the shortest exact spelling
    # ("0.2", "0.125"), so two different fractions never share a name.
    fraction = repr(float(val_fraction))
    return DigitsConfig(
        name=f"s{image_size}_v{fraction}_seed{seed}",
        description=f"{image_size}px, {fraction} of the digits for validation, split seed {seed}",
        image_size=image_size,
        val_fraction=float(val_fraction),
        seed=seed,
    )


class MmjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits with English and Chinese captions (see `digits.py`)."""

    # Bump when `digits.py` changes what is written for a given config.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    # The default setting, so `tfds.data_source("mmjax_digits", data_dir=...)` finds it.
    BUILDER_CONFIGS: ClassVar[list[DigitsConfig]] = [
        make_config(image_size=32, val_fraction=0.2, seed=0)
    ]
    # Skips tfds 4.9.10's source-file lookup, which fails on Python >= 3.9 without the
    # `importlib_resources` package (see the same line in `shapes_builder`).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    # English captions first (index 0: canonical), then Chinese.
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "label": tfds.features.ClassLabel(names=digits.DIGIT_WORDS),
                    # Position in sklearn's arrays, to trace any record back to its source.
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            # Keep generation order, so record i of a split is its i-th (sorted) index.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships inside scikit-learn
        cfg: DigitsConfig = self.builder_config
        images, labels = digits.load_digits()
        train, validation = digits.split_indices(len(labels), cfg.val_fraction, cfg.seed)
        return {
            "train": self._generate_examples(train, images, labels),
            "validation": self._generate_examples(validation, images, labels),
        }

    def _generate_examples(
        self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        size = self.builder_config.image_size
        # Key = position in the split: with shuffling disabled tfds writes records in key
        # order, which is then the order of `indices`.
        for position, index in enumerate(indices.tolist()):
            label = int(labels[index])
            yield (
                position,
                {
                    "image": builtin_build.encode_png(digits.to_rgb(images[index], size)),
                    "captions": digits.captions(label),
                    "label": label,
                    "index": index,
                },
            )


def ensure_built(
    data_dir: str | None, *, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> MmjaxDigits:
    """Returns the prepared builder, generating the dataset on first use (once, even when
    several processes call it at once: see `builtin_build.build_once`)."""
    data_dir = builtin_build.resolve_data_dir(data_dir)
    config = make_config(image_size=image_size, val_fraction=val_fraction, seed=seed)
    return builtin_build.build_once(
        lambda: builtin_build.builder_for(MmjaxDigits, data_dir, config), data_dir=data_dir
    )
