"""The objective terms of `config.objective` wired into the one trainer: distillation from a
teacher equal to the student is a no-op, gradient reversal really reverses the towers' gradient,
disabled terms change nothing, sharded and microbatched steps equal the plain one."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import checkpoint, losses
from mmjax.errors import ConfigError
from mmjax.models.two_tower import TRAINING_PARTS
from mmjax.tasks import get_task
from mmjax.tasks.contrastive import validate_objective
from mmjax.train import gradcache, pretrained
from tests.test_models import VOCAB, example_inputs, tiny_config
from tests.test_sharding import config_for, train_losses

TASK = get_task("contrastive")
ALL_TERMS = dict(triplet=1.0, adversarial=0.5, distill_logits=1.0, distill_embed=1.0)


def small(config):
    """One block per tower: compile time dominates these tests, not the model."""
    config.model.image.depth = config.model.text.depth = 1
    return config


def objective_for(model, **objective):
    """The task's objective of `tiny_config` with `objective` settings, on no mesh."""
    config = small(tiny_config())
    config.total_steps = 10
    config.objective.update(objective)
    return TASK.objective(model, config, None, tuple(config.rules))


@pytest.fixture(scope="module")
def full():
    """(model, params) with every part: discriminator and a teacher of the student's shape."""
    config = small(tiny_config())
    config.objective.update(ALL_TERMS)
    model = TASK.build_model(config, VOCAB)
    init = jax.jit(lambda key: TASK.init_variables(model, config, key)["params"])
    return model, nn.unbox(init(jax.random.key(0)))


def batch_of(batch=4):
    images, tokens = example_inputs(batch)
    return {"image": images, "tokens": tokens}


def towers(tree):
    """The model's own part of a params/grads tree (what a plain two-tower model has)."""
    return {k: v for k, v in tree.items() if k not in TRAINING_PARTS}


def test_disabled_parts_are_not_built():
    def param_names(**objective):
        config = small(tiny_config())
        config.objective.update(objective)
        model = TASK.build_model(config, VOCAB)
        shapes = jax.eval_shape(lambda k: TASK.init_variables(model, config, k), jax.random.key(0))
        return set(shapes["params"])

    plain = param_names()
    assert not plain & set(TRAINING_PARTS)
    assert param_names(triplet=1.0) == plain
    assert param_names(adversarial=0.1) == plain | {"discriminator"}
    assert param_names(distill_logits=0.1) == param_names(distill_embed=1.0)
    assert param_names(distill_logits=0.1) == plain | {"teacher"}


def test_zero_weight_terms_change_nothing(full):
    """The loss and gradients of the default objective (zero weights but contrastive) are
    exactly the plain contrastive loss's, whatever the settings of the disabled terms."""
    model, params = full
    objective = objective_for(
        model, triplet_margin=0.5, adversarial_gamma=3.0, distill_temperature=4.0
    )
    batch = batch_of()

    def plain(p):
        img_BE, txt_BE, aux = model.apply({"params": p}, batch["image"], batch["tokens"])
        return jnp.mean(losses.softmax_contrastive(img_BE, txt_BE, aux["logit_scale"]))

    wired = functools.partial(objective, batch=batch, step=jnp.int32(7))
    (loss, logs), grads = jax.jit(jax.value_and_grad(wired, has_aux=True))(params)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(plain))(params)
    assert set(k for k in logs if k.startswith("train/loss/")) == {"train/loss/contrastive"}
    np.testing.assert_array_equal(loss, ref_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_distilling_from_an_identical_teacher_is_a_no_op(full, kind):
    model, params = full
    objective = objective_for(
        model, contrastive=0.0, distill_logits=1.0, distill_embed=1.0, distill_embed_kind=kind
    )
    batch = batch_of()
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))

    (_, logs), grads = grad_fn({**params, "teacher": towers(params)}, batch)
    assert abs(float(logs["train/loss/distill_logits"])) < 1e-6
    assert abs(float(logs["train/loss/distill_embed"])) < 1e-6
    for g in jax.tree.leaves(grads):
        np.testing.assert_allclose(g, 0.0, atol=1e-5)

    # Another teacher (its random initialisation): the student learns, the teacher never does.
    (loss, _), grads = grad_fn(params, batch)
    assert float(loss) > 1e-3
    assert float(optax.tree.norm(towers(grads))) > 1e-3
    assert all(not np.any(g) for g in jax.tree.leaves(grads["teacher"]))


def test_gradient_reversal_reverses_the_towers_gradient(full):
    """The towers get -λ × the gradient of the discriminator's own loss (they learn to fool
    it), the discriminator gets that gradient unchanged (it learns to discriminate)."""
    model, params = full
    objective = objective_for(model, contrastive=0.0, adversarial=1.0, adversarial_gamma=10.0)
    batch = batch_of()
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (_, logs), wired = grad_fn(params, batch, step=jnp.int32(5))  # of total_steps=10

    def discriminator_loss(p):  # the same BCE without the reversal layer
        img_BE, txt_BE, _ = model.apply({"params": p}, batch["image"], batch["tokens"])
        disc = lambda x: model.discriminator.apply({"params": p["discriminator"]}, x)
        return jnp.mean(losses.modality_discriminator_loss(disc(img_BE), disc(txt_BE)))

    own = jax.jit(jax.grad(discriminator_loss))(params)
    lam = float(losses.dann_lambda(0.5, 10.0))
    np.testing.assert_allclose(float(logs["train/adversarial_lambda"]), lam, rtol=1e-6)
    assert 0.9 < lam < 1.0
    for a, b in zip(
        jax.tree.leaves(wired["discriminator"]), jax.tree.leaves(own["discriminator"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    for name in ("image", "text", "image_projection", "text_projection"):
        expected = jax.tree.map(lambda g: -lam * g, own[name])
        error = optax.tree.norm(jax.tree.map(jnp.subtract, wired[name], expected))
        assert float(optax.tree.norm(own[name])) > 1e-6, name
        assert float(error) < 1e-5 * float(optax.tree.norm(expected)), name


@pytest.mark.slow  # a train step compiled for two meshes (~12 s)
@pytest.mark.multidevice
def test_sharded_step_equals_single_device_with_triplet_and_adversarial():
    def config(mesh):
        c = small(config_for(mesh))
        c.objective.update(triplet=1.0, adversarial=0.5)
        return c

    # Two steps: λ is 0 at step 0, so the reversed gradient first reaches the towers in step 2.
    single, single_state = train_losses(
        config(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1], steps=2
    )
    sharded, sharded_state = train_losses(
        config(dict(data=2, fsdp=2, tensor=2)), jax.devices(), steps=2
    )
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(sharded_state.params), jax.tree.leaves(single_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradcache_gives_the_big_batch_gradient_of_every_term(full):
    """Teacher embeddings and discriminator logits travel as per-example aux: split and merged
    over microbatches like the embeddings, their gradients pulled back per microbatch."""
    model, params = full
    objective = objective_for(model, **ALL_TERMS)
    batch, step = batch_of(), jnp.int32(5)  # λ > 0: the reversed gradient reaches the towers
    big = jax.jit(jax.value_and_grad(objective, has_aux=True))
    micro = jax.jit(
        lambda p, b: gradcache.value_and_grad(
            functools.partial(objective.embed, step=step), objective.loss, p, b, 2
        )
    )
    (loss_big, logs_big), grads_big = big(params, batch, step)
    (loss_micro, logs_micro), grads_micro = micro(params, batch)
    np.testing.assert_allclose(loss_micro, loss_big, rtol=1e-6)
    for name in ALL_TERMS:
        key = f"train/loss/{name}"
        np.testing.assert_allclose(logs_micro[key], logs_big[key], rtol=1e-5, atol=1e-7)
    # fp32 sums in another order: errors scale with a leaf's largest entries, not each entry.
    for a, b in zip(jax.tree.leaves(grads_micro), jax.tree.leaves(grads_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))


def test_the_teacher_is_frozen(full):
    """No optimizer state and no update for the teacher, even given a gradient."""
    from mmjax.train import optimizer

    config = tiny_config()
    config.objective.distill_logits = 1.0
    config.optim.warmup_steps = 0  # a nonzero learning rate at step 0
    params = full[1]
    tx, _ = optimizer.build_optimizer(config, TASK.frozen_prefixes(config))
    opt_state = tx.init(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
    assert paths and not any("teacher" in p for p in paths)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    assert all(not np.any(u) for u in jax.tree.leaves(updates["teacher"]))
    assert all(np.any(u) for u in jax.tree.leaves(updates["image"]))


@pytest.mark.parametrize(
    "update, message",
    [
        (dict(contrastive=0.0), "one at least > 0"),
        (dict(triplet=-1.0), "each must be >= 0"),
        (dict(distill_logits=1.0), "need a teacher: set distill.teacher"),
        (dict(distill_embed_kind="l1"), "distill_embed_kind='l1' is unknown"),
    ],
)
def test_objective_validation_messages(update, message):
    config = tiny_config()
    config.objective.update(update)
    with pytest.raises(ConfigError, match=message):
        validate_objective(config)


def test_teacher_must_exist_and_fit(tmp_path):
    config = tiny_config()
    config.objective.update(distill_embed=1.0)
    config.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        validate_objective(config)
    config.distill.teacher = str(tmp_path)
    config.distill.teacher_model = tiny_config().model
    config.distill.teacher_model.embed_dim = 32
    with pytest.raises(ConfigError, match="teacher's embed_dim is 32"):
        validate_objective(config)

    # A saved teacher of another architecture: one line naming the mismatches, before training.
    config.objective.distill_embed = 0.0
    config.objective.distill_logits = 1.0
    validate_objective(config)

    def abstract_params(config):
        model = TASK.build_model(config, VOCAB)
        init = lambda k: TASK.init_variables(model, config, k)["params"]
        return nn.unbox(jax.eval_shape(init, jax.random.key(0)))

    other = tiny_config()
    other.model.image.width = 64
    saved = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(other))
    checkpoint.save_params(str(tmp_path / "teacher"), saved)
    config.distill.teacher = str(tmp_path / "teacher")
    abstract = abstract_params(config)
    with pytest.raises(ConfigError, match=r"does not fit distill.teacher_model.*image") as e:
        pretrained.check(TASK.pretrained(config, abstract), abstract)
    assert "\n" not in str(e.value)
