"""Cross-attention (queries from one sequence, keys/values from another) and the fusion layer
built on it.

Shapes follow layers.py: B batch, T query length, S context (key) length, D query width, E
context width (may differ from D), H heads, K head dim (= D // H). Masks are True where a query
may attend to a key. Parameters use the same logical axes and heads-major layouts as
`layers.Attention`, so the repository's sharding rules apply unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import decoding, layers
from mmjax.models.attention import dot_product_attention
from mmjax.models.layers import ACT_BTD, Attention, Dtype, LayerNorm, Mlp, dense, param

# Masked logit: finite (as in attention.py), so a fully masked row is uniform instead of NaN.
_MASKED = -1e30


def key_mask(valid_BS: jax.Array, t: int) -> jax.Array:
    """[B, T, S] attention mask that lets every one of `t` queries see exactly the valid keys."""
    b, s = valid_BS.shape
    return jnp.broadcast_to(valid_BS.astype(jnp.bool_)[:, None, :], (b, t, s))


def combine_masks(
    mask_BTS: jax.Array | None, context_mask_BS: jax.Array | None, t: int
) -> jax.Array | None:
    """The conjunction of a full [B, T, S] mask and a key-validity [B, S] mask (either may be
    None)."""
    if context_mask_BS is None:
        return mask_BTS
    keys_BTS = key_mask(context_mask_BS, t)
    return keys_BTS if mask_BTS is None else jnp.logical_and(mask_BTS, keys_BTS)


def attention_probs(
    q_BTHK: jax.Array, k_BSHK: jax.Array, mask_BTS: jax.Array | None, dtype: Dtype
) -> jax.Array:
    """Float32 softmax(q·kᵀ/√K) over allowed keys, [B, H, T, S]: the weights that
    `dot_product_attention` applies (same dtype handling), materialised for visualisation."""
    s_BHTS = jnp.einsum(
        "BTHK,BSHK->BHTS",
        q_BTHK.astype(dtype),
        k_BSHK.astype(dtype),
        preferred_element_type=jnp.float32,
    ) * (q_BTHK.shape[-1] ** -0.5)
    if mask_BTS is not None:
        s_BHTS = jnp.where(mask_BTS[:, None], s_BHTS, _MASKED)
    return jax.nn.softmax(s_BHTS, axis=-1)


def _head_projection(
    module: nn.Module,
    name: str,
    x_BTD: jax.Array,
    num_heads: int,
    k_dim: int,
    parts: int | None,
) -> jax.Array:
    """x [B, T, D] -> [B, T, H, K] (parts=None) or [B, T, H, parts, K], with bias.

    The kernel is heads-major ([D, H, (parts,) K]) like `Attention.qkv_kernel`: flattening the
    output keeps the tensor-parallel `heads` axis outermost, so a fused k/v GEMM needs no
    resharding.
    """
    d = x_BTD.shape[-1]
    inner = (num_heads, k_dim) if parts is None else (num_heads, parts, k_dim)
    inner_axes = ("heads", "kv") if parts is None else ("heads", None, "kv")
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=0, out_axis=tuple(range(1, 1 + len(inner)))
    )
    w = param(
        module, f"{name}_kernel", init, (d, *inner), ("embed", *inner_axes), module.param_dtype
    )
    b = param(module, f"{name}_bias", nn.initializers.zeros, inner, inner_axes, module.param_dtype)
    return dense(x_BTD, w, module.dtype, bias=b)


class CrossAttention(nn.Module):
    """Multi-head attention from queries `x_BTD` to keys/values `context_BSE`.

    Separate q ([D, H, K]) and fused k/v ([E, H, 2, K]) kernels: queries and context are different
    tensors, so only k and v can share one GEMM. `mask_BTS` (full) and `context_mask_BS` (key
    validity) are combined. Returns out_BTD, or (out_BTD, probs_BHTS) with `return_attention`;
    the probabilities are float32 and zero on masked keys. With `cache_context` (decoding) the
    context's keys and values are projected once and cached (`decoding.context_keys`).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        context_BSE: jax.Array,
        mask_BTS: jax.Array | None = None,
        context_mask_BS: jax.Array | None = None,
        return_attention: bool = False,
        cache_context: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        d = x_BTD.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
        k_dim = d // self.num_heads
        q_BTHK = _head_projection(self, "q", x_BTD, self.num_heads, k_dim, None)
        q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "length", "act_heads", None))
        project = lambda: _head_projection(self, "kv", context_BSE, self.num_heads, k_dim, 2)
        kv_BSHCK = decoding.context_keys(self, project) if cache_context else project()
        k_BSHK, v_BSHK = kv_BSHCK[:, :, :, 0], kv_BSHCK[:, :, :, 1]
        mask_BTS = combine_masks(mask_BTS, context_mask_BS, x_BTD.shape[1])
        out_BTHK = dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS, False, self.dtype)
        out_BTD = layers.attention_output(self, out_BTHK, d)
        if not return_attention:
            return out_BTD
        # Recomputed rather than returned by the attention kernel: only visualisation needs the
        # [B, H, T, S] weights, and the training path should not keep them alive.
        return out_BTD, attention_probs(q_BTHK, k_BSHK, mask_BTS, self.dtype)


class CrossBlock(nn.Module):
    """Pre-LN fusion layer (BERT/ALBEF/CoCa style): x + self_attn(ln(x)) (optionally causal),
    then x + cross_attn(ln(x), context), then x + mlp(ln(x)).

    `self_attention=False` drops the first sub-layer (a co-attention layer that has only cross-
    and feed-forward parts); `norm_context` LayerNorms the context first, for contexts that are a
    raw residual stream (another fusion stream) rather than a tower's final-LN output.
    Returns x_BTD, or (x_BTD, probs_BHTS) with `return_attention`. `cache_position`: decoding
    with key/value caches (`layers.Attention`; the context's keys and values are cached too).
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"  # see layers.ACTIVATIONS
    self_attention: bool = True
    norm_context: bool = False

    @classmethod
    def of(cls, stack: nn.Module, name: str) -> "CrossBlock":
        """A block with the widths and settings of `stack` (a module with `num_heads`,
        `mlp_dim`, `dtype`, `param_dtype` and `activation`)."""
        s = stack
        return cls(s.num_heads, s.mlp_dim, s.dtype, s.param_dtype, s.activation, name=name)

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        context_BSE: jax.Array,
        self_mask_BTT: jax.Array | None = None,
        context_mask_BS: jax.Array | None = None,
        causal: bool = False,
        cross_mask_BTS: jax.Array | None = None,
        return_attention: bool = False,
        cache_position: jax.Array | int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The residual stream runs in the compute dtype, like Encoder's.
        x_BTD = nn.with_logical_constraint(x_BTD.astype(self.dtype), ACT_BTD)
        if self.self_attention:
            h = LayerNorm(name="ln_self", **kw)(x_BTD)
            x_BTD = x_BTD + Attention(self.num_heads, name="self_attn", **kw)(
                h, self_mask_BTT, causal, cache_position
            )
        elif causal or self_mask_BTT is not None:
            raise ValueError("CrossBlock(self_attention=False) takes no self-attention mask")
        if self.norm_context:
            context_BSE = LayerNorm(name="ln_context", **kw)(context_BSE)
        h = LayerNorm(name="ln_cross", **kw)(x_BTD)
        cross = CrossAttention(self.num_heads, name="cross_attn", **kw)(
            h,
            context_BSE,
            cross_mask_BTS,
            context_mask_BS,
            return_attention,
            cache_context=cache_position is not None,
        )
        cross_BTD, probs = cross if return_attention else (cross, None)
        x_BTD = x_BTD + cross_BTD
        h = LayerNorm(name="ln_mlp", **kw)(x_BTD)
        x_BTD = x_BTD + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(h)
        x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
        return (x_BTD, probs) if return_attention else x_BTD
