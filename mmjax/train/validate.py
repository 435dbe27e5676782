"""Checks that run before anything expensive: each failure says what to change."""

import os
import shutil
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np

from mmjax import config as base
from mmjax.data import preprocess
from mmjax.errors import ConfigError
from mmjax.train import guard
from mmjax.train.task import CONTRASTIVE_SETTINGS, Task


def _leaves(name: str, value) -> dict[str, object]:
    """Dotted name -> value of every leaf of a config field (tuples and lists alike)."""
    if isinstance(value, ml_collections.ConfigDict):
        out = {}
        for key in value.keys():
            out.update(_leaves(f"{name}.{key}", value[key]))
        return out
    return {name: tuple(value) if isinstance(value, list | tuple) else value}


def _field(config: ml_collections.ConfigDict, name: str):
    for key in name.split("."):
        if not isinstance(config, ml_collections.ConfigDict) or key not in config:
            return None
        config = config[key]
    return config


def refuse_overrides(config: ml_collections.ConfigDict, names: Iterable[str], why: str) -> None:
    """ConfigError if a field under `names` (dotted: "loss", "objective", "eval.tasks") differs
    from the package default (`mmjax.config.get_config()`): `why` says why the task would not
    use it. One message lists every such field."""
    defaults = base.get_config()
    changed = []
    for name in names:
        if _field(config, name) is None:  # a config without the field: nothing to ignore
            continue
        ours = _leaves(name, _field(config, name))
        theirs = _leaves(name, _field(defaults, name))
        changed += [f"{k}={v!r}" for k, v in ours.items() if k not in theirs or theirs[k] != v]
    if changed:
        s = "s" if len(changed) > 1 else ""
        raise ConfigError(f"{why}: {', '.join(changed)} would do nothing; remove the override{s}")


# The ViT image tower's settings (mmjax/config.py): a ResNet tower reads none of them.
VIT_ONLY_SETTINGS = tuple(
    f"model.image.{key}"
    for key in (
        *("patch_size", "depth", "mlp_dim", "pool", "posemb", "stem_channels"),
        *("patch_bias", "pre_norm"),
    )
)


def validate_config(c: ml_collections.ConfigDict, task: Task) -> None:
    """The settings every task shares (steps, batch, dtype, data, guard), then `task.validate`
    for the task's own (e.g. the towers' model fields: `two_tower.validate_towers`)."""
    if not task.has_contrastive_term:
        refuse_overrides(c, CONTRASTIVE_SETTINGS, f"task={task.name} has no contrastive term")
    if not task.draws_captions:
        why = f"task={task.name} draws no caption per image to permute colours for"
        refuse_overrides(c, ("data.colourless_permute_prob",), why)
        why = f"task={task.name} does not draw from an image's captions"
        refuse_overrides(c, ("data.canonical_captions",), why)
    if int(c.microbatches) < 1:
        raise ConfigError(f"microbatches={c.microbatches} must be >= 1 (1 = no GradCache)")
    if _field(c, "model.image.kind") == "resnet":
        why = (
            "model.image.kind=resnet reads none of the ViT's settings (it has layers, resnet_width)"
        )
        refuse_overrides(c, VIT_ONLY_SETTINGS, why)
    if c.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype={c.dtype!r} is unsupported; use float32 or bfloat16")
    if c.peak_tflops < 0:
        raise ConfigError(
            f"peak_tflops={c.peak_tflops} must be >= 0 (a device's dense TFLOP/s; 0 = known or "
            "measured)"
        )
    if int(c.data.workers) < 0:
        raise ConfigError(f"data.workers={c.data.workers} must be >= 0 (0 = a loader thread)")
    for key in ("total_steps", "batch_size", "log_every"):
        if int(c[key]) <= 0:
            raise ConfigError(f"{key}={c[key]} must be a positive integer")
    for key in ("eval_every", "checkpoint_every"):
        if int(c[key]) < 0:
            raise ConfigError(f"{key}={c[key]} must be >= 0 (0 disables it)")
    if c.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints={c.keep_checkpoints} must be >= 1")
    if not 0.0 <= c.data.first_caption_prob <= 1.0:
        raise ConfigError(f"data.first_caption_prob={c.data.first_caption_prob} must be in [0, 1]")
    canonical = tuple(c.data.get("canonical_captions", (0,)))
    if not canonical or len(set(canonical)) != len(canonical) or min(canonical) < 0:
        raise ConfigError(
            f"data.canonical_captions={canonical}: distinct caption indices >= 0, at least one"
        )
    if not 0.0 <= c.data.colourless_permute_prob <= 1.0:
        raise ConfigError(
            f"data.colourless_permute_prob={c.data.colourless_permute_prob} must be in [0, 1]"
        )
    if c.data.augment not in preprocess.AUGMENTATIONS:
        raise ConfigError(
            f"data.augment={c.data.augment!r} is unknown; use one of "
            f"{', '.join(preprocess.AUGMENTATIONS)}"
        )
    low, high = c.data.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(
            f"data.crop_scale={tuple(c.data.crop_scale)} must satisfy 0 < low <= high <= 1"
        )
    if c.guard.policy not in guard.POLICIES:
        raise ConfigError(
            f"guard.policy={c.guard.policy!r} is unknown; use one of {', '.join(guard.POLICIES)}"
        )
    if c.guard.spike_zscore < 0 or c.guard.spike_window < 3:
        raise ConfigError(
            f"guard.spike_zscore={c.guard.spike_zscore} must be >= 0 (0 = off) and "
            f"guard.spike_window={c.guard.spike_window} >= 3"
        )
    if c.data.image_size < 1:
        raise ConfigError(f"data.image_size={c.data.image_size} must be a positive integer")
    if c.data.text_length < 4:
        raise ConfigError(f"data.text_length={c.data.text_length} is too short (min 4)")
    task.validate(c)  # first: a task may say more precisely why it cannot split its batch
    if int(c.microbatches) > 1 and not task.supports_microbatches:
        raise ConfigError(
            f"microbatches={c.microbatches}: task={task.name!r} does not support GradCache; "
            "set microbatches=1"
        )
    towers = c.get("init_towers_from", "")
    if towers and not os.path.exists(towers):  # e.g. configs/vqa.py before the default run
        raise ConfigError(
            f"init_towers_from={towers!r} does not exist; train that run first (e.g. the "
            f"default run's towers: python train.py --workdir {towers}) or point "
            "init_towers_from at a run directory"
        )


def validate_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable ({e}); pass --workdir DIR") from e


def state_bytes(abstract_state) -> int:
    """Bytes of one checkpoint's arrays (global shapes: every shard counted once)."""
    leaves = jax.tree.leaves(abstract_state)
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))


def validate_disk_space(directory: str, abstract_state, keep: int, existing: int) -> None:
    """Refuses a run whose checkpoints cannot fit: up to `keep` checkpoints plus the one being
    written (orbax deletes the oldest only after the new one is complete), minus the
    `existing` ones already on disk, each the size of the train state plus 10 % for metadata."""
    per_checkpoint = 1.1 * state_bytes(abstract_state)
    needed = max(keep + 1 - existing, 1) * per_checkpoint
    free = shutil.disk_usage(directory).free
    if free < needed:
        gib = 1024**3
        raise ConfigError(
            f"the disk of {directory} has {free / gib:.2f} GiB free, but checkpoints of this "
            f"run need {needed / gib:.2f} GiB ({per_checkpoint / gib:.2f} GiB each, keep_"
            f"checkpoints={keep}); free space, lower keep_checkpoints or pass another --workdir"
        )
