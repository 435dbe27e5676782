"""The ResNet image tower (`model.image.kind=resnet`) and model state (BatchNorm statistics) in
the one trainer: shapes, bf16, BatchNorm against a NumPy reference in both modes, the bad-step
guard, sharded = single device (8 fake CPU devices, see conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import model_state, parallel
from mmjax.errors import ConfigError
from mmjax.models.resnet import BatchNorm, GroupNorm, ResNet
from mmjax.models.two_tower import validate_towers
from mmjax.tasks import get_task
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.test_models import VOCAB, tiny_config

SIZE = 32  # the smallest image a ResNet takes (total stride 32)


def resnet_config(norm="batch", mesh=None, dtype="float32"):
    """A two-tower config with the smallest ResNet (one block per stage, 8 stem channels)."""
    c = tiny_config(dtype)
    c.data.image_size = SIZE
    c.model.image.update(kind="resnet", layers=(1, 1, 1, 1), resnet_width=8, norm=norm)
    c.model.text.update(depth=1)
    c.batch_size = 16
    c.optim.warmup_steps = 1
    c.mesh = ml_collections.ConfigDict(mesh or dict(data=1, fsdp=1, tensor=1))
    return c


def batches(steps, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens = rng.integers(3, VOCAB, size=(batch, 12)).astype(np.int32)
        tokens[:, 8], tokens[:, 9:] = 2, 0  # EOT, padding
        images = rng.normal(1.0, 2.0, size=(batch, SIZE, SIZE, 3)).astype(np.float32)
        yield {"image": images, "tokens": tokens}


def run_steps(config, devices, ceilings=(NO_CEILING, NO_CEILING)):
    """The states (on the host) before and after each step, one step per loss ceiling."""
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    state = trainer.init(jax.random.key(0))
    states = [jax.device_get(state)]  # (the step donates its input)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        for batch, ceiling in zip(batches(len(ceilings), config.batch_size), ceilings, strict=True):
            state, _ = trainer.step(
                state, parallel.global_batch(batch, trainer.batch_sharding), ceiling
            )
            states.append(jax.device_get(state))
    return states


def test_resnet_shapes_and_bfloat16():
    x = jax.random.normal(jax.random.key(1), (2, 64, 32, 3))
    model = ResNet((1, 1, 1, 1), 8, 2, 24)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    pooled, tokens = jax.jit(model.apply)(variables, x)
    assert pooled.shape == (2, 24) and tokens.shape == (2, 2, 24)  # 64x32 px -> 2x1 map
    low = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)[0]
    assert low.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(low, np.float32) - pooled) / np.linalg.norm(pooled)
    assert err < 3e-2, err  # bf16 inputs to every conv and matmul, float32 statistics
    # GroupNorm: no state, the same outputs.
    group = jax.eval_shape(model.clone(norm="group").init, jax.random.key(0), x)
    assert set(group) == {"params"}


def test_batchnorm_training_and_eval_match_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 3, 5, 6)) * 3 + 1, np.float32)
    bn = BatchNorm()
    variables = nn.unbox(bn.init(jax.random.key(0), x))
    # Training: normalised by the batch's (biased) statistics, running ones moved by 0.1 towards
    # the batch's (unbiased variance), as PyTorch's BatchNorm2d does.
    y, updated = bn.apply(variables, x, mutable=["batch_stats"])
    mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), atol=1e-5)
    stats = jax.tree.map(np.asarray, updated["batch_stats"])
    n = 4 * 3 * 5
    np.testing.assert_allclose(stats["mean"], 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    # Evaluation: the running statistics, frozen (nothing is mutable, nothing changes).
    frozen = {"params": variables["params"], **updated}
    y_eval = bn.apply(frozen, x)
    ref = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(y_eval, ref, atol=1e-5)
    assert model_state.variables(model_state.with_state({"a": 1}, updated)) == {
        "params": {"a": 1},
        **updated,
    }
    # GroupNorm: per example, groups of channels; no state.
    g = GroupNorm()
    xg = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 3, 64)), np.float32)
    yg = g.apply(g.init(jax.random.key(0), xg), xg)
    r = xg.reshape(2, 3, 3, 32, 2)
    ref = (r - r.mean((1, 2, 4), keepdims=True)) / np.sqrt(r.var((1, 2, 4), keepdims=True) + 1e-5)
    np.testing.assert_allclose(yg, ref.reshape(xg.shape), atol=1e-5)


@pytest.mark.slow  # three compiles of a ResNet train step (~30 s each on a loaded 2-core host)
@pytest.mark.multidevice
def test_sharded_resnet_steps_equal_single_device_and_a_skipped_step_keeps_the_statistics():
    """BatchNorm statistics over the global batch under GSPMD: the mean over the sharded batch
    axis is the cross-device one, so parameters and statistics match one device's. The third
    step is skipped (a loss ceiling below any loss): its statistics update is dropped too."""
    ceilings = (NO_CEILING, NO_CEILING, np.float32(-np.inf))
    initial, _, applied, skipped = run_steps(resnet_config(), jax.devices()[:1], ceilings)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), applied.model_state, initial.model_state)
    assert max(jax.tree.leaves(moved)) > 1e-3  # applied steps update them
    assert int(applied.skipped) == 0 and int(skipped.skipped) == 1
    same = jax.tree.map(np.array_equal, applied.model_state, skipped.model_state)
    assert all(jax.tree.leaves(same))
    want = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path((skipped.params, skipped.model_state))
    }
    for mesh in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1)):
        sharded = run_steps(resnet_config(mesh=mesh), jax.devices(), ceilings)[-1]
        got = (sharded.params, sharded.model_state)
        for path, leaf in jax.tree_util.tree_leaves_with_path(got):
            ref = want[jax.tree_util.keystr(path)]
            # Relative to the leaf's scale, at least 0.1: the attention pool's key bias has a
            # zero gradient (softmax ignores it), so it moves by rounding noise (~1e-8) only.
            scale = max(float(np.abs(ref).max()), 0.1)
            np.testing.assert_allclose(
                leaf, ref, rtol=0, atol=1e-5 * scale, err_msg=f"{mesh}{path}"
            )


def test_resnet_settings_are_checked():
    c = resnet_config()
    validate_towers(c)
    for key, value, match in (
        ("data.image_size", 48, "multiple of 32"),
        ("model.image.norm", "layer", "norm='layer' is unknown"),
        ("model.image.layers", (1, 1), "four positive block counts"),
        ("model.image.num_heads", 3, "not divisible by model.image.num_heads=3"),
        ("microbatches", 2, "GradCache"),
    ):
        bad = resnet_config()
        target = bad
        for part in key.split(".")[:-1]:
            target = target[part]
        target[key.split(".")[-1]] = value
        with pytest.raises(ConfigError, match=match):
            validate_towers(bad)


def test_resnet_step_flops_equal_the_analytic_count():
    """The FLOPs traced from the train step of a BatchNorm ResNet (through its stateful
    objective) equal `bench/flops.py`'s analytic count: convolutions and the attention pool."""
    from mmjax.bench import flops as analytic
    from mmjax.train import flops

    config = resnet_config()
    config.data.image_size = 64  # a 2x2 final map: the attention pool sees 5 positions
    config.model.image.layers = (1, 2, 1, 1)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        traced = flops.train_step_flops(
            trainer.objective,
            trainer.abstract_state.params,
            trainer.task.example_batch(config),
            config.batch_size,
            trainer.abstract_state.model_state,
        )
    assert traced == analytic.train_step_flops(config, config.batch_size)


def test_an_objective_without_model_state_refuses_batchnorm():
    """An objective that does not carry BatchNorm statistics (no `with_state`: a user's task
    here, since captioning and matching carry them now): the trainer says so before compiling
    (shapes only are traced)."""
    from mmjax.tasks.contrastive import ContrastiveTask

    class StatelessTask(ContrastiveTask):
        def objective(self, model, config, mesh, rules):
            contrastive = super().objective(model, config, mesh, rules)
            return lambda params, batch, step: contrastive(params, batch, step)

    config = resnet_config()
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"cannot train a model with state.*norm=group"):
        build_trainer(StatelessTask(), config, mesh, VOCAB)
