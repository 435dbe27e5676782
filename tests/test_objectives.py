"""The objectives in `mmjax.objectives` against numpy references and their defining properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses as obj
from mmjax.losses import mlm


def _rows(seed, b=8, e=6):
    return np.random.default_rng(seed).normal(size=(b, e)).astype(np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- adversarial --------------------------------------------------------------------------------


def test_gradient_reversal_identity_forward_and_reversed_backward():
    x = jnp.asarray(_rows(0))
    lam = 0.3
    f = lambda y: jnp.sum(jnp.sin(y) * y**2)
    np.testing.assert_array_equal(obj.gradient_reversal(x, lam), x)
    g_plain = jax.grad(f)(x)
    g_rev = jax.jit(jax.grad(lambda y, s: f(obj.gradient_reversal(y, s))))(x, lam)
    np.testing.assert_allclose(g_rev, -lam * g_plain, rtol=1e-6, atol=1e-7)
    # lam itself gets no gradient, and bf16 cotangents keep their dtype.
    g_lam = jax.grad(lambda s: f(obj.gradient_reversal(x, s)))(jnp.float32(0.5))
    assert g_lam == 0.0
    xb = x.astype(jnp.bfloat16)
    gb = jax.grad(lambda y: jnp.sum(obj.gradient_reversal(y, 2.0).astype(jnp.float32)))(xb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gb, np.float32), -2.0)


def test_modality_discriminator_loss_and_dann_lambda():
    zi = jnp.asarray([2.0, -1.0, 0.0])
    zt = jnp.asarray([-3.0, 0.5, 0.0])
    got = jax.jit(obj.modality_discriminator_loss)(zi, zt)
    sig = lambda z: 1 / (1 + np.exp(-np.asarray(z, np.float64)))
    want = 0.5 * (-np.log(sig(zi)) - np.log(1 - sig(zt)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[2], np.log(2.0), rtol=1e-6)  # chance level
    # Through the reversal the encoder moves to *increase* the discriminator's loss.
    feats = jnp.asarray([[1.0], [2.0]])
    disc = lambda f: f[:, 0]
    loss = lambda f: jnp.mean(
        obj.modality_discriminator_loss(disc(obj.gradient_reversal(f[:1], 1.0)), disc(f[1:]))
    )
    assert jax.grad(loss)(feats)[0, 0] > 0  # plain BCE gradient for image logit is negative
    np.testing.assert_allclose(obj.dann_lambda(0.0), 0.0, atol=1e-7)
    lams = jax.jit(jax.vmap(obj.dann_lambda))(jnp.linspace(0, 1, 5))
    assert np.all(np.diff(lams) > 0) and 0.99 < lams[-1] < 1.0


# --- distillation -------------------------------------------------------------------------------


def _logits(seed, b=8):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, b)) * 3, jnp.float32)


def test_similarity_kd_zero_for_equal_positive_otherwise_and_reference():
    s, t = _logits(1), _logits(2)
    kd = jax.jit(obj.similarity_kd_loss)
    np.testing.assert_allclose(kd(s, s, 2.0), 0.0, atol=1e-7)
    got = kd(s, t, 2.0)
    assert np.all(got > 0)

    def kl(p_logits, q_logits, axis):
        lp = p_logits - np.log(np.exp(p_logits).sum(axis, keepdims=True))
        lq = q_logits - np.log(np.exp(q_logits).sum(axis, keepdims=True))
        return (np.exp(lp) * (lp - lq)).sum(axis)

    s64, t64 = np.asarray(s, np.float64) / 2, np.asarray(t, np.float64) / 2
    want = 4.0 * 0.5 * (kl(t64, s64, 1) + kl(t64, s64, 0))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_similarity_kd_teacher_gets_no_gradient_and_mask():
    s, t = _logits(3), _logits(4)
    g_s, g_t = jax.grad(lambda a, b: jnp.sum(obj.similarity_kd_loss(a, b, 1.5)), (0, 1))(s, t)
    assert np.all(g_t == 0) and np.any(g_s != 0)
    # A masked example equals dropping it from the batch, and gradients stay finite.
    mask = jnp.asarray([True] * 6 + [False] * 2)
    got = obj.similarity_kd_loss(s, t, 1.5, mask_B=mask)
    np.testing.assert_allclose(got[:6], obj.similarity_kd_loss(s[:6, :6], t[:6, :6], 1.5), 1e-5)
    np.testing.assert_array_equal(got[6:], 0.0)
    g = jax.grad(lambda a: jnp.sum(obj.similarity_kd_loss(a, t, 1.5, mask_B=mask)))(s)
    assert np.all(np.isfinite(g)) and np.all(g[6:] == 0) and np.all(g[:, 6:] == 0)


def test_embedding_distill_loss():
    s, t = jnp.asarray(_rows(5)), jnp.asarray(_rows(6))
    for kind in ("cosine", "mse"):
        fn = jax.jit(functools.partial(obj.embedding_distill_loss, kind=kind))
        np.testing.assert_allclose(fn(s, s), 0.0, atol=1e-6)
        assert np.all(jax.grad(lambda b, fn=fn: jnp.sum(fn(s, b)))(t) == 0)
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    np.testing.assert_allclose(
        obj.embedding_distill_loss(s, t, "cosine"),
        1 - (_unit(s64) * _unit(t64)).sum(1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        obj.embedding_distill_loss(s, t, "mse"), ((s64 - t64) ** 2).mean(1), rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown kind"):
        obj.embedding_distill_loss(s, t, "l1")
    with pytest.raises(ValueError, match="differ"):
        obj.embedding_distill_loss(s, t[:, :3])


# --- metric -------------------------------------------------------------------------------------


def _brute_triplet(a, p, margin, hardest):
    a, p = _unit(a.astype(np.float64)), _unit(p.astype(np.float64))
    out = np.zeros(len(a))
    for i in range(len(a)):
        pos = a[i] @ p[i]
        hinges = [max(0.0, margin - pos + a[i] @ p[j]) for j in range(len(a)) if j != i]
        out[i] = max(hinges) if hardest else sum(hinges)
    return out


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_matches_brute_force(hardest):
    # Noisy copies as positives: in some rows the positive beats every negative (so a max that
    # let the diagonal in would show), in others it does not; hinges are both active and zero.
    a = _rows(7, 16, 5)
    p = a + 0.8 * _rows(8, 16, 5)
    sim = _unit(a) @ _unit(p).T
    off = np.where(np.eye(16, dtype=bool), -np.inf, sim)
    assert 0 < np.sum(np.diag(sim) > off.max(1)) < 16
    tl = jax.jit(functools.partial(obj.triplet_loss, hardest=hardest))
    want = _brute_triplet(a, p, 0.2, hardest)
    assert 0 < np.sum(want > 0) < 16
    np.testing.assert_allclose(tl(a, p, 0.2), want, rtol=1e-5, atol=1e-6)
    bi = jax.jit(functools.partial(obj.bidirectional_triplet, hardest=hardest))
    np.testing.assert_allclose(
        bi(a, p, 0.2), want + _brute_triplet(p, a, 0.2, hardest), rtol=1e-5, atol=1e-6
    )


def test_triplet_mask_and_degenerate_batch():
    a, p = _rows(9, 10, 4), _rows(10, 10, 4)
    mask = jnp.asarray([True] * 7 + [False] * 3)
    got = obj.bidirectional_triplet(a, p, 0.2, mask_B=mask)
    np.testing.assert_allclose(
        got[:7], obj.bidirectional_triplet(a[:7], p[:7], 0.2), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(got[7:], 0.0)
    g = jax.grad(lambda x: jnp.sum(obj.bidirectional_triplet(x, p, 0.2, mask_B=mask)))(a)
    assert np.all(np.isfinite(g)) and np.all(g[7:] == 0)
    # One example: no negative, so no loss and a finite (zero) gradient.
    g1 = jax.grad(lambda x: jnp.sum(obj.triplet_loss(x, p[:1], 0.2)))(a[:1])
    assert obj.triplet_loss(a[:1], p[:1], 0.2)[0] == 0 and np.all(g1 == 0)


# --- matching -----------------------------------------------------------------------------------


def test_hard_negatives_never_positive_and_greedy_is_argmax():
    b = 12
    sim = jnp.asarray(np.random.default_rng(11).normal(size=(b, b)) * 4, jnp.float32)
    mine = jax.jit(obj.mine_hard_negatives, static_argnames=("greedy",))
    for seed in range(20):
        nt, ni = mine(sim, jax.random.key(seed), temperature=0.5)
        assert np.all(nt != np.arange(b)) and np.all(ni != np.arange(b))
        assert np.all((0 <= nt) & (nt < b)) and np.all((0 <= ni) & (ni < b))
    # Deterministic given the key, different for another key.
    a1 = mine(sim, jax.random.key(0))
    np.testing.assert_array_equal(a1[0], mine(sim, jax.random.key(0))[0])
    assert any(np.any(mine(sim, jax.random.key(k))[0] != a1[0]) for k in range(1, 5))
    nt, ni = obj.mine_hard_negatives(sim, None, greedy=True)
    s = np.asarray(sim).copy()
    np.fill_diagonal(s, -np.inf)
    np.testing.assert_array_equal(nt, s.argmax(1))
    np.testing.assert_array_equal(ni, s.argmax(0))


def test_hard_negative_sampling_follows_softmax():
    # Row 0: texts 1 and 2 have logits log 3 and 0 (others -inf-like), so P(1) = 3/4.
    sim = np.full((4, 4), -30.0, np.float32)
    sim[0, 0], sim[0, 1], sim[0, 2] = 50.0, np.log(3.0), 0.0
    keys = jax.random.split(jax.random.key(3), 4000)
    nt, _ = jax.jit(jax.vmap(lambda k: obj.mine_hard_negatives(jnp.asarray(sim), k)))(keys)
    frac = np.mean(np.asarray(nt[:, 0]) == 1)
    # Binomial(4000, 0.75): sigma = 0.0068; 5 sigma.
    assert abs(frac - 0.75) < 0.035 and np.all(np.isin(np.asarray(nt[:, 0]), [1, 2]))


def test_hard_negatives_respect_masks_and_itm_layout():
    b = 6
    sim = jnp.asarray(np.random.default_rng(12).normal(size=(b, b)), jnp.float32)
    mask = jnp.asarray([True, True, True, True, False, False])
    dup = np.zeros((b, b), bool)
    dup[0, 1] = dup[1, 0] = True  # examples 0 and 1 are the same image with two captions
    for seed in range(10):
        nt, ni = obj.mine_hard_negatives(
            sim, jax.random.key(seed), mask_B=mask, positive_BB=jnp.asarray(dup)
        )
        assert np.all(np.asarray(nt[:4]) < 4) and np.all(np.asarray(ni[:4]) < 4)
        assert nt[0] != 1 and nt[1] != 0 and ni[0] != 1 and ni[1] != 0
        np.testing.assert_array_equal(nt[4:], [4, 5])  # padded anchors: own index
    img_idx, txt_idx, labels, weights = jax.jit(obj.itm_batch_indices)(nt, ni, mask)
    assert img_idx.shape == (3 * b,)
    np.testing.assert_array_equal(labels, [1] * b + [0] * 2 * b)
    np.testing.assert_array_equal(img_idx[:b], np.arange(b))
    np.testing.assert_array_equal(txt_idx[b : 2 * b], nt)
    np.testing.assert_array_equal(img_idx[2 * b :], ni)
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0] * 3)
    # Batch of one: no candidate, negatives get weight 0.
    nt1, ni1 = obj.mine_hard_negatives(sim[:1, :1], jax.random.key(0))
    np.testing.assert_array_equal(obj.itm_batch_indices(nt1, ni1)[3], [1, 0, 0])
    feats = {"x": jnp.arange(b * 2).reshape(b, 2), "m": jnp.arange(b)}
    pi, pt = obj.take_pairs(feats, feats["m"], img_idx, txt_idx)
    np.testing.assert_array_equal(pi["m"], img_idx)
    np.testing.assert_array_equal(pi["x"][:, 0], 2 * img_idx)
    np.testing.assert_array_equal(pt, txt_idx)


def test_itm_loss_two_way_and_binary():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(9, 2)).astype(np.float32)
    labels = np.asarray([1, 0, 0] * 3)
    got = jax.jit(obj.itm_loss)(logits, labels)
    l64 = logits.astype(np.float64)
    lse = np.log(np.exp(l64).sum(1))
    np.testing.assert_allclose(got, lse - l64[np.arange(9), labels], rtol=1e-6)
    z = logits[:, 0]
    sig = 1 / (1 + np.exp(-z.astype(np.float64)))
    want = -(labels * np.log(sig) + (1 - labels) * np.log(1 - sig))
    np.testing.assert_allclose(obj.itm_loss(z, labels), want, rtol=1e-5)
    w = np.asarray([1, 1, 0] * 3, np.float32)
    np.testing.assert_allclose(obj.masked_mean(got, w), (np.asarray(got) * w).sum() / 6, 1e-6)
    with pytest.raises(ValueError, match="ITM logits"):
        obj.itm_loss(jnp.zeros((9, 3)), labels)


# --- mlm ----------------------------------------------------------------------------------------

PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 3, 1000


def _sentences(b, length, seed=14):
    rng = np.random.default_rng(seed)
    toks = rng.integers(4, VOCAB, size=(b, length))
    toks[:, 0], toks[:, length // 2] = CLS, SEP
    lens = rng.integers(length // 2 + 1, length + 1, size=b)
    toks[np.arange(length)[None, :] >= lens[:, None]] = PAD
    return jnp.asarray(toks, jnp.int32)


def test_mask_tokens_rates_specials_and_targets():
    toks = _sentences(512, 128)
    fn = jax.jit(
        functools.partial(obj.mask_tokens, mask_id=MASK, vocab_size=VOCAB, special_ids=(0, 1, 2))
    )
    inputs, targets, weights = (np.asarray(a) for a in fn(toks, jax.random.key(0)))
    toks = np.asarray(toks)
    special = np.isin(toks, [PAD, CLS, SEP])
    chosen = weights == 1
    assert set(np.unique(weights)) == {0.0, 1.0}
    assert not np.any(chosen & special)
    np.testing.assert_array_equal(inputs[special], toks[special])  # specials untouched
    np.testing.assert_array_equal(inputs[~chosen], toks[~chosen])
    np.testing.assert_array_equal(targets, np.where(chosen, toks, 0))
    # Rates: n ≈ 48k eligible, k ≈ 7.3k chosen; each bound is > 5 binomial sigmas
    # (sqrt(.15*.85/n) = .0016; sqrt(.8*.2/k) = .0047; sqrt(.1*.9/k) = .0035).
    n, k = np.sum(~special), np.sum(chosen)
    assert abs(k / n - 0.15) < 0.01
    masked = inputs[chosen] == MASK
    # A random draw equals the original token with probability 1/996; it then looks "kept".
    changed = ~masked & (inputs[chosen] != toks[chosen])
    assert abs(masked.mean() - 0.8) < 0.025
    assert abs(changed.mean() - 0.1 * 995 / 996) < 0.02
    assert abs(1 - masked.mean() - changed.mean() - 0.1) < 0.02
    rand = inputs[chosen][changed]
    assert not np.any(np.isin(rand, [PAD, CLS, SEP, MASK])) and np.all(rand < VOCAB)


def test_random_regular_tokens_are_uniform_over_allowed_ids():
    excluded = np.asarray([0, 1, 5, 6, 9])
    draws = np.asarray(mlm._random_regular_tokens(jax.random.key(1), (20000,), 12, excluded))
    allowed = [2, 3, 4, 7, 8, 10, 11]
    counts = np.asarray([np.sum(draws == a) for a in allowed])
    assert counts.sum() == draws.size  # nothing outside the allowed ids
    # 20000/7 = 2857 per id, binomial sigma = 49; 5 sigma.
    assert np.all(np.abs(counts - 20000 / 7) < 250)


def test_mlm_loss_matches_hand_computation_and_is_safe_when_empty():
    rng = np.random.default_rng(15)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.asarray([[1, 4, 0], [2, 0, 3]])
    weights = np.asarray([[1, 0, 1], [0, 0, 1]], np.float32)
    nll = [
        np.log(np.exp(logits[b, i].astype(np.float64)).sum()) - logits[b, i, targets[b, i]]
        for b, i in [(0, 0), (0, 2), (1, 2)]
    ]
    got = jax.jit(obj.mlm_loss)(logits, targets, weights)
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-6)
    zero = np.zeros_like(weights)
    assert obj.mlm_loss(logits, targets, zero) == 0.0
    g = jax.grad(obj.mlm_loss)(jnp.asarray(logits), targets, zero)
    assert np.all(g == 0)


# --- multitask ----------------------------------------------------------------------------------


def test_weighted_sum_totals_logs_and_errors():
    losses = {"itm": jnp.float32(0.5), "mlm": jnp.float32(2.0), "con": jnp.float32(1.0)}
    weights = {"itm": 2.0, "mlm": 0.25, "con": 0.0}
    total, logs = jax.jit(obj.weighted_sum)(losses, weights)
    np.testing.assert_allclose(total, 1.5, rtol=1e-7)
    assert logs == {"loss/itm": 0.5, "loss/mlm": 2.0, "loss/con": 1.0}
    with pytest.raises(ValueError, match=r"without a weight \['mlm'\]"):
        obj.weighted_sum(losses, {"itm": 1.0, "con": 1.0})
    with pytest.raises(ValueError, match=r"without a loss \['typo'\]"):
        obj.weighted_sum(losses, {**weights, "typo": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        obj.weighted_sum({"a": jnp.ones(3)}, {"a": 1.0})
    g = jax.grad(lambda x: obj.weighted_sum({"a": x, "b": x**2}, {"a": 3.0, "b": 0.5})[0])(2.0)
    np.testing.assert_allclose(g, 3.0 + 2.0, rtol=1e-7)
