"""Video tasks: the moving-shapes clip and question splits, exact training streams, evaluation
counts on splits that do not fill the last eval batch, and one-step runs of both recipes."""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import video_contrastive as contrastive_config
from configs import video_qa as qa_config
from mmjax import parallel
from mmjax.data import preprocess
from mmjax.data.builtin import moving_shapes as ms
from mmjax.data.builtin.clips import QUESTION_TYPES, load_clips, load_qa
from mmjax.errors import ConfigError
from mmjax.eval import retrieval, zeroshot
from mmjax.main import train as run
from mmjax.tasks import get_task
from mmjax.tasks.video_contrastive import ZEROSHOT
from tests.conftest import tiny

RECIPES = {"video_contrastive": contrastive_config, "video_qa": qa_config}


def test_clips_and_questions_depend_only_on_seed_split_and_index():
    short, longer = load_qa("train", 5, 16, 4, 0), load_qa("train", 9, 16, 4, 0)
    np.testing.assert_array_equal(short.clips.frames, longer.clips.frames[:5])
    n = len(short)
    assert short.texts == longer.texts[:n]
    np.testing.assert_array_equal(short.labels, longer.labels[:n])
    load_clips.cache_clear()  # a fresh generation gives the same clips
    np.testing.assert_array_equal(load_clips("train", 5, 16, 4, 0).frames, short.clips.frames)
    assert not np.array_equal(load_clips("train", 5, 16, 4, 1).frames, short.clips.frames)


def test_questions_are_typed_and_answered_from_the_clip_attributes():
    qa = load_qa("validation", 40, 16, 4, 0)
    assert set(qa.groups.tolist()) == set(range(len(QUESTION_TYPES)))
    for i in range(len(qa)):
        a = qa.clips.attributes[qa.clip_of[i]]
        expected = {
            "direction": ms.DIRECTIONS[a.direction],
            "color": ms.COLORS[a.color],
            "shape": ms.SHAPES[a.shape],
            "still_color": ms.COLORS[a.distractor_color],
            "still_shape": ms.SHAPES[a.distractor_shape],
            "still_moving": "no",
        }.get(QUESTION_TYPES[qa.groups[i]])
        if expected is not None:
            assert ms.ANSWERS[qa.labels[i]] == expected, qa.texts[i]
    # The mask keeps the questions it selects, about the same clips.
    still = qa.where(qa.groups == QUESTION_TYPES.index("still_moving"))
    assert len(still) == int(np.sum(qa.groups == 6))
    assert set(still.labels) == {ms.ANSWERS.index("no")}


def all_texts():
    """Every caption and question template with every attribute value (4 draws of the random
    template choices each), and the zero-shot prompts."""
    texts = [t.format(c) for names, ts in ZEROSHOT.values() for c in names for t in ts]
    for shape, color, direction in itertools.product(
        range(len(ms.SHAPES)), range(len(ms.COLORS)), range(len(ms.DIRECTIONS))
    ):
        still = ((shape + 1) % len(ms.SHAPES), (color + 1) % len(ms.COLORS))
        attrs = ms.MotionAttributes(shape, color, 0, direction, *still)
        for seed in range(4):
            rng = np.random.default_rng(seed)
            texts += ms.captions(attrs, rng) + [q for q, _ in ms.video_qa(attrs, rng)]
    return texts


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_texts_are_never_truncated(name):
    longest = max(len(t.encode("utf-8")) for t in all_texts())
    assert longest + 2 <= RECIPES[name].get_config().data.text_length  # + BOS and EOT


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_training_stream_resumes_exactly_and_splits_over_processes(name):
    config = tiny(RECIPES[name].get_config())
    task = get_task(name)
    it = task.train_iterator(config, 0, 1)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert first["image"].shape == (16, 4, 16, 16, 3) and first["image"].dtype == np.float32
    again = task.train_iterator(config, 0, 1)
    again.set_state(state)
    for key, value in next(again).items():
        np.testing.assert_array_equal(value, second[key])
    halves = [next(task.train_iterator(config, p, 2)) for p in (0, 1)]
    for key, value in first.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


def random_params(task, config, model):
    """Gaussian parameters of the model's shapes: the evaluation tests need distinct outputs,
    not a trained or even a well-initialised model, and compiling the real initialiser takes
    ~10 s on 8 CPU devices."""
    shapes = jax.eval_shape(lambda key: task.init_variables(model, config, key), jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), nn.unbox(shapes["params"])
    )


def evaluate_once(name, num_val):
    config = tiny(RECIPES[name].get_config(), num_val=num_val)
    task = get_task(name)
    mesh = parallel.make_mesh(config.mesh)
    model = task.build_model(config, task.tokenizer(config).vocab_size)
    with jax.set_mesh(mesh):
        params = random_params(task, config, model)
        evaluate = task.evaluator(config, model, parallel.batch_sharding(mesh, tuple(config.rules)))
        return task, config, model, params, evaluate(params)


def test_contrastive_evaluation_counts_every_clip_once():
    task, config, model, params, result = evaluate_once("video_contrastive", 37)  # 32 + 5
    clips = load_clips("validation", 37, 16, 4, 0)
    tokenizer = task.tokenizer(config)

    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def encoder(method):
        return jax.jit(lambda x: model.apply({"params": params}, x, method=method))

    video = unit(encoder(model.encode_image)(preprocess.normalize(clips.frames)))
    encode_text = encoder(model.encode_text)

    def text(texts):
        return unit(encode_text(tokenizer.encode(texts)))

    # The first 384 validation clips have distinct canonical captions.
    expected = retrieval.retrieval_metrics(video, text([c[0] for c in clips.captions]), (1, 5))
    for k in (1, 5):
        assert result[f"retrieval/v2t/r{k}"] == pytest.approx(expected[f"retrieval/i2t/r{k}"])
        assert result[f"retrieval/t2v/r{k}"] == pytest.approx(expected[f"retrieval/t2i/r{k}"])
    for attribute, (names, templates) in ZEROSHOT.items():
        prompt = text(zeroshot.prompts(list(names), list(templates)))
        classes = zeroshot.class_embeddings(prompt.reshape(len(names), len(templates), -1))
        top1 = zeroshot.topk_accuracy(video, classes, clips.labels(attribute), 1)
        assert result[f"zeroshot/{attribute}/top1"] == pytest.approx(top1)
    # Validation directions cycle fastest: 37 clips hold 5 of direction 0..4, 4 of the others.
    assert result["task/chance"] == pytest.approx(5 / 37)
    assert result["task/score"] == result["zeroshot/direction/top1"]


def test_qa_evaluation_counts_every_question_once():
    task, config, model, params, result = evaluate_once("video_qa", 9)
    val = load_qa("validation", 9, 16, 4, 0)
    train = load_qa("train", config.data.num_train, 16, 4, 0)
    assert len(val) % config.eval.batch_size  # a partial last batch
    tokens = task.tokenizer(config).encode(list(val.texts))
    frames = preprocess.normalize(val.clips.frames[val.clip_of])
    logits = jax.jit(lambda x, t: model.apply({"params": params}, x, t))(frames, tokens)
    correct = np.argmax(np.asarray(logits), -1) == val.labels
    assert result["task/score"] == pytest.approx(correct.mean(), abs=1e-9)
    assert result["video_qa/accuracy"] == result["task/score"]
    # The blind baseline: each type's most frequent training answer, weighted by type counts.
    chance = 0.0
    for g, kind in enumerate(QUESTION_TYPES):
        in_type = val.groups == g
        if in_type.any():
            guess = np.bincount(train.labels[train.groups == g]).argmax()
            assert result[f"video_qa/chance_{kind}"] == pytest.approx(
                np.mean(val.labels[in_type] == guess)
            )
            chance += np.sum(val.labels[in_type] == guess) / len(val)
    assert result["task/chance"] == pytest.approx(chance)
    assert result["video_qa/chance_still_moving"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_one_step_and_reports_its_headline(name, tmp_path):
    summary = run(tiny(RECIPES[name].get_config()), str(tmp_path))
    assert summary["steps"] == 1 and np.isfinite(summary["train/loss"])
    assert summary["task/metric_name"] == get_task(name).metric_name
    assert 0.0 <= summary["task/score"] <= 1.0 and 0.0 < summary["task/chance"] < 1.0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_settings_the_video_tasks_cannot_run_fail_before_compiling(name):
    task = get_task(name)
    task.validate(tiny(RECIPES[name].get_config()))
    broken = {
        "got 'shapes'": lambda c: c.data.update(name="shapes"),
        "video.kind": lambda c: c.video.update(kind="3d"),
        "not divisible by video.tubelet_size": lambda c: c.video.update(frames=5),
        "tubelet_size=0 must be a positive": lambda c: c.video.update(tubelet_size=0),
        "stem_channels": lambda c: c.model.image.update(stem_channels=(16,)),
    }
    if name == "video_contrastive":  # it distills from a video teacher run, if given one
        broken["need a teacher"] = lambda c: c.objective.update(distill_logits=1.0)
    for message, breaks in broken.items():
        config = tiny(RECIPES[name].get_config())
        breaks(config)
        with pytest.raises(ConfigError, match=message):
            task.validate(config)
