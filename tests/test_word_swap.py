"""Word-swapped negative captions (mmjax/data/word_swap.py) and how matching uses them: every
swap changes exactly one attribute of a built-in caption, English grammar stays right, the
stream of draws does not depend on the caption, and the ITM layout takes the swapped texts."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses
from mmjax.data import word_swap
from mmjax.data.builtin import shapes
from mmjax.errors import ConfigError


def _parse(caption: str) -> shapes.Attributes:
    """The attributes a canonical English caption states."""
    for attrs in _all_attributes():
        if shapes.canonical_caption(attrs) == caption:
            return attrs
    raise AssertionError(f"not a canonical caption: {caption!r}")


def _all_attributes():
    for s in range(len(shapes.SHAPES)):
        for c in range(len(shapes.COLORS)):
            for z in range(len(shapes.SIZES)):
                for p in range(len(shapes.POSITIONS)):
                    yield shapes.Attributes(s, c, z, p)


def test_a_swap_of_a_canonical_caption_changes_one_attribute_and_reaches_every_one():
    swap = word_swap.WordSwap(word_swap.vocabulary("shapes"))
    rng = np.random.default_rng(0)
    changed = set()
    for attrs in list(_all_attributes())[::7]:
        new = _parse(swap(shapes.canonical_caption(attrs), rng))  # grammatical: "an orange"
        diff = [f for f in shapes.Attributes._fields if getattr(new, f) != getattr(attrs, f)]
        assert len(diff) == 1
        changed.add(diff[0])
    assert changed == set(shapes.Attributes._fields)


def test_articles_capitals_and_chinese_phrases_survive_a_swap():
    swap = word_swap.WordSwap(word_swap.vocabulary("shapes"))
    rng = np.random.default_rng(1)
    for _ in range(40):
        words = swap("an orange circle", rng).split()
        assert words[0] == ("an" if words[1][0] in "aeiou" else "a"), words
        assert swap("In the top left corner, a star", rng)[0].isupper()
    # "大" (large) inside "中等大小" (medium) is not a size of its own: phrases swap whole.
    caption = "左上方有一个中等大小的红色三角形"
    phrases = ("左上方", "中等大小", "红色", "三角形")
    groups = (shapes.POSITIONS_ZH, shapes.SIZES_ZH, shapes.COLORS_ZH, shapes.SHAPES_ZH)
    expected = {
        caption.replace(old, new)
        for old, group in zip(phrases, groups, strict=True)
        for new in group
        if new != old
    }
    seen = {swap(caption, rng) for _ in range(300)}
    assert seen == expected


def test_no_word_no_swap_and_the_draws_do_not_depend_on_the_caption():
    swap = word_swap.WordSwap(word_swap.vocabulary("shapes"))
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert swap("a dog on a sofa", a) is None
    swap("a red circle", b)
    assert a.random() == b.random()


def test_unknown_vocabulary_and_one_member_groups_are_refused():
    with pytest.raises(ConfigError, match="choose one of"):
        word_swap.vocabulary("colours")
    with pytest.raises(ValueError, match="two members"):
        word_swap.WordSwap([("red",)])


def test_swapped_texts_replace_the_mined_negative_text_where_used():
    b = 3
    neg_txt = jnp.array([1, 1, 0])  # example 1 found no negative: its pair has weight 0
    _, txt_idx, labels, weights = losses.itm_batch_indices(neg_txt, jnp.array([2, 2, 1]))
    np.testing.assert_array_equal(weights[b : 2 * b], [1, 0, 1])
    use = jnp.array([True, True, False])
    new_idx, new_w = losses.use_extra_text_negatives(txt_idx, weights, use)
    np.testing.assert_array_equal(new_idx[b : 2 * b], [3, 4, 0])  # texts B + i where used
    np.testing.assert_array_equal(new_w[b : 2 * b], [1, 1, 1])
    outside = np.r_[0:b, 2 * b : 3 * b]
    np.testing.assert_array_equal(new_idx[outside], txt_idx[outside])
    np.testing.assert_array_equal(new_w[outside], weights[outside])
    np.testing.assert_array_equal(labels[b : 2 * b], 0)


def _matching(data_dir, swap_prob):
    from configs import matching as matching_config
    from tests.conftest import tiny

    config = tiny(matching_config.on_base_towers(), data_dir)
    config.matching.swap_prob = swap_prob
    return config


def test_matching_batches_carry_swapped_captions_without_changing_the_rest(data_dir):
    """With `matching.swap_prob` the training batch gains each caption with one attribute
    swapped (drawn after everything else: images, captions and seeds are those of a run
    without it), and the ITM loss reads them."""
    import jax

    from mmjax.data.tokenizers import ByteTokenizer
    from mmjax.tasks import get_task
    from tests.test_stateful_composed import parts

    task = get_task("matching")
    off, on = (next(iter(task.train_iterator(_matching(data_dir, p), 0, 1))) for p in (0, 1))
    assert "swap_tokens" not in off
    for key in off:
        np.testing.assert_array_equal(off[key], on[key])
    decode = ByteTokenizer(_matching(data_dir, 1).data.text_length).decode
    swap = word_swap.WordSwap(word_swap.vocabulary("shapes"))
    for row, used in zip(range(len(on["tokens"])), on["swap_use"], strict=True):
        caption, swapped = decode(on["tokens"][row]), decode(on["swap_tokens"][row])
        has_word = swap(caption, np.random.default_rng(0)) is not None
        assert bool(used) == has_word and (swapped != caption) == has_word
    assert on["swap_use"].mean() > 0.5

    config = _matching(data_dir, 1)
    _, _, objective, params, _ = parts(config)
    # Away from the initialisation, whose ITM head gives every pair the logits (0, 0).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)
    batch = {k: v[:, : config.data.text_length] if v.ndim == 2 else v for k, v in on.items()}
    batch["image"] = batch["image"].astype(np.float32)
    loss = jax.jit(lambda b: objective(params, b)[1]["train/loss/itm"])
    with_swaps = loss(batch)
    without = loss({**batch, "swap_use": np.zeros_like(batch["swap_use"])})
    assert np.isfinite(with_swaps) and with_swaps != without
