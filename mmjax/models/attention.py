"""Scaled dot-product attention with low-precision matmuls in both passes.

Every matmul takes `dtype` inputs and accumulates in float32 (`preferred_element_type`); the
softmax runs in float32. Plain autodiff of such a matmul gives backward matmuls with one float32
operand (the cotangent of a float32 result), which run at float32 speed and memory; the custom
VJP here casts both operands of every backward matmul to `dtype` as well, the same contract as
`layers.dense`. With `dtype=float32` it is ordinary attention.

Shapes: B batch, T queries, S keys, H heads, K head dim.
"""

import functools

import jax
import jax.numpy as jnp

Dtype = jnp.dtype

_MASKED = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _probs(q_BTHK, k_BSHK, mask_BHTS, dtype) -> jax.Array:
    """Float32 attention weights softmax(q·k / sqrt(K)) over allowed keys."""
    scale = q_BTHK.shape[-1] ** -0.5
    s_BHTS = _einsum("BTHK,BSHK->BHTS", q_BTHK, k_BSHK, dtype) * scale
    if mask_BHTS is not None:
        s_BHTS = jnp.where(mask_BHTS, s_BHTS, _MASKED)
    return jax.nn.softmax(s_BHTS, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q_BTHK, k_BSHK, v_BSHK, mask_BHTS, dtype):
    p_BHTS = _probs(q_BTHK, k_BSHK, mask_BHTS, dtype)
    return _einsum("BHTS,BSHK->BTHK", p_BHTS, v_BSHK, dtype).astype(dtype)


def _attend_fwd(q_BTHK, k_BSHK, v_BSHK, mask_BHTS, dtype):
    p_BHTS = _probs(q_BTHK, k_BSHK, mask_BHTS, dtype)
    out_BTHK = _einsum("BHTS,BSHK->BTHK", p_BHTS, v_BSHK, dtype).astype(dtype)
    return out_BTHK, (q_BTHK, k_BSHK, v_BSHK, mask_BHTS, p_BHTS)


def _attend_bwd(dtype, residuals, g_BTHK):
    q_BTHK, k_BSHK, v_BSHK, mask_BHTS, p_BHTS = residuals
    scale = q_BTHK.shape[-1] ** -0.5
    dv_BSHK = _einsum("BHTS,BTHK->BSHK", p_BHTS, g_BTHK, dtype)
    dp_BHTS = _einsum("BTHK,BSHK->BHTS", g_BTHK, v_BSHK, dtype)
    # Softmax backward: ds = p * (dp - Σ_s p·dp), in float32. Masked entries have p = 0.
    ds_BHTS = p_BHTS * (dp_BHTS - jnp.sum(p_BHTS * dp_BHTS, axis=-1, keepdims=True)) * scale
    dq_BTHK = _einsum("BHTS,BSHK->BTHK", ds_BHTS, k_BSHK, dtype)
    dk_BSHK = _einsum("BHTS,BTHK->BSHK", ds_BHTS, q_BTHK, dtype)
    mask_ct = None if mask_BHTS is None else jnp.zeros(mask_BHTS.shape, jax.dtypes.float0)
    return (
        dq_BTHK.astype(q_BTHK.dtype),
        dk_BSHK.astype(k_BSHK.dtype),
        dv_BSHK.astype(v_BSHK.dtype),
        mask_ct,
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attend_qkv(qkv_BTHCK, mask_BHTS, dtype):
    return _attend(*_split_qkv(qkv_BTHCK), mask_BHTS, dtype)


def _split_qkv(qkv_BTHCK):
    return tuple(qkv_BTHCK[:, :, :, i] for i in range(3))


def _attend_qkv_fwd(qkv_BTHCK, mask_BHTS, dtype):
    return _attend_fwd(*_split_qkv(qkv_BTHCK), mask_BHTS, dtype)


def _attend_qkv_bwd(dtype, residuals, g_BTHK):
    # One [B, T, H, 3, K] cotangent written in one pass; autodiff of the three slices would add
    # three zero-padded copies of it instead (a transposing, converting fusion per layer that
    # cost as much as a third of the layer's backward GEMMs on CPU).
    dq_BTHK, dk_BSHK, dv_BSHK, mask_ct = _attend_bwd(dtype, residuals, g_BTHK)
    return jnp.stack([dq_BTHK, dk_BSHK, dv_BSHK], axis=3), mask_ct


_attend_qkv.defvjp(_attend_qkv_fwd, _attend_qkv_bwd)


def _mask_BHTS(mask_BTS, causal: bool, t: int, s: int):
    mask_BHTS = None if mask_BTS is None else mask_BTS[:, None]
    if causal:
        causal_11TS = jnp.tril(jnp.ones((t, s), jnp.bool_))[None, None]
        mask_BHTS = causal_11TS if mask_BHTS is None else jnp.logical_and(mask_BHTS, causal_11TS)
    return mask_BHTS


def fused_qkv_attention(
    qkv_BTHCK: jax.Array,
    mask_BTS: jax.Array | None = None,
    causal: bool = False,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """`dot_product_attention` of the fused projection [B, T, H, 3, K] (q, k, v along axis 3),
    whose gradient comes back as one tensor of that layout. Returns [B, T, H, K] in `dtype`."""
    t = qkv_BTHCK.shape[1]
    return _attend_qkv(qkv_BTHCK, _mask_BHTS(mask_BTS, causal, t, t), jnp.dtype(dtype))


def dot_product_attention(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    mask_BTS: jax.Array | None = None,
    causal: bool = False,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """softmax(q·kᵀ/√K)·v per head; `mask_BTS` is True where a query may attend to a key and
    `causal` also forbids keys after the query. Returns [B, T, H, K] in `dtype`."""
    mask_BHTS = _mask_BHTS(mask_BTS, causal, q_BTHK.shape[1], k_BSHK.shape[1])
    return _attend(q_BTHK, k_BSHK, v_BSHK, mask_BHTS, jnp.dtype(dtype))
