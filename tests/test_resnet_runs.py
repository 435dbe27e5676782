"""End-to-end runs of a ResNet two-tower model (slow): the ALIGN recipe trains, evaluates with
its frozen BatchNorm statistics, and resumes exactly, statistics included."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import align
from mmjax import parallel
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.main import train
from mmjax.tasks import get_task
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny


def align_config(data_dir):
    config = tiny(align.get_config(), data_dir)
    config.model.image.update(layers=(1, 1, 1, 1), resnet_width=8)
    config.update(total_steps=4, checkpoint_every=2)
    return config


def final_state(config, workdir):
    """(step, host train state) of the newest checkpoint of `workdir`."""
    mesh = parallel.make_mesh(config.mesh)
    vocab = pipeline.tokenizer_for(config.data).vocab_size
    trainer = build_trainer(get_task(config.task), config, mesh, vocab)
    step, state = Checkpointer(os.path.join(workdir, "checkpoints")).restore_state(
        trainer.abstract_state
    )
    return step, jax.device_get(state)


@pytest.mark.slow
def test_align_recipe_runs_and_resumes_with_its_batch_statistics(data_dir, tmp_path):
    config = align_config(data_dir)
    reference = str(tmp_path / "reference")
    summary = train(config, reference)
    assert summary["steps"] == 4 and np.isfinite(summary["train/loss"])
    # Evaluated with the running statistics (frozen): zero-shot and retrieval numbers.
    for key in ("zeroshot/color/top1_all", "retrieval/t2i/r5"):
        assert 0.0 <= summary[key] <= 1.0, key

    # The same run, its last checkpoint lost: it resumes from step 2 and redoes steps 3-4.
    resumed = str(tmp_path / "resumed")
    train(align_config(data_dir), resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "summary.json"))
    train(align_config(data_dir), resumed)

    (step_a, a), (step_b, b) = final_state(config, reference), final_state(config, resumed)
    assert step_a == step_b == 4
    stats = jax.tree.leaves(a.model_state)
    assert stats and any(np.abs(s).max() > 1e-3 for s in stats)  # BatchNorm statistics moved
    for x, y in zip(
        jax.tree.leaves((a.params, a.model_state)),
        jax.tree.leaves((b.params, b.model_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
