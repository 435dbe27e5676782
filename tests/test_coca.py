"""CoCa captioner: causal decoder, static-shape greedy / beam search, corpus BLEU-4."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import captioning
from mmjax.eval.bleu import corpus_bleu
from mmjax.models.coca import build_coca
from mmjax.models.decoding import beam_search, prefix_step
from tests.conftest import tiny

BOS, EOT, PAD = 1, 2, 0


def tiny_model():
    c = tiny(captioning.on_base_towers(), text_length=12)
    c.captioning.decoder_depth = 1
    model = build_coca(c, 264)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    tokens = jnp.array([[BOS, 40, 41, 42, EOT] + [PAD] * 7, [BOS, 50, EOT] + [PAD] * 9])
    params = nn.unbox(model.init(jax.random.key(1), images, tokens)["params"])
    return model, params, images, tokens


def test_decoder_is_causal_and_ignores_padding():
    model, params, images, tokens = tiny_model()
    _, _, _, logits = model.apply({"params": params}, images, tokens)
    assert logits.shape == (2, 12, 264) and logits.dtype == jnp.float32
    changed = tokens.at[0, 3].set(99)  # a later token must not change earlier predictions
    _, _, _, logits2 = model.apply({"params": params}, images, changed)
    np.testing.assert_allclose(logits2[0, :3], logits[0, :3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits2[0, 3], logits[0, 3])
    # The image conditions every position.
    _, _, _, logits3 = model.apply({"params": params}, images[::-1], tokens)
    assert not np.allclose(logits3[0, 0], logits[0, 0])


def toy_logits(table):
    """logits_fn whose next-token distribution depends only on the previous token."""
    table = jnp.log(jnp.asarray(table, jnp.float32))

    def fn(tokens_NL):
        return table[tokens_NL]  # [N, L, V]: row t = distribution after token t

    return fn


def test_beam_search_finds_the_sequence_greedy_misses():
    # V = 5: 0 PAD, 1 BOS, 2 EOT, 3, 4. After BOS: 3 (0.6) or 4 (0.4). After 3: EOT 0.3 or 4
    # 0.35 or 3 0.35 (greedy is myopic); after 4: EOT 0.95. Best: BOS 4 EOT = 0.38 > 0.6·0.35.
    tiny = 1e-6
    table = np.full((5, 5), tiny)
    table[BOS, 3], table[BOS, 4] = 0.6, 0.4
    table[3, EOT], table[3, 4], table[3, 3] = 0.3, 0.35, 0.35
    table[4, EOT], table[4, 3] = 0.95, 0.05
    table[EOT, EOT] = table[PAD, PAD] = 1.0
    table /= table.sum(1, keepdims=True)
    fn = prefix_step(toy_logits(table))
    greedy, greedy_score = beam_search(fn, 1, 5, 1, BOS, EOT, PAD)
    beam, beam_score = beam_search(fn, 1, 5, 3, BOS, EOT, PAD)
    assert list(beam[0]) == [BOS, 4, EOT, PAD, PAD]
    assert list(greedy[0][:2]) == [BOS, 3]
    assert float(beam_score[0]) == pytest.approx(math.log(0.4 * 0.95), rel=1e-4)
    assert float(beam_score[0]) > float(greedy_score[0])


def test_beam_of_one_is_greedy_and_sequences_end_with_eot_then_pad():
    model, params, images, _ = tiny_model()
    _, img = model.apply({"params": params}, images, method=model.image_tokens)
    fn = lambda t: model.apply({"params": params}, img, t, method=model.decoder_logits)
    tokens, _ = beam_search(prefix_step(fn), 2, 12, 1, BOS, EOT, PAD)
    # Reference greedy decoding, one position at a time in Python.
    ref = np.full((2, 12), PAD, np.int32)
    ref[:, 0] = BOS
    done = np.zeros(2, bool)
    for t in range(11):
        nxt = np.asarray(jnp.argmax(fn(jnp.asarray(ref))[:, t], -1))
        ref[:, t + 1] = np.where(done, PAD, nxt)
        done |= nxt == EOT
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    for row in np.asarray(tokens):
        if EOT in row:
            end = list(row).index(EOT)
            assert np.all(row[end + 1 :] == PAD)


def test_corpus_bleu_against_hand_computed_values():
    refs = [["a red circle on the left", "a circle"]]
    assert corpus_bleu(["a red circle on the left"], refs) == pytest.approx(1.0)
    assert corpus_bleu(["blue square"], refs) == 0.0
    # hyp "a red circle on the right" (6 words) vs closest ref length 6:
    # p1 = 5/6, p2 = 4/5, p3 = 3/4, p4 = 2/3; BP = 1.
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert corpus_bleu(["a red circle on the right"], refs) == pytest.approx(expected)
    # Clipping: "a a a a a" matches "a" once per reference occurrence (max over references).
    # Brevity: a 5-word hypothesis against a 6-word reference has BP = exp(1 - 6/5).
    hyp, ref = "a red circle on the", ["a red circle on the left"]
    assert corpus_bleu([hyp], [ref]) == pytest.approx(math.exp(1 - 6 / 5))
    with pytest.raises(ValueError):
        corpus_bleu(["x"], [])
