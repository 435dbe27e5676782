"""Distillation from a BatchNorm teacher (the default run's ResNet): its running statistics are
loaded with its parameters, it embeds with them inside the objective exactly as its own run's
evaluation does, a training step never changes them, and a saved run whose state does not fit
`distill.teacher_model` is refused."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import model_state, parallel
from mmjax.errors import ConfigError
from mmjax.tasks import get_task
from mmjax.tasks.contrastive import teacher_config, validate_objective
from mmjax.train import pretrained
from mmjax.train.gradcache import PER_EXAMPLE
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.test_models import VOCAB, tiny_config

TASK = get_task("contrastive")
SIZE = 32  # a ResNet tower needs a multiple of 32


def teacher_model(norm="batch"):
    """The default run's towers (`mmjax.default_recipe.align_towers`) at test size."""
    c = tiny_config()
    c.model.image.update(kind="resnet", layers=(1, 1, 1, 1), resnet_width=8, num_heads=4)
    c.model.image.norm = norm
    c.model.text.causal = False
    return c.model


def student_config(run_dir, student="vit"):
    config = tiny_config()
    config.data.image_size = SIZE
    config.batch_size = 8
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.optim.warmup_steps = 0  # a nonzero learning rate at step 0
    if student == "resnet":
        config.model = teacher_model()
    config.objective.update(distill_logits=1.0, distill_embed=1.0)
    config.distill.update(teacher=run_dir, teacher_model=teacher_model())
    return config


def save_teacher_run(directory, params, state):
    """A run directory whose newest checkpoint holds these teacher parameters and state."""
    tree = {"params": jax.device_get(params), "model_state": state, "step": np.int32(3)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "checkpoints" / "3" / "state", tree)
    checkpointer.wait_until_finished()


def trained(params, state):
    """Initial teacher parameters and statistics moved as training moves them (statistics far
    from mean 0 / variance 1), so that loading them and using them both show."""
    rng = np.random.default_rng(0)
    move = lambda path, x: (
        rng.uniform(0.5, 2.0, x.shape) if path[-1].key == "var" else rng.normal(0, 0.5, x.shape)
    )
    state = jax.tree_util.tree_map_with_path(lambda p, x: move(p, x).astype(x.dtype), state)
    return jax.tree.map(lambda x: 1.1 * np.asarray(x), params), state


def abstract_variables(config):
    """(parameters, model state) of the task's model for `config`, shapes only."""
    model = TASK.build_model(config, VOCAB)
    init = lambda k: model_state.split(nn.unbox(TASK.init_variables(model, config, k)))
    return jax.eval_shape(init, jax.random.key(0))


def teacher_stats(train_state):
    return train_state.model_state["batch_stats"]["teacher"]


def batch_of(n, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(n, 12)).astype(np.int32)
    tokens[:, -1] = 2  # EOT
    return {"image": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32), "tokens": tokens}


def trainer_and_state(config, teacher_dir):
    """The trainer of `config` and its fresh state with the teacher run in `teacher_dir` (written
    from the initial teacher, `trained`) placed as the loop places it: (trainer, mesh, state,
    saved teacher parameters, saved teacher state)."""
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    trainer = build_trainer(TASK, config, mesh, VOCAB)
    state = trainer.init(jax.random.key(0))
    teacher = {c: tree["teacher"] for c, tree in jax.device_get(state.model_state).items()}
    saved_params, saved_state = trained(jax.device_get(state.params["teacher"]), teacher)
    save_teacher_run(teacher_dir, saved_params, saved_state)
    abstract = trainer.abstract_state
    sources = TASK.pretrained(config, abstract.params)
    state = state.replace(
        params=pretrained.merge(state.params, abstract.params, sources),
        model_state=pretrained.merge_state(state.model_state, sources),
    )
    return trainer, mesh, state, saved_params, saved_state


def test_a_batchnorm_teacher_embeds_with_its_running_statistics(tmp_path):
    """Inside the objective, the teacher's embeddings are its run's evaluation embeddings (the
    model applied with its state frozen, i.e. running averages, as `mmjax.eval` applies it),
    and the state the objective returns for the step to keep holds its statistics unchanged."""
    config = student_config(str(tmp_path / "teacher"))
    trainer, _, state, saved_params, saved_state = trainer_and_state(config, tmp_path / "teacher")
    validate_objective(config)
    jax.tree.map(np.testing.assert_array_equal, teacher_stats(state), saved_state["batch_stats"])

    batch = batch_of(config.batch_size)
    embed = lambda p, s, b: trainer.objective._embed(p, b, None, False, s)
    _, _, aux, _, _, new_state = jax.jit(embed)(state.params, state.model_state, batch)
    got = aux[PER_EXAMPLE]
    teacher = TASK.two_tower(teacher_config(config), VOCAB)

    @functools.partial(jax.jit, static_argnames="by_batch")
    def evaluate(variables, batch, by_batch=False):
        mutable = ["batch_stats"] if by_batch else False
        img = teacher.apply(variables, batch["image"], method=teacher.encode_image, mutable=mutable)
        img = img[0] if by_batch else img
        txt = teacher.apply(variables, batch["tokens"], method=teacher.encode_text)
        unit = lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
        return unit(img), unit(txt)

    want = evaluate(model_state.variables(model_state.with_state(saved_params, saved_state)), batch)
    np.testing.assert_allclose(got["teacher_image"], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["teacher_text"], want[1], rtol=1e-5, atol=1e-5)
    # (Not vacuous: normalised by the batch instead, the image embeddings differ.)
    by_batch = evaluate({"params": saved_params, **saved_state}, batch, by_batch=True)[0]
    assert np.abs(by_batch - got["teacher_image"]).max() > 1e-2
    assert jax.tree.structure(new_state) == jax.tree.structure(state.model_state)
    jax.tree.map(
        np.testing.assert_array_equal,
        new_state["batch_stats"]["teacher"],
        saved_state["batch_stats"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("student", ["vit", "resnet"])
def test_a_training_step_leaves_the_teacher_and_its_statistics_as_loaded(student, tmp_path):
    """The distill recipe's case (a ViT student: the model's only state is the teacher's) and a
    BatchNorm student, whose own statistics train next to the teacher's frozen ones."""
    config = student_config(str(tmp_path / "teacher"), student)
    trainer, mesh, state, _, saved_state = trainer_and_state(config, tmp_path / "teacher")
    before = jax.device_get(state)  # (the step donates the state)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        batch = parallel.global_batch(batch_of(config.batch_size), trainer.batch_sharding)
        new, metrics = trainer.step(state, batch, NO_CEILING)
    assert int(metrics["train/skipped_steps"]) == 0 and np.isfinite(float(metrics["train/loss"]))
    after = jax.device_get(new)
    jax.tree.map(np.testing.assert_array_equal, teacher_stats(after), saved_state["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, after.params["teacher"], before.params["teacher"])
    assert not np.array_equal(after.params["image_projection"], before.params["image_projection"])
    if student == "resnet":  # the student's own statistics do train
        own = lambda s: jax.tree.leaves(s.model_state["batch_stats"]["image"])
        assert any(not np.array_equal(a, b) for a, b in zip(own(after), own(before), strict=True))


def test_a_teacher_run_whose_state_does_not_fit_the_teacher_model_is_refused(tmp_path):
    """One error naming the run and distill.teacher_model, before anything trains: a BatchNorm
    teacher_model from a run without statistics (a GroupNorm run: the same parameter shapes,
    it would normalise with fresh statistics), and the other way round."""
    for saved_norm, model_norm, message in (
        ("group", "batch", "the model's teacher has batch_stats .* the saved one has none"),
        ("batch", "group", "the saved teacher has batch_stats .* the model's has none"),
    ):
        run = tmp_path / saved_norm
        config = student_config(str(run))
        config.distill.teacher_model.image.norm = saved_norm
        zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)
        saved = zeros(abstract_variables(config))
        save_teacher_run(run, saved[0]["teacher"], {c: t["teacher"] for c, t in saved[1].items()})
        config.distill.teacher_model.image.norm = model_norm
        params, initial_state = abstract_variables(config)
        sources = TASK.pretrained(config, params)
        pretrained.check(sources, params)  # the parameters alone fit
        pattern = rf"distill.teacher='{run}' does not fit distill.teacher_model.*{message}"
        with pytest.raises(ConfigError, match=pattern):
            pretrained.merge_state(initial_state, sources)


def test_a_batchnorm_teacher_refuses_microbatches(tmp_path):
    config = student_config(str(tmp_path))
    config.microbatches = 2
    with pytest.raises(ConfigError, match=r"distill.teacher_model .*microbatches=2 with BatchNorm"):
        validate_objective(config)
