"""Captioning and matching with a BatchNorm image tower (`model.image.norm=batch`): their
objectives carry the model's state (`StatefulObjective`), so every pass of a training step
normalises by the batch's statistics and the step returns the updated running ones; the
evaluators read them frozen. Stateless models are unchanged (the README's before/after check)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import captioning as captioning_config
from configs import matching as matching_config
from mmjax import config as base_config
from mmjax import model_state, parallel
from mmjax.main import train as run
from mmjax.models.coca import caption
from mmjax.tasks import get_task
from mmjax.tasks.contrastive_objective import ContrastiveObjective
from mmjax.tasks.matching import MatchingObjective
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny
from tests.test_resnet_runs import final_state
from tests.test_tasks import assert_resumes_exactly

SIZE = 32  # the smallest image a ResNet takes
TASKS = ["captioning", "matching"]


def batchnorm(config, data_dir=None):
    """A recipe at test size with the smallest BatchNorm ResNet image tower."""
    config = tiny(config, data_dir)
    config.data.image_size = SIZE
    config.model.image.update(kind="resnet", layers=(1, 1, 1, 1), resnet_width=8, norm="batch")
    vit = base_config.get_config().model.image  # (settings a ResNet does not read: defaults)
    config.model.image.update(depth=vit.depth, mlp_dim=vit.mlp_dim)
    return config


def built(config, devices=None):
    """(task, trainer, initial state) of `config` on `devices` (default: one)."""
    task = get_task(config.task)
    task.validate(config)
    mesh = parallel.make_mesh(config.mesh, devices or jax.devices()[:1])
    trainer = build_trainer(task, config, mesh, task.tokenizer(config).vocab_size)
    return task, trainer, trainer.init(jax.random.key(0))


def parts(config):
    """(task, model, objective, params, state) of `config`, initialised without the trainer's
    sharded machinery (one compile), with 16-token texts: what the fast tests need."""
    config.data.text_length = 16
    task = get_task(config.task)
    task.validate(config)
    model = task.build_model(config, task.tokenizer(config).vocab_size)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    objective = task.objective(model, config, mesh, tuple(config.rules))
    init = jax.jit(lambda key: nn.unbox(task.init_variables(model, config, key)))
    params, state = model_state.split(init(jax.random.key(0)))
    return task, model, objective, params, state


def a_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, length = config.batch_size, config.data.text_length
    tokens = rng.integers(3, 100, size=(b, length)).astype(np.int32)
    ends = rng.integers(4, length, size=b)
    for row, end in enumerate(ends):  # EOT, then padding
        tokens[row, end], tokens[row, end + 1 :] = 2, 0
    images = rng.normal(0.5, 1.5, size=(b, SIZE, SIZE, 3)).astype(np.float32)
    return {"image": images, "tokens": tokens, "seed": np.full(b, seed + 7, np.uint32)}


def test_a_batchnorm_captioning_step_normalises_by_the_batch_and_matches_numpy():
    """The stateful captioning loss equals CLIP's InfoNCE plus the mean next-token NLL computed
    in NumPy from the model applied in training mode, its new state is that pass's, and
    decoding reads the running statistics, frozen."""
    config = batchnorm(captioning_config.on_base_towers())
    _, model, objective, params, state = parts(config)
    batch = a_batch(config)
    loss, logs, new_state = jax.jit(objective.with_state)(params, state, batch, 0)
    training = jax.jit(lambda v, i, t: model.apply(v, i, t, mutable=["batch_stats"]))
    (img, txt, aux, logits), ref_state = training(
        {"params": params, **state}, batch["image"], batch["tokens"]
    )
    img, txt, logits = (np.asarray(x, np.float64) for x in (img, txt, logits))
    sim = float(aux["logit_scale"]) * img @ txt.T
    lse = lambda x, axis: np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis)) + x.max(axis)
    contrastive = np.mean(0.5 * (lse(sim, 1) + lse(sim, 0)) - np.diag(sim))
    targets, logp = batch["tokens"][:, 1:], logits[:, :-1] - lse(logits[:, :-1], -1)[..., None]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    caption_loss = nll[targets != 0].sum() / (targets != 0).sum()
    np.testing.assert_allclose(float(logs["train/loss/caption"]), caption_loss, rtol=1e-5)
    np.testing.assert_allclose(float(loss), contrastive + caption_loss, rtol=1e-5)
    before, after = jax.tree.leaves(state), jax.tree.leaves(new_state)
    assert min(float(np.abs(x - y).max()) for x, y in zip(after, before, strict=True)) > 0
    for got, want in zip(after, jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Greedy decoding from `ParamsAndState` (the evaluators' argument): each token after BOS is
    # the argmax of the decoder's logits at the position before it (until EOT), the image
    # tokens computed with the new running statistics.
    frozen = model_state.with_state(params, new_state)
    images = batch["image"][:2]
    tokens = np.asarray(jax.jit(lambda p: caption(model, p, images, 8, 1, 1, 2, 0)[0])(frozen))

    @jax.jit
    def teacher_forced(tokens):
        _, img_BND = model.apply({"params": params, **new_state}, images, method="image_tokens")
        return model.apply({"params": params}, img_BND, tokens, method="decoder_logits")

    logits_BLV = np.asarray(teacher_forced(tokens))
    for row in range(2):
        n = int(np.argmax(tokens[row] == 2)) or tokens.shape[1] - 1
        want = np.argmax(logits_BLV[row, :n], -1)
        np.testing.assert_array_equal(tokens[row, 1 : n + 1], want)


class TrainingMode:
    """A model applied as if every collection of `state` were mutable (BatchNorm normalising by
    the batch) on each call: the stateless objective through it is the reference."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def apply(self, variables, *args, method=None, **kwargs):
        merged = {**variables, **self.state}
        return self.model.apply(merged, *args, method=method, mutable=list(self.state), **kwargs)[0]

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.slow  # the captioning case above covers the fast tier (~9 s)
def test_a_batchnorm_matching_step_normalises_every_pass_by_the_batch():
    """Every pass of the stateful matching loss (towers, ITM negatives mined from their
    similarities, fusion, MLM) sees the batch-normalised image tokens: it equals the stateless
    loss of a model whose every call runs BatchNorm in training mode; the new state is the
    towers' pass's."""
    config = batchnorm(matching_config.on_base_towers())
    config.matching.hardness = 1.0  # negatives drawn from the similarities: BatchNorm's output
    task, model, objective, params, state = parts(config)
    batch = a_batch(config)
    loss, logs, new_state = jax.jit(objective.with_state)(params, state, batch, 0)
    c = objective.contrastive
    reference = MatchingObjective(
        ContrastiveObjective(TrainingMode(c.model, state), c.loss_kind),
        TrainingMode(model, state),
        {"itm": 1.0, "mlm": 1.0},
        task.tokenizer(config),
        config.model.text.pad_id,
        hardness=objective.hardness,
    )
    ref_loss, ref_logs = jax.jit(reference)(params, batch, 0)
    assert set(logs) == set(ref_logs) and "train/loss/itm" in logs
    for name in logs:
        np.testing.assert_allclose(logs[name], ref_logs[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    towers = jax.jit(lambda v, i, t: model.apply(v, i, t, method="embed", mutable=["batch_stats"]))
    _, ref_state = towers({"params": params, **state}, batch["image"], batch["tokens"])
    after = jax.tree.leaves(new_state)
    for got, want in zip(after, jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    before = jax.tree.leaves(state)
    assert min(float(np.abs(x - y).max()) for x, y in zip(after, before, strict=True)) > 0


def run_steps(config, devices, ceilings):
    """(the host states before and after each step, each step's metrics), one step per loss
    ceiling, on the same batches whatever the mesh."""
    _, trainer, state = built(config, devices)
    states, metrics = [jax.device_get(state)], []  # (the step donates its input)
    with jax.set_mesh(trainer.batch_sharding.mesh), nn.logical_axis_rules(trainer.rules):
        for i, ceiling in enumerate(ceilings):
            batch = parallel.global_batch(a_batch(config, i), trainer.batch_sharding)
            state, logs = trainer.step(state, batch, ceiling)
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(logs))
    return states, metrics


@pytest.mark.slow  # four compiles of a ResNet captioning / matching step
@pytest.mark.multidevice
@pytest.mark.parametrize(
    "recipe", [captioning_config.on_base_towers, matching_config.on_base_towers], ids=TASKS
)
def test_sharded_steps_equal_one_device_and_a_skipped_step_keeps_the_statistics(recipe):
    """Two applied steps and a skipped one (a loss ceiling below any loss), on one device and
    on data=2 x fsdp=4: the statistics (over the global batch), losses, gradient norms and
    parameters agree; the applied steps move the statistics, the skipped one keeps them."""
    ceilings = (NO_CEILING, NO_CEILING, np.float32(-np.inf))
    (initial, _, applied, skipped), want_logs = run_steps(
        batchnorm(recipe()), jax.devices()[:1], ceilings
    )
    assert int(applied.skipped) == 0 and int(skipped.skipped) == 1
    before, after, kept = (jax.tree.leaves(s.model_state) for s in (initial, applied, skipped))
    assert min(float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True)) > 0
    for a, b in zip(after, kept, strict=True):
        np.testing.assert_array_equal(a, b)
    config = batchnorm(recipe())
    config.mesh.update(data=2, fsdp=4, tensor=1)
    states, logs = run_steps(config, jax.devices(), ceilings)
    for got, want in zip(logs, want_logs, strict=True):
        for name in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    for part in ("model_state", "params"):
        got = jax.tree_util.tree_leaves_with_path(getattr(states[-1], part))
        for (path, leaf), ref in zip(got, jax.tree.leaves(getattr(skipped, part)), strict=True):
            # Statistics: 1e-5 of the leaf's scale. Parameters: 5 % of an Adam step (lr 1e-3):
            # Adam divides each gradient entry by its root mean square, so entries near ε (each
            # block's zero-initialised last BatchNorm scale, unused text positions) move by
            # rounding noise amplified to ~1e-5.
            scale = max(float(np.abs(ref).max()), 0.1)
            atol = 5e-5 if part == "params" else 1e-5 * scale
            np.testing.assert_allclose(leaf, ref, rtol=0, atol=atol, err_msg=str(path))


def tiny_run_config(recipe, data_dir):
    c = batchnorm(recipe(), data_dir)
    if "captioning" in c:
        c.captioning.update(eval_examples=16, beam_size=2)
    return c


@pytest.mark.slow  # two short runs with checkpoints and a decoding evaluation each
def test_a_batchnorm_captioning_run_resumes_with_its_statistics(data_dir, tmp_path):
    """Captioning rather than matching: the checkpointed state is the trainer's, shared by
    every task; what is captioning's own is decoding with the restored statistics."""
    config = lambda: tiny_run_config(captioning_config.on_base_towers, data_dir)
    summary = assert_resumes_exactly(config, tmp_path)  # losses and score of steps 3-4
    assert summary["task/metric_name"] == "bleu4"
    (step_a, a), (step_b, b) = (final_state(config(), tmp_path / w) for w in ("full", "resumed"))
    assert step_a == step_b == 4
    assert any(np.abs(s).max() > 1e-3 for s in jax.tree.leaves(a.model_state))
    for x, y in zip(
        jax.tree.leaves((a.params, a.model_state)),
        jax.tree.leaves((b.params, b.model_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # a short run and its matching evaluation
def test_a_batchnorm_matching_run_evaluates_with_its_statistics(data_dir, tmp_path):
    summary = run(tiny_run_config(matching_config.on_base_towers, data_dir), str(tmp_path))
    assert summary["task/metric_name"] == "itm_accuracy" and summary["steps"] == 1
    for name in ("task/score", "matching/itm_negative_shape", "matching/mlm_color"):
        assert 0.0 <= summary[name] <= 1.0, name
