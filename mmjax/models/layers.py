"""Transformer building blocks shared by every tower.

Conventions (see DESIGN.md): B batch, T query length, S key length, D width, H heads, K head dim,
M MLP width. Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, ...); the config maps those names to mesh axes. Activations use `act_*` names so that the
rule that shards a weight's `embed` dimension over `fsdp` never shards activations the same way.

`dtype` is the compute dtype, `param_dtype` the storage dtype. Matmuls take their inputs in `dtype`
and accumulate in float32 (`preferred_element_type`), which keeps bfloat16 compute accurate and is
the fast bf16 GEMM path on CPU (bf16 element-wise work there is emulated and slow, so float32 is
the default compute dtype on CPU).
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import decoding
from mmjax.models.attention import dot_product_attention, fused_qkv_attention
from mmjax.models.gemm import dense

Dtype = Any
Initializer = Callable[..., jax.Array]

# Activation layout at block boundaries: batch sharded over the data axes, features replicated.
ACT_BTD = ("batch", "length", "act_embed")


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Dtype,
) -> jax.Array:
    """Creates a parameter annotated with logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: {len(shape)} dims but axes {axes}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def embedding_table(
    module: nn.Module,
    name: str,
    rows: int,
    init: Initializer,
    axes: Sequence[str | None] = ("length", "embed"),
) -> jax.Array:
    """A learned [rows, module.width] table in `module.param_dtype`: positions (one row each,
    the default axes) or token embeddings (axes ("vocab", "embed"))."""
    return param(module, name, init, (rows, module.width), axes, module.param_dtype)


def patch_embedding(module: nn.Module, name: str, x_BNP: jax.Array, bias: bool) -> jax.Array:
    """Flattened patches (or tubelets) [..., P] -> [..., module.width] by one GEMM: a strided
    conv as a matmul. `{name}_kernel` (LeCun normal) and, with `bias`, `{name}_bias`."""
    dtype = module.param_dtype
    init = nn.initializers.lecun_normal()
    w = param(
        module, f"{name}_kernel", init, (x_BNP.shape[-1], module.width), ("patch", "embed"), dtype
    )
    b = None
    if bias:
        b = param(module, f"{name}_bias", nn.initializers.zeros, (module.width,), ("norm",), dtype)
    return dense(x_BNP, w, module.dtype, bias=b)


def attention_output(
    module: nn.Module, out_BTHK: jax.Array, width: int, init: Initializer | None = None
) -> jax.Array:
    """The projection that merges the heads [B, T, H, K] back to [B, T, width] (`out_kernel`,
    `out_bias`), float32 accumulation. `init`: the kernel's (default fan-in normal)."""
    if init is None:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
    h, k = out_BTHK.shape[-2:]
    w = param(
        module, "out_kernel", init, (h, k, width), ("heads", "kv", "embed"), module.param_dtype
    )
    b = param(module, "out_bias", nn.initializers.zeros, (width,), ("norm",), module.param_dtype)
    return dense(out_BTHK, w, module.dtype, contract=2, bias=b)


class Precision(nn.Module):
    """Keyword-only `dtype` (compute) and `param_dtype` (storage) fields, for modules that
    subclass it (the fusions, through `TowerSettings` the towers)."""

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class TowerSettings(Precision):
    """The compute and memory settings of a module that runs an `Encoder` (the towers, early
    fusion), keyword-only and passed down as they are (`Encoder.of_tower`)."""

    _: dataclasses.KW_ONLY
    remat: str = "none"  # see REMAT_POLICIES
    scan_layers: bool = False
    activation: str = "gelu_tanh"  # see ACTIVATIONS


def _lead(v: jax.Array, like: jax.Array) -> jax.Array:
    """`v` (a bias or scale over trailing dims) in `like`'s dtype, with explicit leading axes so
    the add broadcasts under `jax_numpy_rank_promotion="raise"`."""
    return jnp.expand_dims(v, tuple(range(like.ndim - v.ndim))).astype(like.dtype)


class LayerNorm(nn.Module):
    """LayerNorm whose statistics are always computed in float32."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * _lead(scale, y) + _lead(bias, y)).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    `mask_BTS` is True where a query may attend to a key; `causal` adds the causal constraint.
    `cache_position`: decoding, causal, with a key/value cache (see `decoding.append_keys`).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        mask_BTS: jax.Array | None = None,
        causal: bool = False,
        cache_position: jax.Array | int | None = None,
    ) -> jax.Array:
        d = x_BTD.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
        k_dim = d // self.num_heads
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2, 3)
        )
        # Heads-major [D, H, 3, K] layout: flattening (H, 3, K) keeps the tensor-parallel `heads`
        # axis outermost, so the fused q/k/v GEMM needs no resharding.
        w_qkv = param(
            self,
            "qkv_kernel",
            init,
            (d, self.num_heads, 3, k_dim),
            ("embed", "heads", None, "kv"),
            self.param_dtype,
        )
        b_qkv = param(
            self,
            "qkv_bias",
            nn.initializers.zeros,
            (self.num_heads, 3, k_dim),
            ("heads", None, "kv"),
            self.param_dtype,
        )
        qkv_BTHCK = dense(x_BTD, w_qkv, self.dtype, bias=b_qkv)
        if cache_position is None:  # training and full-prefix passes: one fused tensor
            qkv_BTHCK = nn.with_logical_constraint(
                qkv_BTHCK, ("batch", "length", "act_heads", None, None)
            )
            out_BTHK = fused_qkv_attention(qkv_BTHCK, mask_BTS, causal, self.dtype)
            return attention_output(self, out_BTHK, d)
        q_BTHK, k_BSHK, v_BSHK = (qkv_BTHCK[:, :, :, i] for i in range(3))
        q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "length", "act_heads", None))
        if cache_position is not None:  # the mask returned is causal over the cache slots
            kv = decoding.append_keys(self, k_BSHK, v_BSHK, mask_BTS, causal, cache_position)
            k_BSHK, v_BSHK, mask_BTS, causal = *kv, False
        out_BTHK = dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS, causal, self.dtype)
        return attention_output(self, out_BTHK, d)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x·σ(1.702x): the GELU approximation of OpenAI's original CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU, x·Φ(x), as PyTorch writes it: 0.5·x·(1 + erf(x/√2)). `jax.nn.gelu`'s exact
    form uses erfc, which XLA expands into a piecewise polynomial with selects: on CPU about twice
    the element-wise work of erf, in a layer whose input is the MLP's widest activation."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


# MLP activations by config name. "gelu" is the exact erf form (PyTorch's and BERT's default);
# "gelu_tanh" the tanh approximation (flax's default); "quick_gelu" OpenAI CLIP's; "relu".
ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": gelu_erf,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


class Mlp(nn.Module):
    """Two-layer GELU MLP, D -> M -> D."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"  # a key of ACTIVATIONS

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        d = x_BTD.shape[-1]
        init = nn.initializers.lecun_normal()
        w_in = param(self, "in_kernel", init, (d, self.mlp_dim), ("embed", "mlp"), self.param_dtype)
        b_in = param(
            self, "in_bias", nn.initializers.zeros, (self.mlp_dim,), ("mlp",), self.param_dtype
        )
        w_out = param(
            self, "out_kernel", init, (self.mlp_dim, d), ("mlp", "embed"), self.param_dtype
        )
        b_out = param(self, "out_bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        # The activation runs on the float32 accumulator and is cast once: element-wise bf16 math is
        # emulated (slow) on CPU and no more accurate anywhere.
        h_BTM = act(dense(x_BTD, w_in, self.dtype, bias=b_in, out_dtype=jnp.float32))
        h_BTM = nn.with_logical_constraint(h_BTM.astype(self.dtype), ("batch", "length", "act_mlp"))
        return dense(h_BTM, w_out, self.dtype, bias=b_out)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        mask_BTS: jax.Array | None = None,
        causal: bool = False,
        cache_position: jax.Array | int | None = None,
    ) -> jax.Array:
        """`cache_position`: decoding with key/value caches (see `Attention`)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(name="ln_attn", **kw)(x_BTD)
        attn = Attention(self.num_heads, name="attn", **kw)
        x_BTD = x_BTD + attn(h, mask_BTS, causal, cache_position)
        h = LayerNorm(name="ln_mlp", **kw)(x_BTD)
        x_BTD = x_BTD + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x_BTD, ACT_BTD)


# Activation memory knob: what each block keeps for the backward pass. "dots" keeps the outputs of
# the 2-D GEMMs (cheap to store, expensive to recompute) and recomputes element-wise work and
# attention; "full" keeps only the block input and recomputes the whole block.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class _ScannedBlock(nn.Module):
    """One Block as an `nn.scan` body: (carry, broadcast mask) -> (carry, no output)."""

    block: Callable[..., nn.Module]
    causal: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_BTS: jax.Array | None):
        return self.block(name="block")(x_BTD, mask_BTS, self.causal), None


class Encoder(nn.Module):
    """A stack of `depth` Transformer blocks followed by a final LayerNorm.

    `remat` ("none" | "dots" | "full", see REMAT_POLICIES) trades recompute for activation memory;
    `scan_layers` runs the blocks as one `nn.scan` over stacked parameters (a leading `layers`
    axis), so compile time and program size stay constant in depth. Neither changes the outputs.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    activation: str = "gelu_tanh"

    @classmethod
    def of_tower(cls, tower: "TowerSettings", depth: int | None = None, name: str = "encoder"):
        """The encoder of a tower (any `TowerSettings` module with `depth`, `num_heads` and
        `mlp_dim`): its widths and settings, and `depth` blocks (default: the tower's)."""
        t = tower
        depth = t.depth if depth is None else depth
        settings = (t.dtype, t.param_dtype, t.remat, t.scan_layers, t.activation)
        return cls(depth, t.num_heads, t.mlp_dim, *settings, name=name)

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, mask_BTS: jax.Array | None = None, causal: bool = False
    ) -> jax.Array:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; use one of {', '.join(REMAT_POLICIES)}")
        block_cls = Block
        if self.remat != "none":
            # static_argnums counts `self`: (self, x, mask, causal) -> causal is 3.
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
        block = functools.partial(
            block_cls, self.num_heads, self.mlp_dim, self.dtype, self.param_dtype, self.activation
        )
        x_BTD = nn.with_logical_constraint(x_BTD.astype(self.dtype), ACT_BTD)
        if self.scan_layers:
            stack = nn.scan(
                _ScannedBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, _ = stack(block, causal, name="blocks")(x_BTD, mask_BTS)
        else:
            for i in range(self.depth):
                x_BTD = block(name=f"block{i}")(x_BTD, mask_BTS, causal)
        return LayerNorm(self.dtype, self.param_dtype, name="ln_final")(x_BTD)
