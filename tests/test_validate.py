"""Pre-flight checks: each bad setting is refused with one line saying what to change."""

import collections
import importlib
import os

import jax
import numpy as np
import pytest

from mmjax import config as base_config
from mmjax.errors import ConfigError
from mmjax.tasks import get_task, text_to_image
from mmjax.train import validate
from tests.conftest import tiny
from tests.test_perf import RECIPE_OF_TASK, use_own_vectors
from tests.test_text_to_image import random_tokenizer_run

Usage = collections.namedtuple("Usage", "total used free")


def _abstract(*shapes_dtypes):
    return {f"x{i}": jax.ShapeDtypeStruct(s, d) for i, (s, d) in enumerate(shapes_dtypes)}


def test_state_bytes_counts_global_arrays():
    tree = _abstract(((1000, 10), np.float32), ((7,), np.int32), ((), np.float32))
    assert validate.state_bytes(tree) == 40_000 + 28 + 4


@pytest.mark.parametrize("existing, needed_checkpoints", [(0, 3), (2, 1), (5, 1)])
def test_disk_space_check(monkeypatch, tmp_path, existing, needed_checkpoints):
    tree = _abstract(((1024, 1024), np.float32))  # 4 MiB; 4.4 MiB with the margin
    per = 1.1 * 4 * 1024**2
    free = {"bytes": needed_checkpoints * per + 1}
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda _: Usage(0, 0, free["bytes"]))
    validate.validate_disk_space(str(tmp_path), tree, keep=2, existing=existing)  # just fits
    free["bytes"] = needed_checkpoints * per - 1
    with pytest.raises(ConfigError, match=r"GiB free, but checkpoints of this run need"):
        validate.validate_disk_space(str(tmp_path), tree, keep=2, existing=existing)


def test_workdir_must_be_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; use a path under a file
            target = str(tmp_path / "a_file" / "run")
            (tmp_path / "a_file").write_text("x")
        else:
            target = str(locked / "run")
        with pytest.raises(ConfigError, match="is not writable"):
            validate.validate_workdir(target)
    finally:
        os.chmod(locked, 0o700)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(dtype="float16"), "dtype='float16' is unsupported"),
        (lambda c: c.update(total_steps=0), "total_steps=0 must be a positive integer"),
        (lambda c: c.model.image.update(patch_size=7), "not divisible by model.image.patch_size"),
        (lambda c: c.model.text.update(num_heads=3), "model.text.width=128 is not divisible"),
        (lambda c: c.data.update(crop_scale=(0.5, 1.5)), "data.crop_scale"),
        (lambda c: c.update(microbatches=0), "microbatches=0 must be >= 1"),
    ],
)
def test_bad_settings_are_refused(edit, message):
    config = base_config.get_config()
    edit(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate.validate_config(config, get_task(config.task))


@pytest.mark.parametrize("task", sorted(RECIPE_OF_TASK))
def test_every_task_accepts_its_recipe_at_test_size(task, monkeypatch, tmp_path):
    """`tiny` resizes only the model fields the task reads (`Task.unread_model_settings`), so
    no task refuses its own recipe at test size (text_to_image and image_tokenizer refuse
    changes to the towers they do not have)."""
    monkeypatch.setattr(text_to_image, "_tokenizer_run", random_tokenizer_run)
    config = tiny(importlib.import_module(f"configs.{RECIPE_OF_TASK[task]}").get_config())
    assert config.task == task
    use_own_vectors(config, tmp_path)
    if config.init_towers_from:  # captioning: the default run's towers (read end to end in
        config.init_towers_from = str(tmp_path)  # test_train_e2e); validation checks it exists
    validate.validate_config(config, get_task(task))


@pytest.mark.parametrize("key, value", [("depth", 6), ("patch_size", 4), ("pool", "cls")])
def test_a_resnet_tower_refuses_the_vits_settings(key, value):
    """The default run's image tower is a ResNet: a ViT setting (e.g. `model.image.depth`, which
    changed the default run when it was a ViT) would do nothing, so it is refused, naming it."""
    from mmjax import default_recipe

    config = default_recipe.get_config()
    validate.validate_config(config, get_task(config.task))  # the recipe itself passes
    config.model.image[key] = value
    with pytest.raises(
        ConfigError, match=rf"kind=resnet .*model\.image\.{key}=.* would do nothing"
    ):
        validate.validate_config(config, get_task(config.task))
