"""Contrastive losses against straightforward float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses


def unit_rows(rng, n, e):
    x = rng.normal(size=(n, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_softmax(img, txt, scale):
    logits = scale * img @ txt.T
    log_p_i2t = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_p_t2i = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    return -0.5 * (np.diag(log_p_i2t) + np.diag(log_p_t2i))


def reference_sigmoid(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits)), axis=1)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)


def test_softmax_matches_reference(pair):
    img, txt = pair
    got = losses.softmax_contrastive(
        jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 10.0
    )
    np.testing.assert_allclose(got, reference_softmax(img, txt, 10.0), rtol=1e-5)


def test_sigmoid_matches_reference(pair):
    img, txt = pair
    got = losses.sigmoid_contrastive(
        jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 10.0, -10.0
    )
    np.testing.assert_allclose(got, reference_sigmoid(img, txt, 10.0, -10.0), rtol=1e-5)


def naive(kind, img, txt, aux):
    return losses.contrastive_loss_sharded(
        kind, "naive", img, txt, aux["logit_scale"], aux.get("logit_bias", 0.0)
    )


@pytest.mark.parametrize("kind", losses.KINDS)
def test_permuting_the_batch_permutes_per_example_losses(pair, kind):
    img, txt = (jnp.asarray(x, jnp.float32) for x in pair)
    aux = {"logit_scale": jnp.float32(7.0), "logit_bias": jnp.float32(-3.0)}
    perm = np.random.default_rng(1).permutation(len(img))
    base = naive(kind, img, txt, aux)
    permuted = naive(kind, img[perm], txt[perm], aux)
    np.testing.assert_allclose(permuted, base[perm], rtol=1e-5)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_perfect_alignment_beats_random(pair, kind):
    img, txt = (jnp.asarray(x, jnp.float32) for x in pair)
    aux = {"logit_scale": jnp.float32(20.0), "logit_bias": jnp.float32(-10.0)}
    aligned = jnp.mean(naive(kind, img, img, aux))
    random = jnp.mean(naive(kind, img, txt, aux))
    assert aligned < random


def test_losses_are_float32_for_bf16_inputs(pair):
    img, txt = (jnp.asarray(x, jnp.bfloat16) for x in pair)
    aux = {"logit_scale": jnp.float32(10.0), "logit_bias": jnp.float32(0.0)}
    for kind in losses.KINDS:
        assert naive(kind, img, txt, aux).dtype == jnp.float32


def test_gradients_match_reference_finite_differences(pair):
    img, txt = (jnp.asarray(x, jnp.float32) for x in pair)

    def total(scale):
        return jnp.mean(losses.softmax_contrastive(img, txt, scale))

    grad = jax.grad(total)(jnp.float32(5.0))
    eps = 1e-3
    numeric = (
        reference_softmax(*pair, 5.0 + eps).mean() - reference_softmax(*pair, 5.0 - eps).mean()
    ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4)


def test_unknown_loss_is_rejected(pair):
    img, txt = (jnp.asarray(x, jnp.float32) for x in pair)
    with pytest.raises(ValueError, match="unknown loss"):
        naive("hinge", img, txt, {"logit_scale": 1.0})
