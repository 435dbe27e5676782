"""Random-access data sources by name: the built-in datasets, folders built with
`python -m mmjax.data.build`, and the tensorflow-datasets catalog.

Every source yields examples in one format, whatever the dataset:

    {"image": encoded bytes or uint8 [H, W, 3], "captions": list[str] (maybe empty),
     "label": int (classification sets only), ...other scalar fields of the dataset}

and carries a `SourceInfo` with its class names. Every dataset name is resolved here, in this
order:

1. the built-in datasets (`BUILTIN`), generated locally on first use (no download, no
   TensorFlow). `shapes` and `digits` are image–caption sets opened like any other; the others
   hold what only some tasks read (labelled image–text pairs, clips, sentences): `require`
   checks a task's `data.name`, and the task reads the split from its `mmjax.data.builtin`
   module;
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
from mmjax.errors import ConfigError, DataError, NotPreparedError

# Every dataset mmjax generates itself -> what its examples are: "image_text" (image, captions;
# opened by `open_source`), "labelled" (image, text, label: `labelled.load`), "clips" (moving
# shapes with captions and questions: `clips.load_clips`, `clips.load_qa`), "sentences" (text,
# label: `reviews.load`), "speech" (spoken utterances and transcripts, English / Mandarin:
# `speech_builder`, read by task=speech_to_text).
BUILTIN = {
    "shapes": "image_text",
    "digits": "image_text",
    "shapes_mmc": "labelled",
    "shapes_vqa": "labelled",
    "moving_shapes": "clips",
    "reviews": "sentences",
    "speech": "speech",
    "speech_zh": "speech",
}


def builtin_names(kind: str) -> tuple[str, ...]:
    """The built-in datasets whose examples are `kind` (see BUILTIN)."""
    return tuple(name for name, k in BUILTIN.items() if k == kind)


def require(data_cfg: ml_collections.ConfigDict, kind: str, task: str) -> None:
    """ConfigError unless `data.name` is a built-in dataset of `kind`, the only data task
    `task` reads."""
    names = builtin_names(kind)
    if data_cfg.name not in names:
        wanted = f"={names[0]!r}" if len(names) == 1 else f" in {names}"
        raise ConfigError(f"task={task} trains on data.name{wanted}, got {data_cfg.name!r}")


def split_size(data_cfg: ml_collections.ConfigDict, split: str) -> int:
    """How many examples a run reads of a generated split: `data.num_train` or `data.num_val`."""
    return data_cfg.num_train if split == "train" else data_cfg.num_val


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
    """The tfds builder of a built-in image–caption dataset, generated on first use."""
    # Imported here: only the dataset a run reads is generated, and its builder module with it.
    if name == "shapes":
        from mmjax.data.builtin import shapes_builder

        return shapes_builder.ensure_built(
            data_cfg.data_dir or None,
            image_size=data_cfg.image_size,
            num_train=data_cfg.num_train,
            num_val=data_cfg.num_val,
            seed=data_cfg.dataset_seed,
        )
    if name == "digits":
        from mmjax.data.builtin import digits_builder

        return digits_builder.ensure_built(
            data_cfg.data_dir or None, image_size=data_cfg.image_size, seed=data_cfg.dataset_seed
        )
    image_text = ", ".join(builtin_names("image_text"))
    raise DataError(
        f"data.name={name!r} is a built-in dataset of {BUILTIN[name]}, which only the tasks "
        f"that train on it read; the image–caption ones are {image_text}"
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


def catalog_builder(name: str, data_dir: str):
    """The tfds catalog builder of `name`, prepared, or a DataError saying how to prepare it.
    (Tests replace this function to serve a catalog dataset without preparing it.)"""
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
    if fmt is not None and "array_record" not in str(fmt).lower():
        raise DataError(
            f"dataset {name!r} at {builder.data_dir} is stored as {fmt}, which has no random "
            "access; rebuild it with `tfds build ... --file_format array_record`"
        )


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
        builder = catalog_builder(name, data_dir)
    _check_array_record(builder, name)
    features = builder.info.features
    if "image" not in features:
        raise DataError(
            f"dataset {name!r} has no 'image' feature (features: {', '.join(features)})"
        )
    splits = list(builder.info.splits)
    if not (split in splits or any(split.startswith(s) for s in splits)):
        raise DataError(f"dataset {name!r} has no split {split!r}; it has {', '.join(splits)}")
    # Images stay encoded here and are decoded (and resized) by the pipeline with PIL; tfds
    # would decode with OpenCV or TensorFlow and warn once per process when neither is there.
    raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
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
