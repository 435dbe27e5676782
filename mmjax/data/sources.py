"""Random-access data sources by name: the built-in datasets, folders built with
`python -m mmjax.data.build`, and the tensorflow-datasets catalog.

Every source yields examples in one format, whatever the dataset:

    {"image": encoded bytes or uint8 [H, W, 3], "captions": list[str] (maybe empty),
     "label": int (classification sets only), ...other scalar fields of the dataset}

and carries a `SourceInfo` with its class names. Names are resolved in this order:

1. `shapes`, `digits`: generated locally on first use (no download, no TensorFlow);
2. a dataset already prepared under the data dir (`<data_dir>/<name>[/<config>]/<version>`,
   ArrayRecord): read with `tfds.builder_from_directory`, so neither the builder code nor
   TensorFlow is needed, e.g. a folder built by `mmjax.data.build` or a catalog dataset
   prepared elsewhere;
3. the tfds catalog (`coco_captions`, `cifar10`, `imagenet2012`, ...) through
   `tfds.data_source`. Preparing a catalog dataset (download + conversion) needs TensorFlow:
   the error says how (`pip install -e '.[tf]'` and `tfds build`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from mmjax.data.builtin import common as builtin_build
from mmjax.errors import DataError, NotPreparedError

BUILTIN = ("shapes", "digits")


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    name: str
    split: str
    num_examples: int
    class_names: tuple[str, ...] | None  # label i is class_names[i]; None without labels
    has_captions: bool


class Source:
    """A random-access sequence of examples in the common format (see the module doc)."""

    def __init__(self, raw, info: SourceInfo):
        self._raw = raw
        self.info = info

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _standardize(self._raw[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [_standardize(ex) for ex in self._raw.__getitems__(list(indices))]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _standardize(example: dict[str, Any]) -> dict[str, Any]:
    out = dict(example)
    captions = example.get("captions", ())
    if isinstance(captions, dict):  # coco_captions: Sequence({"id", "text"})
        captions = captions["text"]
    out["captions"] = [_text(c) for c in captions]
    if "label" in example:
        out["label"] = int(example["label"])
    return out


def _class_names(features) -> tuple[str, ...] | None:
    label = features["label"] if "label" in features else None
    if isinstance(label, tfds.features.ClassLabel):
        return tuple(label.names)
    return None


def _builtin_builder(name: str, data_cfg: ml_collections.ConfigDict):
    # Imported here: each builtin module imports this package's builder helpers.
    if name == "shapes":
        from mmjax.data.builtin import shapes_builder

        return shapes_builder.ensure_built(
            data_cfg.data_dir or None,
            image_size=data_cfg.image_size,
            num_train=data_cfg.num_train,
            num_val=data_cfg.num_val,
            seed=data_cfg.dataset_seed,
        )
    from mmjax.data.builtin import digits_builder

    return digits_builder.ensure_built(
        data_cfg.data_dir or None, image_size=data_cfg.image_size, seed=data_cfg.dataset_seed
    )


def _version_key(path: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in os.path.basename(path).split("."))
    except ValueError:
        return (-1,)


def prepared_dir(data_dir: str, name: str) -> str | None:
    """The newest prepared version directory of `name` ("ds", "ds/config", "ds:1.2.0",
    "ds/config:1.2.0") under `data_dir`, or None."""
    name, _, version = name.partition(":")
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        return None
    infos = glob.glob(os.path.join(root, "*", "dataset_info.json"))
    if not infos:  # a config level between the name and the version
        infos = glob.glob(os.path.join(root, "*", "*", "dataset_info.json"))
    dirs = [os.path.dirname(p) for p in infos]
    if version:
        dirs = [d for d in dirs if os.path.basename(d) == version]
    return max(dirs, key=_version_key) if dirs else None


def _catalog_builder(name: str, data_dir: str):
    """The tfds catalog builder of `name`, prepared, or a DataError saying how to prepare it."""
    prepare = (
        f"prepare it once (downloads; needs TensorFlow): pip install -e '.[tf]' && "
        f"tfds build {name.partition(':')[0]} --data_dir {data_dir} --file_format array_record"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown dataset {name!r}: not built-in ({', '.join(BUILTIN)}), not prepared under "
            f"{data_dir}, and not in the tfds catalog; build a local folder with "
            "`python -m mmjax.data.build` or check the name"
        ) from e
    except ModuleNotFoundError as e:
        raise DataError(f"dataset {name!r} is not prepared under {data_dir}; {prepare}") from e
    if not builder.is_prepared():
        raise NotPreparedError(f"dataset {name!r} is not prepared under {data_dir}; {prepare}")
    return builder


def _check_array_record(builder, name: str) -> None:
    fmt = builder.info.file_format
    if fmt is not None and not _tfds_is_mocked() and "array_record" not in str(fmt).lower():
        raise DataError(
            f"dataset {name!r} at {builder.data_dir} is stored as {fmt}, which has no random "
            "access; rebuild it with `tfds build ... --file_format array_record`"
        )


def _tfds_is_mocked() -> bool:
    """Inside `tfds.testing.mock_data`, which replaces the builders' `as_data_source` (and
    fakes examples for any split) but not their prepared files."""
    method = tfds.core.DatasetBuilder.as_data_source
    return getattr(method, "__module__", "") == "tensorflow_datasets.testing.mocking"


def open_source(data_cfg: ml_collections.ConfigDict, name: str, split: str) -> Source:
    """Opens split `split` of dataset `name` (see the module doc for name resolution).

    `data_cfg` supplies the data dir and the built-in datasets' settings.
    """
    data_dir = builtin_build.resolve_data_dir(data_cfg.data_dir or None)
    if name in BUILTIN:
        builder = _builtin_builder(name, data_cfg)
    elif (path := prepared_dir(data_dir, name)) is not None:
        builder = tfds.builder_from_directory(path)
    else:
        try:
            builder = _catalog_builder(name, data_dir)
        except NotPreparedError:
            # `tfds.testing.mock_data` fakes `as_data_source` but not the prepared files.
            if not _tfds_is_mocked():
                raise
            builder = tfds.builder(name, data_dir=data_dir)
    _check_array_record(builder, name)
    features = builder.info.features
    if "image" not in features:
        raise DataError(
            f"dataset {name!r} has no 'image' feature (features: {', '.join(features)})"
        )
    splits = list(builder.info.splits)
    known = split in splits or any(split.startswith(s) for s in splits)
    if not known and not _tfds_is_mocked():
        raise DataError(f"dataset {name!r} has no split {split!r}; it has {', '.join(splits)}")
    # Images stay encoded here and are decoded (and resized) by the pipeline with PIL; tfds
    # would decode with OpenCV or TensorFlow and warn once per process when neither is there.
    # (mock_data would need TensorFlow to fake *encoded* images, so it gets decoded ones.)
    decoders = None if _tfds_is_mocked() else {"image": tfds.decode.SkipDecoding()}
    raw = builder.as_data_source(split, decoders=decoders)
    info = SourceInfo(
        name=name,
        split=split,
        num_examples=len(raw),
        class_names=_class_names(features),
        has_captions="captions" in features,
    )
    return Source(raw, info)


def read_prompts(name: str) -> dict[str, Any]:
    """Zero-shot prompt data kept in the package (`mmjax/data/prompts/<dataset>.json`):
    {"templates": [...], optionally "classnames": [...]}; {} when there is none."""
    path = os.path.join(os.path.dirname(__file__), "prompts", f"{name.split('/')[0]}.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_counts(data_cfg: ml_collections.ConfigDict) -> dict[str, int | float]:
    """What `python -m mmjax.data.build` kept and skipped for the training dataset (from the
    `build_report.json` beside it), as `data/*` summary entries; {} for other datasets."""
    data_dir = builtin_build.resolve_data_dir(data_cfg.data_dir or None)
    version_dir = None if data_cfg.name in BUILTIN else prepared_dir(data_dir, data_cfg.name)
    if version_dir is None:
        return {}
    path = os.path.join(os.path.dirname(version_dir), "build_report.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    out = {
        "data/images_kept": report["kept_images"],
        "data/images_skipped": report["skipped_images"],
        "data/bad_fraction": report["bad_fraction"],
    }
    out.update({f"data/skipped/{reason}": n for reason, n in report.get("skipped", {}).items()})
    return out
