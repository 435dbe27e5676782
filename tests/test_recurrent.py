"""Recurrent (LSTM/GRU) text tower: padding never changes its outputs, the backward direction is
the forward recurrence over the reversed real tokens, the scan keeps the program size flat in
the text length, sharded = single device, and a classifier / two-tower step through it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fusion as fusion_config
from mmjax import config as base_config
from mmjax import parallel
from mmjax.errors import ConfigError
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.models.recurrent import RecurrentTextTower, real_lengths
from mmjax.models.two_tower import build_two_tower, validate_towers
from tests.conftest import tiny

# Two sentences (BOS ... EOT) and the same ones with more padding.
SHORT = np.array([[1, 5, 6, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]], np.int32)
LONG = np.pad(SHORT, ((0, 0), (0, 5)))


def tower(kind, bidirectional, width=8, depth=2, **kw):
    return RecurrentTextTower(
        kind=kind, vocab_size=20, width=width, depth=depth, bidirectional=bidirectional, **kw
    )


@functools.cache
def params(kind, bidirectional):
    return jax.jit(tower(kind, bidirectional).init)(jax.random.key(0), SHORT)


@functools.cache
def jitted(kind, bidirectional, depth=2, dtype=jnp.float32):
    return jax.jit(tower(kind, bidirectional, depth=depth, dtype=dtype).apply)


def test_real_lengths_stop_at_the_first_eot_or_the_last_non_pad():
    tokens = jnp.array([[1, 4, 2, 4, 0], [1, 0, 4, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(real_lengths(tokens, 0, 2), [3, 3, 0])
    np.testing.assert_array_equal(real_lengths(tokens, 0, None), [4, 3, 0])


# Bidirectional only: its forward half is the unidirectional tower (same cell, same lengths).
@pytest.mark.parametrize("kind, bidirectional", [("lstm", True), ("gru", True)])
def test_padding_never_changes_the_outputs(kind, bidirectional):
    p = params(kind, bidirectional)
    pooled, tokens = jitted(kind, bidirectional)(p, SHORT)
    pooled_long, tokens_long = jitted(kind, bidirectional)(p, LONG)
    assert pooled.shape == (2, 8) and tokens.shape == (2, 8, 8)
    np.testing.assert_array_equal(pooled, pooled_long)
    np.testing.assert_array_equal(tokens, tokens_long[:, :8])
    assert np.all(np.asarray(tokens_long)[1, 3:] == 0)  # zero at padding
    # bf16 compute: outputs in bf16, within bf16 rounding of float32.
    pooled16, _ = jitted(kind, bidirectional, dtype=jnp.bfloat16)(p, SHORT)
    assert pooled16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(pooled16, np.float32), pooled, atol=3e-2)


@pytest.mark.parametrize("kind", ["lstm"])
def test_backward_half_is_the_forward_recurrence_over_the_reversed_real_tokens(kind):
    """One bidirectional layer: its backward parameters run forward on each row's real tokens
    reversed give the backward half (pooled and per token, in reversed order)."""
    p = nn.unbox(params(kind, True))["params"]
    pooled, tokens = jitted(kind, True, depth=1)({"params": p}, SHORT)
    uni = {"params": {"token_embedding": p["token_embedding"]}}
    uni["params"]["layer0_forward"] = p["layer0_backward"]
    # 4 units (one direction's); the reversed row starts with its EOT: count every real token.
    forward_only = tower(kind, False, width=4, depth=1, embed_dim=8, eot_id=None)
    lengths = np.asarray(real_lengths(SHORT, 0, 2))
    for row, n in enumerate(lengths):
        reversed_row = SHORT[row : row + 1, :n][:, ::-1]
        ref_pooled, ref_tokens = forward_only.apply(uni, reversed_row)
        np.testing.assert_allclose(pooled[row, 4:], ref_pooled[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tokens[row, :n, 4:], ref_tokens[0, ::-1], rtol=1e-5, atol=1e-6)


def test_scan_keeps_the_program_flat_in_the_text_length():
    """The lowered program for 128 tokens is about as large as for 16: one compiled step."""
    model = tower("lstm", True)
    p = params("lstm", True)

    def size(length):
        tokens = jnp.zeros((2, length), jnp.int32)
        return len(jax.jit(model.apply).lower(p, tokens).as_text())

    short, long = size(16), size(128)
    assert long < 1.05 * short, (short, long)


@pytest.mark.multidevice
def test_sharded_equals_single_device():
    """Loss and gradients of a bidirectional LSTM on a data=2 x fsdp=2 x tensor=2 mesh equal
    the single-device ones (the hidden units shard over `tensor`)."""
    model = tower("lstm", True, depth=1)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([SHORT, SHORT[:, ::-1] % 7 + 3])
    cot = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)

    def loss(p, tokens):
        pooled, out = model.apply({"params": p}, tokens)
        return jnp.sum(pooled * cot) + jnp.sum(out**2)

    init = lambda k: nn.unbox(model.init(k, tokens))["params"]
    key = jax.random.key(0)
    grad = jax.jit(jax.value_and_grad(loss))
    single = grad(jax.jit(init)(key), tokens)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    rules = tuple(base_config.get_config().rules)
    abstract = jax.eval_shape(lambda k: model.init(k, tokens)["params"], key)
    shardings = parallel.logical_shardings(
        nn.unbox(abstract), nn.get_partition_spec(abstract), mesh, rules
    )
    p = jax.jit(init, out_shardings=shardings)(key)
    kernel = p["layer0_forward"]["cell"]["ii"]["kernel"]  # (embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    tokens_s = jax.device_put(tokens, parallel.batch_sharding(mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = grad(p, tokens_s)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _recurrent(config, kind, bidirectional):
    config.model.text.update(kind=kind, bidirectional=bidirectional, embed_dim=16)
    validate_towers(config)
    return config


@pytest.mark.slow  # trains two models (~11 s)
def test_classifier_and_two_tower_train_through_the_recurrent_tower():
    """A fusion classifier's gradients reach a bidirectional LSTM tower; the two-tower model
    embeds text with a GRU tower, and padding changes nothing."""
    config = _recurrent(tiny(fusion_config.get_config()), "lstm", True)
    config.model.fusion.kind = "late_concat"
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))  # 4 patches
    model = build_fusion_classifier(config, 20, num_classes=3)
    p = nn.unbox(model.init(jax.random.key(0), images, SHORT)["params"])
    p["head_kernel"] = jax.random.normal(jax.random.key(2), p["head_kernel"].shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images, SHORT) ** 2)))(p)
    assert p["text"]["token_embedding"].shape == (20, 16)
    assert float(jnp.linalg.norm(grads["text"]["token_embedding"])) > 0
    clip = build_two_tower(_recurrent(tiny(base_config.get_config()), "gru", False), 20)
    v = clip.init(jax.random.key(0), images, SHORT)
    _, txt, _ = jax.jit(clip.apply)(v, images, SHORT)
    _, txt_long, _ = jax.jit(clip.apply)(v, images, LONG)
    assert txt.shape == (2, 32)
    np.testing.assert_allclose(txt, txt_long, rtol=1e-6, atol=1e-6)


def test_recurrent_settings_are_checked():
    config = tiny(base_config.get_config())
    config.model.text.bidirectional = True
    with pytest.raises(ConfigError, match="bidirectional=True is a setting of the recurrent"):
        validate_towers(config)
    config.model.text.update(kind="gru", width=33)
    with pytest.raises(ConfigError, match="width=33 is odd"):
        validate_towers(config)
    config.model.text.update(kind="rnn", width=32)
    with pytest.raises(ConfigError, match="use one of transformer, hf_bert, lstm, gru"):
        validate_towers(config)
