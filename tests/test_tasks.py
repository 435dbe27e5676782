"""Fusion tasks under the one trainer: built-in labelled data, the fusion classifier with every
fusion, exact evaluation counts, hard-negative matching, and exact resume of a task run."""

import glob
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fusion as fusion_config
from configs import matching as matching_config
from mmjax import losses, parallel
from mmjax.data import tokenizers
from mmjax.data.builtin import labelled, shapes
from mmjax.main import train as run
from mmjax.metrics import read_metrics
from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.tasks import get_task
from mmjax.tasks.matching import MatchingEvaluator, mask_id_of
from tests.conftest import tiny


def test_labelled_examples_depend_only_on_their_index():
    short = labelled.load("shapes_vqa", "train", 6, 32, 0)
    longer = labelled.load("shapes_vqa", "train", 12, 32, 0)
    np.testing.assert_array_equal(short.images, longer.images[:6])
    assert short.texts == longer.texts[:6]
    other_seed = labelled.load("shapes_vqa", "train", 6, 32, 1)
    assert not np.array_equal(short.images, other_seed.images)


def test_vqa_colour_answers_are_the_colour_drawn_on_that_side():
    data = labelled.load("shapes_vqa", "validation", 300, 64, 0)
    checked = 0
    for image, question, label in zip(data.images, data.texts, data.labels, strict=True):
        side = "left" if "on the left" in question else "right"
        if not question.startswith("what color"):
            continue
        half = image[:, :22] if side == "left" else image[:, -22:]
        pixels = half.reshape(-1, 3).astype(np.float32)
        # The object's pixels are the ones farthest from the dark background.
        bright = pixels[np.argsort(pixels.sum(1))[-20:]].mean(0)
        nearest = np.argmin(np.linalg.norm(shapes.COLOR_RGB - bright, axis=1))
        assert shapes.COLORS[nearest] == labelled.VQA_ANSWERS[label], question
        checked += 1
    assert checked > 40


def test_vqa_questions_are_balanced_and_answerable():
    data = labelled.load("shapes_vqa", "train", 1400, 32, 0)
    answers = np.array(labelled.VQA_ANSWERS)[data.labels]
    exists = answers[data.groups == labelled.VQA_QUESTIONS.index("exists_color")]
    assert set(exists) == {"yes", "no"} and 0.3 < np.mean(exists == "yes") < 0.7
    counts = answers[data.groups == labelled.VQA_QUESTIONS.index("count_color")]
    assert set(counts) <= {"0", "1", "2"} and len(set(counts)) == 3
    # A blind baseline must stay far below what seeing the image allows.
    assert labelled.prior_accuracy(data, data) < 0.45


def test_prior_accuracy_answers_each_groups_most_frequent_training_label():
    def split(labels, groups):
        n = len(labels)
        return labelled.LabelledSplit(
            np.zeros((n, 1, 1, 3), np.uint8),
            ("",) * n,
            np.array(labels, np.int32),
            np.array(groups, np.int32),
            ("a", "b", "c"),
            ("g0", "g1"),
        )

    train = split([0, 0, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1])
    val = split([0, 1, 2, 0], [0, 0, 1, 1])  # guesses: 0 for g0, 2 for g1
    assert labelled.prior_accuracy(train, val) == pytest.approx(2 / 4)


# Two kinds in the fast tier (test_fusion checks every kind's gradients reach both inputs);
# the other kinds in the slow tier (4-7 s each; CI runs both tiers).
FAST_FUSIONS = ("cross_attention", "early_concat")


@pytest.mark.parametrize(
    "kind",
    [k if k in FAST_FUSIONS else pytest.param(k, marks=pytest.mark.slow) for k in sorted(FUSIONS)],
)
def test_every_fusion_classifies_from_both_modalities(kind):
    config = tiny(fusion_config.get_config())
    config.model.fusion.kind = kind
    model = build_fusion_classifier(config, 264, num_classes=5)
    images = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
    tokens = jnp.array([[1, 40, 41, 2, 0, 0], [1, 50, 2, 0, 0, 0], [1, 60, 61, 62, 63, 2]])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens)["params"])
    # The head starts at zero (uniform predictions); give it weights so gradients reach the towers.
    params["head_kernel"] = jax.random.normal(jax.random.key(2), params["head_kernel"].shape)
    # jit: eager op-by-op dispatch of the deeper fusions costs seconds per call.
    apply = jax.jit(lambda p, t: model.apply({"params": p}, images, t))
    logits = apply(params, tokens)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32

    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, tokens) ** 2)))(params)
    for tower in ("image", "text"):
        norm = optax_norm(grads[tower])
        assert norm > 0, f"{kind}: no gradient reaches the {tower} tower"
    # Padding is masked: extra pad tokens change nothing.
    padded = jnp.pad(tokens, ((0, 0), (0, 3)))
    np.testing.assert_allclose(apply(params, padded), logits, rtol=1e-5, atol=1e-5)


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.slow
def test_classification_evaluation_counts_every_example_once(tmp_path):
    config = tiny(fusion_config.get_config(), num_val=37)  # 37 = 32 + a partial batch of 5
    task = get_task(config.task)
    mesh = parallel.make_mesh(config.mesh)
    rules = tuple(config.rules)
    model = task.build_model(config, 264)
    with jax.set_mesh(mesh):
        params = nn.unbox(task.init_variables(model, config, jax.random.key(0))["params"])
        params["head_kernel"] = jax.random.normal(jax.random.key(3), params["head_kernel"].shape)
        evaluate = task.evaluator(config, model, parallel.batch_sharding(mesh, rules))
        result = evaluate(params)
    val = labelled.load("shapes_mmc", "validation", 37, 64, 0)
    from mmjax.data import preprocess

    tokens = task.tokenizer(config).encode(list(val.texts))
    logits = model.apply({"params": params}, preprocess.normalize(val.images), tokens)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == val.labels))
    assert result["task/score"] == pytest.approx(expected, abs=1e-9)
    assert result["classification/accuracy"] == result["task/score"]


def test_identical_captions_are_never_mined_as_negatives():
    sim = jnp.array([[1.0, 0.99, 0.1], [0.99, 1.0, 0.1], [0.1, 0.1, 1.0]])
    same = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)  # rows 0 and 1: one caption
    for seed in range(5):
        neg_txt, neg_img = losses.mine_hard_negatives(
            sim, jax.random.key(seed), positive_BB=same, temperature=0.01
        )
        assert list(neg_txt[:2]) == [2, 2] and list(neg_img[:2]) == [2, 2]


def test_matching_evaluation_pairs_and_masked_colour_words(data_dir):
    config = tiny(matching_config.on_base_towers(), data_dir, num_val=24)
    task = get_task("matching")
    mesh = parallel.make_mesh(config.mesh)
    tokenizer = task.tokenizer(config)
    evaluator = MatchingEvaluator(
        config,
        task.build_model(config, tokenizer.vocab_size),
        parallel.batch_sharding(mesh, tuple(config.rules)),
        tokenizer,
    )
    n = 24
    assert evaluator.pairs["tokens"].shape[0] == 2 * n and evaluator.labels.sum() == n
    positive, negative = evaluator.pairs["tokens"][:n], evaluator.pairs["tokens"][n:]
    assert not np.any(np.all(positive == negative, axis=1))  # each negative changes something
    assert set(evaluator.changed) == {0, 1, 2, 3}
    mask = mask_id_of(tokenizer)
    for i, (lo, hi) in enumerate(evaluator.spans):
        word = bytes((evaluator.targets[i, lo:hi] - 3).tolist()).decode()
        assert word in shapes.COLORS
        assert np.all(evaluator.masked["tokens"][i, lo:hi] == mask)
        others = np.delete(evaluator.masked["tokens"][i], np.arange(lo, hi))
        assert mask not in others


def assert_resumes_exactly(config, tmp_path) -> dict:
    """Runs `config()` (a task recipe at test size) for 4 steps in `tmp_path/full`, then a copy
    restarted from its step-2 checkpoint (model, optimizer and data iterator), and asserts that
    the restarted run ends with the same losses and score. Returns the uninterrupted summary."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def configured():
        c = config()
        c.total_steps, c.checkpoint_every, c.keep_checkpoints = 4, 2, 3
        return c

    first = run(configured(), str(full))
    shutil.copytree(full, resumed)
    for name in ["metrics.jsonl", "summary.json"]:
        os.remove(resumed / name)
    for step_dir in glob.glob(str(resumed / "checkpoints" / "4")):
        shutil.rmtree(step_dir)
    second = run(configured(), str(resumed))
    losses = lambda w: [r["train/loss"] for r in read_metrics(str(w)) if "train/loss" in r]
    assert losses(resumed) == losses(full)[2:]
    assert second["task/score"] == first["task/score"]
    return first


@pytest.mark.slow
def test_task_run_resumes_exactly(tmp_path, data_dir):
    assert_resumes_exactly(lambda: tiny(fusion_config.get_config(), data_dir), tmp_path)


def test_whole_word_masking_chooses_words_not_tokens():
    tok = tokenizers.ByteTokenizer(48)
    tokens = jnp.asarray(tok.encode(["a large red star at the top"] * 64))
    space = int(tok.encode([" "])[0, 1])
    word_ids = jnp.cumsum(tokens == space, axis=1)
    specials = (0, 1, 2, space)
    _, _, weights = losses.mask_tokens(
        tokens,
        jax.random.key(0),
        mask_id=263,
        vocab_size=264,
        special_ids=specials,
        prob=0.3,
        word_ids_BL=word_ids,
    )
    weights, word_ids, eligible = map(np.asarray, (weights, word_ids, ~np.isin(tokens, specials)))
    for row in range(64):
        for word in np.unique(word_ids[row][eligible[row]]):
            chosen = weights[row][(word_ids[row] == word) & eligible[row]]
            assert chosen.min() == chosen.max()  # all of the word's letters, or none
    assert 0.2 < weights[eligible].mean() < 0.4


@pytest.mark.slow
def test_fusion_task_starts_from_contrastively_pretrained_towers(tmp_path, data_dir):
    from mmjax import config as base_config
    from mmjax.errors import ConfigError
    from mmjax.train import pretrained
    from mmjax.train.trainer import build_trainer

    run(tiny(base_config.get_config(), data_dir), str(tmp_path / "pretrained"))

    config = tiny(fusion_config.get_config(), data_dir)
    config.init_towers_from, config.init_towers = str(tmp_path / "pretrained"), ("image",)
    task = get_task(config.task)
    mesh = parallel.make_mesh(config.mesh)
    trainer = build_trainer(task, config, mesh, 264)
    abstract = trainer.abstract_state.params
    sources = task.pretrained(config, abstract)
    _, saved = pretrained.read_params(str(tmp_path / "pretrained"), "init_towers_from")
    assert [s.path for s in sources] == [("image",)]
    with jax.set_mesh(mesh):
        state = trainer.init(jax.random.key(config.seed))
        params = pretrained.merge(state.params, abstract, sources)
    for got, want in zip(
        jax.tree.leaves(params["image"]), jax.tree.leaves(saved["image"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)

    config.model.image.depth = 2  # a tower of another shape is refused, naming the mismatch
    abstract = build_trainer(task, config, mesh, 264).abstract_state.params
    with pytest.raises(ConfigError, match=r"does not fit model\.image"):
        pretrained.check(task.pretrained(config, abstract), abstract)
