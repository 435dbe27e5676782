"""Sharded training equals single-device training (8 fake CPU devices, see conftest.py)."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from mmjax import parallel
from mmjax.tasks import get_task
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.test_models import VOCAB, tiny_config

pytestmark = pytest.mark.multidevice

MESHES = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "data=2,fsdp=4": dict(data=2, fsdp=4, tensor=1),
    "data=4,tensor=2": dict(data=4, fsdp=1, tensor=2),
}


def synthetic_batches(steps, batch, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens = rng.integers(3, VOCAB, size=(batch, 12)).astype(np.int32)
        lengths = rng.integers(3, 13, size=batch)
        for i, n in enumerate(lengths):
            tokens[i, n - 1] = 2
            tokens[i, n:] = 0
        yield {"image": rng.normal(size=(batch, 16, 16, 3)).astype(np.float32), "tokens": tokens}


def train_losses(config, devices, steps=20):
    """train/loss of `steps` steps on a mesh over `devices`, plus the final state."""
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    state = trainer.init(jax.random.key(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        out = []
        for batch in synthetic_batches(steps, config.batch_size):
            state, m = trainer.step(
                state, parallel.global_batch(batch, trainer.batch_sharding), NO_CEILING
            )
            out.append(float(m["train/loss"]))
    return np.array(out), state


def config_for(mesh, loss="softmax"):
    c = tiny_config()
    c.loss = loss
    c.batch_size = 16
    c.total_steps = 20
    c.optim.warmup_steps = 2
    c.mesh = ml_collections.ConfigDict(mesh)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_sharded_losses_equal_single_device(loss):
    single, _ = train_losses(config_for(dict(data=1, fsdp=1, tensor=1), loss), jax.devices()[:1])
    assert np.all(np.isfinite(single)) and single[-1] < single[0]
    for name, mesh in MESHES.items():
        sharded, _ = train_losses(config_for(mesh, loss), jax.devices())
        # fp32 reductions are reordered across devices: 1e-5 relative is the contract.
        np.testing.assert_allclose(sharded, single, rtol=1e-5, err_msg=name)


def test_fsdp_and_tensor_really_shard_params_and_optimizer_state():
    _, state = train_losses(config_for(dict(data=2, fsdp=2, tensor=2)), jax.devices(), steps=1)
    kernel = state.params["image"]["encoder"]["block0"]["mlp"]["in_kernel"]  # (embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    shard_shape = kernel.addressable_shards[0].data.shape
    assert shard_shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    # Adam's moments follow their parameters' shardings.
    adam = state.opt_state[1][0]
    mu = adam.mu["image"]["encoder"]["block0"]["mlp"]["in_kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    # Per-device bytes of the state shrink with FSDP×TP (4 shards of most matrices).
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    assert per_device < 0.5 * total


def test_mesh_validation_messages():
    with pytest.raises(ValueError, match="uses 6 devices but 8 are available"):
        parallel.mesh_shape(ml_collections.ConfigDict(dict(data=2, fsdp=3, tensor=1)), 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        parallel.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=3, tensor=1)), 8)
    assert parallel.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)), 8) == (
        2,
        2,
        2,
    )
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
    with pytest.raises(ValueError, match="use a multiple of 8"):
        parallel.check_batch_size(30, mesh)


def test_fsdp_moves_to_a_dimension_it_divides():
    """Width 12 cannot be split 8 ways; FSDP then shards the largest dimension that it divides
    (here the MLP's 64, next to `tensor`), so per-device state still falls as 1/N."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    fit = parallel._fit_spec
    P = jax.sharding.PartitionSpec
    assert fit(P("fsdp", "tensor"), (12, 64), mesh) == P(None, ("tensor", "fsdp"))
    assert fit(P("fsdp", None), (16, 64), mesh) == P("fsdp", None)  # divisible: unchanged
    assert fit(P("fsdp", None, "tensor"), (12, 3, 5), mesh) == P(None, None, "tensor")  # nowhere
