"""Captioning and matching compose the one contrastive objective: every contrastive setting
(loss kind, loss_impl, GradCache, objective terms, distillation, towers from a contrastive run)
changes their loss as it changes the contrastive task's, or is refused before compiling with a
ConfigError saying what to change. Tasks without a contrastive term refuse those settings."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import captioning, matching, mm_classification, text_classification, video_qa, vqa
from configs import video_contrastive as video_contrastive_recipe
from mmjax import checkpoint, losses, parallel
from mmjax.errors import ConfigError
from mmjax.tasks import get_task
from mmjax.train import gradcache, pretrained
from mmjax.train.task import CONTRASTIVE_SETTINGS
from mmjax.train.trainer import build_trainer
from mmjax.train.validate import refuse_overrides, validate_config

# The small stateless models build on the base config's towers (captioning's recipe loads the
# default run's BatchNorm ResNet).
RECIPES = {"captioning": captioning.on_base_towers, "matching": matching.on_base_towers}
TASKS = sorted(RECIPES)
VOCAB = 264  # the bytes tokenizer's (the matching objective reads its mask id from it)
ALL_TERMS = {
    "objective.triplet": 1.0,
    "objective.adversarial": 0.5,
    "objective.distill_logits": 1.0,
    "objective.distill_embed": 1.0,
}


def small(name: str, **settings) -> ml_collections.ConfigDict:
    """The task's recipe with one-block 32-wide towers on 16 px images and 12 tokens, and
    `settings` (dotted names: "objective.triplet", "loss")."""
    c = RECIPES[name]()
    m = c.model
    m.embed_dim = 16
    for tower in (m.image, m.text):
        tower.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    m.image.patch_size = 4
    c.data.update(image_size=16, text_length=12)
    if name == "captioning":
        c.captioning.decoder_depth = 1
    else:
        m.fusion.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.total_steps = 10
    c.update_from_flattened_dict(settings)
    return c


def built(config):
    """(task, model, float32 params) of `config`."""
    task = get_task(config.task)
    model = task.build_model(config, VOCAB)
    init = jax.jit(lambda key: task.init_variables(model, config, key)["params"])
    return task, model, nn.unbox(init(jax.random.key(0)))


def batch_of(name: str, size: int = 8) -> dict:
    """Random images and captions of 3..10 tokens (BOS, bytes, EOT, padding)."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((size, 12), np.int32)
    for i in range(size):
        n = 3 + i % 8
        tokens[i, 0], tokens[i, n - 1] = 1, 2
        tokens[i, 1 : n - 1] = rng.integers(3, 259, n - 2)
    batch = {"image": rng.normal(size=(size, 16, 16, 3)).astype(np.float32), "tokens": tokens}
    if name == "matching":
        batch["seed"] = np.arange(size, dtype=np.uint32)
    return batch


def objective_of(task, model, config, mesh=None):
    objective = task.objective(model, config, mesh, tuple(config.rules))
    return lambda params, batch, step: objective(params, batch, step)  # jit needs no hash


def two_tower_outputs(model, params, batch):
    """The embeddings and aux of the two-tower model the task's model holds, applied alone."""
    return model.two_tower.apply({"params": params}, batch["image"], batch["tokens"])


def check_total(loss, logs, weights):
    """The loss is the weighted sum of the logged terms, and exactly the enabled ones are logged."""
    enabled = {t: w for t, w in weights.items() if w > 0}
    assert {k for k in logs if k.startswith("train/loss/")} == {f"train/loss/{t}" for t in enabled}
    total = sum(w * float(logs[f"train/loss/{t}"]) for t, w in enabled.items())
    np.testing.assert_allclose(float(loss), total, rtol=1e-6)


@functools.cache
def with_every_term(name: str):
    """(config, task, model, params) of `name` with every contrastive setting that changes its
    loss on one device: loss=sigmoid and all the objective terms (built once per module)."""
    config = small(name, loss="sigmoid", **ALL_TERMS)
    return (config, *built(config))


@functools.cache
def jitted_objective(name: str):
    config, task, model, _ = with_every_term(name)
    return jax.jit(objective_of(task, model, config))


@pytest.fixture(params=TASKS)
def every_term(request):
    """(name, config, task, model, params, jitted objective) of `with_every_term`."""
    name = request.param
    return name, *with_every_term(name), jitted_objective(name)


def test_every_term_equals_its_direct_computation(every_term):
    """Each logged term is the loss function of `mmjax.losses` on the outputs of the held
    two-tower model (and its teacher and discriminator), applied alone: SigLIP's loss from
    SigLIP's initial scale and bias, triplet, adversarial, both distillation terms, and the
    caption loss; the total is the weighted sum with the task's own terms."""
    name, config, task, model, params, objective = every_term
    assert float(params["logit_scale"]) == pytest.approx(math.log(10.0))
    assert float(params["logit_bias"]) == -10.0
    batch = batch_of(name)
    loss, logs = objective(params, batch, jnp.int32(3))

    img_BE, txt_BE, aux = two_tower_outputs(model, params, batch)
    sigmoid = losses.sigmoid_contrastive(img_BE, txt_BE, aux["logit_scale"], aux["logit_bias"])
    discriminate = lambda x: model.two_tower.discriminator.apply(
        {"params": params["discriminator"]}, x
    )
    adversarial = losses.modality_discriminator_loss(discriminate(img_BE), discriminate(txt_BE))
    t_img_BE, t_txt_BE, t_aux = model.two_tower.teacher.apply(
        {"params": params["teacher"]}, batch["image"], batch["tokens"]
    )
    kd = losses.similarity_kd_loss(
        losses.pairwise_logits(img_BE, txt_BE, aux["logit_scale"]),
        losses.pairwise_logits(t_img_BE, t_txt_BE, t_aux["logit_scale"]),
        2.0,
    )
    embed_B = 0.5 * (
        losses.embedding_distill_loss(img_BE, t_img_BE, "cosine")
        + losses.embedding_distill_loss(txt_BE, t_txt_BE, "cosine")
    )
    expected = {
        "contrastive": jnp.mean(sigmoid),
        "triplet": jnp.mean(losses.bidirectional_triplet(img_BE, txt_BE, 0.2)),
        "adversarial": jnp.mean(adversarial),
        "distill_logits": jnp.mean(kd),
        "distill_embed": jnp.mean(embed_B),
    }
    if name == "captioning":  # the decoder's teacher-forced next-token loss, per real token
        *_, logits_BLV = model.apply({"params": params}, batch["image"], batch["tokens"])
        targets_BL = batch["tokens"][:, 1:]
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1], targets_BL)
        expected["caption"] = jnp.sum(nll_BL * (targets_BL != 0)) / jnp.sum(targets_BL != 0)
    for term, value in expected.items():
        np.testing.assert_allclose(
            logs[f"train/loss/{term}"], value, rtol=2e-6, atol=1e-7, err_msg=term
        )
    assert 0.0 <= float(logs["train/modality_accuracy"]) <= 1.0
    check_total(loss, logs, task.term_weights(config))


def test_distilling_from_an_identical_teacher_adds_nothing(every_term):
    """The teacher is a frozen two-tower model next to the task's own: given the student's
    two-tower parameters, both distillation terms vanish."""
    name, config, task, _, params, objective = every_term
    assert task.frozen_prefixes(config) == ("teacher/",)
    params = {**params, "teacher": {k: params[k] for k in params["teacher"]}}
    _, logs = objective(params, batch_of(name), jnp.int32(0))
    assert abs(float(logs["train/loss/distill_logits"])) < 1e-6
    assert abs(float(logs["train/loss/distill_embed"])) < 1e-6
    assert float(logs["train/loss/contrastive"]) > 0.1


def data_4_mesh():
    return parallel.make_mesh(
        ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=1)), jax.devices()[:4]
    )


def on_mesh(mesh, rules, params, batch):
    """`params` replicated and `batch` split over the data axis of `mesh`."""
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    return params, jax.device_put(batch, parallel.batch_sharding(mesh, rules))


@pytest.mark.slow  # a chunked and a naive matching loss compiled on a mesh (~7 s)
@pytest.mark.multidevice
def test_matching_chunked_loss_equals_naive_on_a_data_4_mesh():
    """loss_impl=chunked reaches matching's composed objective (the ring over the mesh passed
    in): every term equals the naive loss's. (Its gradients: the captioning test below.)"""
    config, task, model, params = with_every_term("matching")
    mesh, rules = data_4_mesh(), tuple(config.rules)
    logs = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, batch = on_mesh(mesh, rules, params, batch_of("matching"))
        for impl in ("naive", "chunked"):
            config = config.copy_and_resolve_references()
            config.loss_impl = impl
            objective = jax.jit(objective_of(task, model, config, mesh))
            logs[impl] = jax.device_get(objective(params, batch, jnp.int32(3))[1])
    assert set(logs["chunked"]) == set(logs["naive"])
    for key, value in logs["naive"].items():
        np.testing.assert_allclose(logs["chunked"][key], value, rtol=1e-5, err_msg=key)


@pytest.mark.slow  # GradCache and chunked gradients compiled on a mesh (~12 s)
@pytest.mark.multidevice
def test_captioning_gradcache_and_chunked_give_the_big_batch_gradient():
    """On a data=4 mesh, loss_impl=chunked with microbatches=2 against naive in one batch: the
    caption NLL (summed per example, with its token count) travels with the teacher embeddings
    and discriminator logits as per-example aux, so every term over the global batch and every
    gradient are the same (float32 sums in another order: 1e-5 relative to a leaf's largest
    entry)."""
    config, task, model, params = with_every_term("captioning")
    mesh, rules = data_4_mesh(), tuple(config.rules)
    step = jnp.int32(5)  # λ > 0: the reversed gradient reaches the towers
    chunked = config.copy_and_resolve_references()
    chunked.update(loss_impl="chunked", microbatches=2)
    assert task.supports_microbatches
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, batch = on_mesh(mesh, rules, params, batch_of("captioning"))
        naive = jax.value_and_grad(objective_of(task, model, config, mesh), has_aux=True)
        (loss, logs), grads = jax.device_get(jax.jit(naive)(params, batch, step))
        split = task.objective(model, chunked, mesh, rules)
        micro = jax.jit(
            lambda p, b: gradcache.value_and_grad(
                lambda p, b: split.embed(p, b, step), split.loss, p, b, chunked.microbatches
            )
        )
        (micro_loss, micro_logs), micro_grads = jax.device_get(micro(params, batch))
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-6)
    assert set(micro_logs) == set(logs)
    for key, value in logs.items():
        np.testing.assert_allclose(micro_logs[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(optax.tree.norm(grads["decoder"])) > 0  # the caption term reaches the decoder
    for a, b in zip(jax.tree.leaves(micro_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("name", TASKS)
def test_towers_and_teacher_come_from_a_contrastive_run(name, tmp_path):
    """`init_towers_from` and `distill.teacher` name a contrastive parameters checkpoint: the
    towers land at the same paths, the teacher whole, and the task's contrastive term on the
    merged parameters is the contrastive task's loss of the saved ones."""
    config = small(name, **{"objective.distill_logits": 1.0})
    contrastive = config.copy_and_resolve_references()
    contrastive.task = "contrastive"
    contrastive.objective.distill_logits = 0.0
    c_task = get_task("contrastive")
    c_model = c_task.build_model(contrastive, VOCAB)
    init = lambda key: c_task.init_variables(c_model, contrastive, key)["params"]
    rng = np.random.default_rng(1)  # any values: unlike a fresh initialisation
    saved = jax.tree.map(
        lambda x: rng.normal(scale=0.1, size=x.shape).astype(x.dtype),
        nn.unbox(jax.eval_shape(init, jax.random.key(0))),
    )
    checkpoint.save_params(str(tmp_path / "run"), saved)
    config.update(init_towers_from=str(tmp_path / "run"))
    config.distill.teacher = str(tmp_path / "run")
    task = get_task(name)
    validate_config(config, task)

    mesh, rules = parallel.make_mesh(config.mesh), tuple(config.rules)
    trainer = build_trainer(task, config, mesh, VOCAB)
    abstract = trainer.abstract_state.params
    sources = task.pretrained(config, abstract)
    assert [s.path for s in sources] == [("image",), ("text",), ("teacher",)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        params = pretrained.merge(trainer.init(jax.random.key(0)).params, abstract, sources)
    params = jax.device_get(params)
    for path, want in (("image", saved["image"]), ("text", saved["text"]), ("teacher", saved)):
        for a, b in zip(jax.tree.leaves(params[path]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=path)

    # The projections and temperature are the task's own (not in init_towers): take them too.
    heads = ("image_projection", "text_projection", "logit_scale", "logit_bias")
    params = {**params, **{k: saved[k] for k in heads}}
    batch = batch_of(name)
    composed = task.objective(trainer.model, config, None, rules).contrastive
    _, logs = composed.loss(*composed.embed(params, batch))
    _, c_logs = c_task.objective(c_model, contrastive, None, rules)(saved, batch)
    np.testing.assert_allclose(
        logs["train/loss/contrastive"], c_logs["train/loss/contrastive"], rtol=1e-6
    )


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("captioning", {"objective.contrastive": 0.5}, "with captioning.contrastive_weight"),
        ("matching", {"objective.contrastive": 0.5}, "with matching.itc"),
        ("captioning", {"eval.tasks": ("zeroshot:shapes",)}, r"eval.tasks=\('zeroshot:shapes',\)"),
        ("matching", {"microbatches": 2}, "task=matching cannot use GradCache.*microbatches=1"),
        ("matching", {"matching.itc": 0.0, "matching.itm": 0.0, "matching.mlm": 0.0}, "> 0"),
        ("captioning", {"loss": "hinge"}, "loss='hinge' is unknown"),
        ("captioning", {"objective.distill_embed": 1.0}, "need a teacher: set distill.teacher"),
    ],
)
def test_settings_the_composed_tasks_cannot_use_are_refused(name, settings, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(small(name, **settings), get_task(name))


def test_captioning_accepts_microbatches_and_terms():
    config = small("captioning", microbatches=2, loss="sigmoid", loss_impl="chunked")
    config.update_from_flattened_dict({"objective.triplet": 1.0, "captioning.caption_weight": 0.5})
    validate_config(config, get_task("captioning"))


NO_CONTRASTIVE_TERM = {
    "classification": mm_classification,
    "vqa": vqa,
    "video_qa": video_qa,
    "text_classification": text_classification,
}


@pytest.mark.parametrize("recipe", sorted(NO_CONTRASTIVE_TERM))
def test_tasks_without_a_contrastive_term_refuse_its_settings(recipe):
    config = NO_CONTRASTIVE_TERM[recipe].get_config()
    task = get_task(config.task)
    assert not task.has_contrastive_term
    refuse_overrides(config, CONTRASTIVE_SETTINGS, "unused")  # the recipe itself sets none
    config.loss = "sigmoid"
    with pytest.raises(ConfigError) as e:
        validate_config(config, task)
    assert str(e.value) == (
        f"task={config.task} has no contrastive term: loss='sigmoid' would do nothing; "
        "remove the override"
    )
    config.loss = "softmax"
    config.objective.triplet = 1.0
    config.distill.teacher = "/runs/teacher"
    with pytest.raises(
        ConfigError, match=r"objective\.triplet=1\.0, distill\.teacher='/runs/teacher' would"
    ):
        validate_config(config, task)


def test_video_contrastive_distills_from_a_video_teacher():
    """The teacher is built like the student, video tower included (a video_contrastive run)."""
    config = video_contrastive_recipe.get_config()
    config.objective.distill_logits = 1.0
    task = get_task("video_contrastive")
    model = task.build_model(config, VOCAB)
    init = lambda k: task.init_variables(model, config, k)["params"]
    params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    student = {k: v for k, v in params.items() if k != "teacher"}
    assert checkpoint.shapes_of(params["teacher"]) == checkpoint.shapes_of(student)


@pytest.mark.parametrize("name", TASKS)
def test_composed_models_embed_like_their_two_tower(name):
    """`python -m mmjax.evaluate` (zero-shot, retrieval) embeds with `encode_image`/`encode_text`
    of the task's model: they are its two-tower model's embeddings, before normalisation."""
    config = small(name)
    task, model, params = built(config)
    assert task.image_text_embeddings
    batch = batch_of(name)
    img_BE, txt_BE, _ = two_tower_outputs(model, params, batch)
    apply = lambda method, x: model.apply({"params": params}, x, method=method)
    for got, want in (
        (apply(model.encode_image, batch["image"]), img_BE),
        (apply(model.encode_text, batch["tokens"]), txt_BE),
    ):
        unit = got / (jnp.linalg.norm(got, axis=-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(unit, want, rtol=1e-5, atol=1e-6)


def test_mlm_needs_a_tokenizer_with_a_mask_token():
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.tasks.matching import mask_id_of

    assert mask_id_of(build_tokenizer("bytes", 12)) == VOCAB - 1

    class NoMask:  # e.g. CLIP BPE: no mask token in its vocabulary
        mask_id = None

    with pytest.raises(ConfigError, match=r"set matching\.mlm=0"):
        mask_id_of(NoMask())
