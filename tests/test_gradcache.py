"""GradCache microbatching: the same update as one big-batch step, with less activation memory."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from mmjax import parallel
from mmjax.tasks import get_task
from mmjax.train import gradcache
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.test_models import VOCAB
from tests.test_sharding import config_for, synthetic_batches

pytestmark = pytest.mark.multidevice


def run_steps(config, steps=2):
    mesh = parallel.make_mesh(config.mesh)
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    state = trainer.init(jax.random.key(0))
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        for batch in synthetic_batches(steps, config.batch_size):
            state, m = trainer.step(
                state, parallel.global_batch(batch, trainer.batch_sharding), NO_CEILING
            )
            losses.append(float(m["train/loss"]))
    return np.array(losses), jax.device_get(state.params)


@pytest.mark.parametrize(
    "loss, impl, mesh",
    [
        ("softmax", "naive", dict(data=8, fsdp=1, tensor=1)),
        pytest.param(  # ~15 s: the slow tier
            "sigmoid", "chunked", dict(data=2, fsdp=2, tensor=2), marks=pytest.mark.slow
        ),
    ],
)
def test_microbatched_update_equals_big_batch_update(loss, impl, mesh):
    big = config_for(mesh, loss)
    big.batch_size = 32  # 8 data-parallel devices × 4 microbatches
    big.loss_impl = impl
    small = ml_collections.ConfigDict(big.to_dict())
    small.microbatches = 4
    losses_big, params_big = run_steps(big)
    losses_small, params_small = run_steps(small)
    # Same math, gradients summed over microbatches in another order: fp32 rounding only.
    np.testing.assert_allclose(losses_small, losses_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_small), jax.tree.leaves(params_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_split_and_merge_are_inverse_and_strided():
    x = np.arange(24).reshape(12, 2)
    x_k = gradcache.split_microbatches(x, 3)
    assert x_k.shape == (3, 4, 2)
    np.testing.assert_array_equal(x_k[1, :, 0], [2, 8, 14, 20])  # rows 1, 4, 7, 10
    np.testing.assert_array_equal(gradcache.merge_microbatches(x_k), x)


def step_temp_bytes(config, devices=None):
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    batch = next(synthetic_batches(1, config.batch_size))
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding), batch
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        compiled = trainer.step.lower(trainer.abstract_state, batch, NO_CEILING).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # three train-step compiles (~13 s)
def test_activation_memory_follows_the_microbatch():
    """Per-device temporaries (activations saved for backward) shrink with the microbatch size:
    16 microbatches of 4 rows keep far less than one batch of 64."""
    config = config_for(dict(data=1, fsdp=1, tensor=1))
    config.batch_size = 64
    temps = {}
    for k in (1, 4, 16):
        config.microbatches = k
        temps[k] = step_temp_bytes(config, jax.devices()[:1])
    assert temps[4] < 0.5 * temps[1], temps
    assert temps[16] < temps[4], temps


def test_batch_must_split_into_microbatches():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    with pytest.raises(ValueError, match=r"× 4 microbatches; use a multiple of 32"):
        parallel.check_batch_size(16, mesh, microbatches=4)
