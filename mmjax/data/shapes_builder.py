"""tensorflow-datasets builder for the built-in `shapes` dataset, and `ensure_built`.

Works without TensorFlow: images are PNG-encoded here with PIL (tfds would otherwise encode
numpy arrays with `tf.image.encode_png`), tfds serializes examples with its own vendored
`tf.train.Example` proto, and `as_data_source` decodes PNGs with PIL (or OpenCV if present).

Every parameter that changes the content (image size, split sizes, dataset seed) is part of
the builder config *name*, and the code version is the builder VERSION, so a different
setting or a changed generator lands in a different directory and never reuses stale files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mmjax.data import shapes

DATASET_NAME = "mmjax_shapes"
DEFAULT_DATA_DIR = "~/.cache/mmjax/tensorflow_datasets"
DATA_DIR_ENV = "MMJAX_DATA_DIR"


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


def encode_png(image: np.ndarray) -> bytes:
    # compress_level=1: measured 0.25 ms and 3.3 KB per 64 px image, against 0.69 ms and
    # 2.6 KB at PIL's default 6; encoding would otherwise dominate generation time.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class MmjaxShapes(tfds.core.GeneratorBasedBuilder):
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

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg: ShapesConfig = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_val),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        cfg: ShapesConfig = self.builder_config
        for index in range(count):
            image, caps, attrs = shapes.generate_example(
                split, index, image_size=cfg.image_size, seed=cfg.seed
            )
            yield (
                index,
                {
                    "image": encode_png(image),
                    "captions": caps,
                    "shape": attrs.shape,
                    "color": attrs.color,
                    "size": attrs.size,
                    "position": attrs.position,
                    "heldout": attrs.heldout,
                },
            )


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $MMJAX_DATA_DIR, else ~/.cache/mmjax/tensorflow_datasets."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(data_dir))


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes on one machine build only once."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_builder(data_dir: str, config: ShapesConfig) -> MmjaxShapes:
    # tfds refuses a custom config object that shares a name with a BUILDER_CONFIGS entry,
    # so the default setting is selected by name.
    known = {c.name for c in MmjaxShapes.BUILDER_CONFIGS}
    selected = config.name if config.name in known else config
    return MmjaxShapes(data_dir=data_dir, config=selected, file_format="array_record")


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    """Hides tfds' expected warnings ("Using custom data configuration" on every open of a
    non-default setting, "Variant folder ... has no dataset_info.json" before a build)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def ensure_built(
    data_dir: str | None,
    *,
    image_size: int = 64,
    num_train: int = 20000,
    num_val: int = 1000,
    seed: int = 0,
) -> MmjaxShapes:
    """Returns the prepared builder, generating the dataset on first use.

    Safe when several processes call it at once (e.g. one per host process on a machine):
    the first takes a file lock and builds, the others wait and then reuse its files. tfds
    itself writes into a temporary directory and renames it when complete, so a prepared
    directory is never partial, even after a crash.
    """
    data_dir = resolve_data_dir(data_dir)
    config = make_config(image_size=image_size, num_train=num_train, num_val=num_val, seed=seed)
    with _absl_errors_only():
        return _build_once(data_dir, config)


def _build_once(data_dir: str, config: ShapesConfig) -> MmjaxShapes:
    builder = _open_builder(data_dir, config)
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with _file_lock(os.path.join(data_dir, f"{DATASET_NAME}.{config.name}.lock")):
        # A fresh builder: another process may have finished while we waited for the lock.
        builder = _open_builder(data_dir, config)
        if builder.is_prepared():
            return builder
        start = time.perf_counter()
        # tfds prints progress bars and several lines; we print one line instead, and replay
        # tfds' output only if the build fails.
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        try_download_gcs=False,  # offline: never ask GCS for a local dataset
                        compute_stats=tfds.download.ComputeStatsMode.SKIP,
                    )
                )
        except BaseException:
            sys.stderr.write(log.getvalue())
            raise
        seconds = time.perf_counter() - start
        print(
            f"mmjax: built {DATASET_NAME}/{config.name} ({config.num_train} train + "
            f"{config.num_val} validation) in {seconds:.1f}s at {builder.data_dir}"
        )
    # Reopen so the builder reads the dataset info that was just written.
    return _open_builder(data_dir, config)
