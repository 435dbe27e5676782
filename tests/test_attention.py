"""Attention with a custom VJP equals reference attention; mixed precision is really mixed."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses
from mmjax.models import layers
from mmjax.models.attention import dot_product_attention, fused_qkv_attention
from mmjax.models.two_tower import build_two_tower
from tests.test_models import VOCAB, example_inputs, tiny_config


def qkv_and_mask(seed=0, b=3, t=7, h=2, k=8):
    rng = np.random.default_rng(seed)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32) for _ in range(3))
    mask = rng.random((b, t, t)) < 0.7
    mask[:, :, 0] = True  # every query keeps one key
    return q, kk, v, jnp.asarray(mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_float32_matches_reference_attention_and_gradients(causal, masked):
    q, k, v, mask = qkv_and_mask()
    mask = mask if masked else None
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def ours(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, mask, causal) * cotangent)

    def reference(q, k, v):
        m = None if mask is None else mask[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=causal)
        return jnp.sum(out * cotangent)

    # Same float32 math in another association order: 1e-5 (values are O(1)).
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5)
    for g, r in zip(
        jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(reference, (0, 1, 2))(q, k, v), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_attention_tracks_float32():
    q, k, v, mask = qkv_and_mask(seed=2)
    ref = dot_product_attention(q, k, v, mask, True)
    low = dot_product_attention(q, k, v, mask, True, jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: inputs and output rounding give ~1e-2 absolute on O(1) values.
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=3e-2)
    g_ref = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, mask, True)))(q)
    g_low = jax.grad(
        lambda q: jnp.sum(dot_product_attention(q, k, v, mask, True, jnp.bfloat16)).astype(
            jnp.float32
        )
    )(q)
    assert np.linalg.norm(g_low - g_ref) < 0.05 * np.linalg.norm(g_ref)


def _dot_generals(jaxpr):
    """(lhs dtype, rhs dtype, out dtype, precision) of every dot_general, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dtypes = [str(x.aval.dtype) for x in (*eqn.invars, eqn.outvars[0])]
            found.append((*dtypes, eqn.params.get("precision")))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_generals(sub)
    return found


def test_bfloat16_towers_run_every_matmul_in_bf16_with_f32_accumulation():
    """Forward and backward of both towers: every matmul takes bf16 inputs and produces float32
    (preferred_element_type); the loss's logits are float32 at HIGHEST precision."""
    config = tiny_config("bfloat16")
    model = build_two_tower(config, VOCAB)
    images, tokens = example_inputs()
    params = nn.unbox(model.init(jax.random.key(0), images, tokens))["params"]

    def loss(p):
        img, txt, aux = model.apply({"params": p}, images, tokens)
        return jnp.mean(losses.softmax_contrastive(img, txt, aux["logit_scale"]))

    dots = _dot_generals(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    tower = [d for d in dots if d[3] is None]
    logits = [d for d in dots if d[3] is not None]
    assert logits and all(d[:3] == ("float32", "float32", "float32") for d in logits)
    assert len(tower) > 50  # 2 towers × 2 blocks × (qkv, scores, values, out, 2 mlp) × 3 passes
    assert all(d[:3] == ("bfloat16", "bfloat16", "float32") for d in tower), set(tower)
    grads = jax.grad(loss)(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_attention_equals_separate_attention_and_gradients(dtype, causal):
    """The fused projection's attention (one [B, T, H, 3, K] input, one cotangent of that
    layout) is the same function as attention on the three slices, in value and gradient:
    exactly, since the same operations run in the same order."""
    q, k, v, mask = qkv_and_mask(seed=2)
    qkv = jnp.stack([q, k, v], axis=3).astype(dtype)
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def fused(qkv):
        out = fused_qkv_attention(qkv, mask, causal, dtype)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    def separate(qkv):
        q, k, v = (qkv[:, :, :, i] for i in range(3))
        out = dot_product_attention(q, k, v, mask, causal, dtype)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    np.testing.assert_array_equal(jax.jit(fused)(qkv), jax.jit(separate)(qkv))
    g_fused, g_separate = jax.jit(jax.grad(fused))(qkv), jax.jit(jax.grad(separate))(qkv)
    assert g_fused.shape == qkv.shape and g_fused.dtype == qkv.dtype
    np.testing.assert_array_equal(
        np.asarray(g_fused, np.float32), np.asarray(g_separate, np.float32)
    )


def _dot_operand_types(compiled_text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in a compiled CPU program, inside fusions too."""
    types = {}  # instruction or parameter name -> element type, per computation (names repeat,
    pairs = []  # but a dot's operands are defined in its own computation, just above it)
    for line in compiled_text.splitlines():
        for name, dtype in re.findall(r"(%?[\w.\-]+): (\w+)\[", line):  # computation params
            types[name.lstrip("%")] = dtype
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r"= \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if d:
            pairs.append((types.get(d.group(1)), types.get(d.group(2))))
    return pairs


def test_bfloat16_dense_backward_gemms_stay_bf16_after_xla_cpu_passes():
    """The weight gradient xᵀ·g contracts x over its rows, a dot XLA's CPU GEMM library rejects:
    XLA then upcasts it to float32 (a third of the speed). `layers.dense` hands it a transposed
    copy of x instead. Checked on the compiled program, where the upcast would show."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(96, 128)), jnp.float32)

    def loss(x, w):
        return jnp.sum(layers.dense(x, w, jnp.bfloat16, out_dtype=jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    pairs = _dot_operand_types(compiled.as_text())
    assert len(pairs) == 3, pairs  # forward, dx, dw
    assert all(p == ("bf16", "bf16") for p in pairs), pairs
