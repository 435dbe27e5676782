"""Colour permutation for captions that name no colour (mmjax/data/colour_permutation.py) and
its place in the training stream."""

import importlib
import itertools

import numpy as np
import pytest

from mmjax import config as base_config
from mmjax.data import colour_permutation, pipeline, preprocess
from mmjax.errors import ConfigError
from mmjax.tasks import get_task
from mmjax.train.validate import validate_config


@pytest.mark.parametrize(
    "caption, names",
    [
        ("a large red triangle in the top left corner", True),
        ("something White on the left", True),
        ("一个红色的三角形", True),
        ("a triangle", False),
        ("the star is small", False),
        ("一个三角形", False),
        ("a credit card", False),  # "red" inside a word is no colour
    ],
)
def test_names_colour(caption, names):
    assert colour_permutation.names_colour(caption) is names


def _image(rng):
    return rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)


def test_colourless_captions_get_another_channel_order():
    rng = np.random.default_rng(0)
    image = _image(rng)
    orders = set()
    for _ in range(60):
        out = colour_permutation.permute_if_colourless(image, "a circle", 1.0, rng)
        order = [o for o in itertools.permutations(range(3)) if np.array_equal(out, image[..., o])]
        assert len(order) == 1 and order[0] != (0, 1, 2)
        orders.add(order[0])
    assert len(orders) == 5  # every other order occurs


def test_coloured_captions_and_prob_zero_keep_the_image_and_the_draws():
    image = _image(np.random.default_rng(1))
    for caption, prob in [("a red circle", 1.0), ("a circle", 0.0)]:
        rng, reference = np.random.default_rng(2), np.random.default_rng(2)
        out = colour_permutation.permute_if_colourless(image, caption, prob, rng)
        np.testing.assert_array_equal(out, image)
        reference.random(), reference.integers(5)  # the same two draws, whatever the outcome
        assert rng.random() == reference.random()


def test_training_stream_permutes_only_colourless_pairs(data_dir):
    cfg = base_config.get_config().data
    cfg.update(data_dir=data_dir, image_size=32, num_train=200, num_val=96)

    def batch(prob):
        cfg.colourless_permute_prob = prob
        it = pipeline.train_iterator(
            cfg, seed=0, global_batch_size=32, process_index=0, process_count=1, num_threads=0
        )
        b = next(it)
        pixels = (b["image"] * preprocess.IMAGE_STD + preprocess.IMAGE_MEAN) * 255.0
        return np.rint(pixels).astype(np.int32), b["tokens"]

    plain, tokens = batch(0.0)
    permuted, tokens_p = batch(1.0)
    np.testing.assert_array_equal(tokens, tokens_p)  # the caption choices do not change
    np.testing.assert_array_equal(permuted, batch(1.0)[0])  # the same permutations every run
    tok = pipeline.tokenizer_for(cfg)
    counts = {True: 0, False: 0}
    for a, b, ids in zip(plain, permuted, tokens, strict=True):
        colourless = not colour_permutation.names_colour(tok.decode(ids))
        counts[colourless] += 1
        if colourless:
            assert any(np.array_equal(b, a[..., o]) for o in colour_permutation._PERMUTATIONS)
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)
    assert counts[True] > 0 and counts[False] > 0


@pytest.mark.parametrize(
    "task, refused",
    [("default", False), ("matching", False), ("vqa", True), ("video_contrastive", True)],
)
def test_tasks_without_drawn_captions_refuse_the_setting(task, refused, tmp_path):

    config = importlib.import_module(f"configs.{task}").get_config()
    config.data.colourless_permute_prob = 0.5
    if config.init_towers_from:  # the default run's towers: validation checks they exist
        config.init_towers_from = str(tmp_path)
    if refused:
        with pytest.raises(ConfigError, match=r"colourless_permute_prob=0\.5 would do nothing"):
            validate_config(config, get_task(config.task))
    else:
        validate_config(config, get_task(config.task))
