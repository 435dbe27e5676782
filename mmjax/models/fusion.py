"""Multimodal fusion modules: combine an image and a text representation into one.

Every fusion is a linen Module with `dtype` (compute) and `param_dtype` (storage), logical axis
names on every parameter, and one call convention (see fusion_attention.py):

    out = fusion(*vit(images), *text_tower(tokens), text_valid_BL)   # -> FusionOutput

`out.pooled_BD` is the fused representation [B, D_out]; token-level fusions also return fused
tokens and (cross-attention fusions, `return_attention=True`) attention maps. Pooled-vector
fusions (late concat, GMU, tensor, low-rank) read only the two pooled vectors.
Build one by name with `build_fusion("gmu", out_dim=64)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.cross_attention import key_mask
from mmjax.models.fusion_attention import (
    BottleneckFusion,
    CoAttentionFusion,
    CrossAttentionFusion,
    Fusion,
    FusionOutput,
    Streams,
    masked_mean,
    typed_projections,
    zero_padding,
)
from mmjax.models.graph_fusion import GraphFusion
from mmjax.models.layers import ACTIVATIONS, Encoder, TowerSettings, dense, param

__all__ = [
    "ATTENTION_FUSIONS",
    "FUSIONS",
    "BottleneckFusion",
    "CoAttentionFusion",
    "CrossAttentionFusion",
    "EarlyConcatFusion",
    "Fusion",
    "FusionOutput",
    "GatedMultimodalUnit",
    "GraphFusion",
    "LateConcatFusion",
    "LowRankFusion",
    "TensorFusion",
    "build_fusion",
]

ACT_BD = ("batch", "act_embed")


class PooledFusion(Fusion):
    """A fusion of the two pooled vectors alone: `fuse_pooled(v_BD, t_BD) -> FusionOutput`."""

    reads = "pooled"

    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        return self.fuse_pooled(s.image_pooled_BD, s.text_pooled_BD)

    def fuse_pooled(self, v_BD: jax.Array, t_BD: jax.Array) -> FusionOutput:
        raise NotImplementedError


def _linear(module, name, x_BI, out_dim, axes, out_dtype=None):
    """x @ W + b with a [I, out_dim] kernel named `{name}_kernel`; float32 accumulation."""
    w = param(
        module,
        f"{name}_kernel",
        nn.initializers.lecun_normal(),
        (x_BI.shape[-1], out_dim),
        axes,
        module.param_dtype,
    )
    b = param(
        module, f"{name}_bias", nn.initializers.zeros, (out_dim,), ("norm",), module.param_dtype
    )
    return dense(x_BI, w, module.dtype, bias=b, out_dtype=out_dtype)


def _with_one(x_BI: jax.Array) -> jax.Array:
    """[x; 1] in float32: the constant keeps the unimodal terms (and a bias) inside the
    multiplicative interaction of tensor and low-rank fusion."""
    x_BI = x_BI.astype(jnp.float32)
    return jnp.concatenate([x_BI, jnp.ones((x_BI.shape[0], 1), jnp.float32)], axis=-1)


class EarlyConcatFusion(Fusion, TowerSettings):
    """Single-stream early fusion: both modalities' tokens are projected to `width`, tagged with a
    learned modality-type embedding and run through one Transformer Encoder as [image; text]
    (VisualBERT / UNITER style), padding masked out of attention. `pool` is "mean" (over valid
    tokens of both modalities) or "cls" (a learned fusion token prepended). pooled_BD: [B, width].
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "mean"

    @nn.compact
    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"EarlyConcatFusion pool must be 'mean' or 'cls', got {self.pool!r}")
        img_BND, txt_BLD = s.image_tokens_BND, s.text_tokens_BLD
        img_valid_BN, txt_valid_BL = s.image_valid_BN, s.text_valid_BL
        b, n, length = img_BND.shape[0], img_BND.shape[1], txt_BLD.shape[1]
        parts = list(typed_projections(self, img_BND, txt_BLD, self.width))
        valid = [img_valid_BN, txt_valid_BL]
        if self.pool == "cls":
            cls = param(
                self, "cls_token", nn.initializers.zeros, (self.width,), ("norm",), self.param_dtype
            )
            parts.insert(0, jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)))
            valid.insert(0, jnp.ones((b, 1), jnp.bool_))
        x_BSD, valid_BS = jnp.concatenate(parts, axis=1), jnp.concatenate(valid, axis=1)
        x_BSD = Encoder.of_tower(self)(x_BSD, key_mask(valid_BS, x_BSD.shape[1]))
        if self.pool == "cls":
            pooled_BD, x_BSD, valid_BS = x_BSD[:, 0], x_BSD[:, 1:], valid_BS[:, 1:]
        else:
            pooled_BD = masked_mean(x_BSD, valid_BS, self.dtype)
        return FusionOutput(
            pooled_BD,
            image_tokens_BND=zero_padding(x_BSD[:, :n], img_valid_BN),
            text_tokens_BLD=zero_padding(x_BSD[:, n : n + length], txt_valid_BL),
        )


class LateConcatFusion(PooledFusion):
    """Late fusion: [image_pooled; text_pooled] -> Dense(hidden_dim) -> activation ->
    Dense(out_dim). pooled_BD: [B, out_dim]."""

    hidden_dim: int
    out_dim: int
    activation: str = "gelu_tanh"  # see layers.ACTIVATIONS

    @nn.compact
    def fuse_pooled(self, v_BD: jax.Array, t_BD: jax.Array) -> FusionOutput:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        x_BI = jnp.concatenate([v_BD.astype(self.dtype), t_BD.astype(self.dtype)], axis=-1)
        # Activation on the float32 accumulator, cast once (as layers.Mlp does).
        h_BM = ACTIVATIONS[self.activation](
            _linear(self, "hidden", x_BI, self.hidden_dim, ("embed", "mlp"), jnp.float32)
        )
        h_BM = nn.with_logical_constraint(h_BM.astype(self.dtype), ("batch", "act_mlp"))
        out_BO = _linear(self, "out", h_BM, self.out_dim, ("mlp", "proj"))
        return FusionOutput(nn.with_logical_constraint(out_BO, ACT_BD))


class GatedMultimodalUnit(PooledFusion):
    """Gated Multimodal Unit (Arevalo et al. 2017): h_v = tanh(W_v v + b_v),
    h_t = tanh(W_t t + b_t), z = σ(W_z [v; t] + b_z), h = z·h_v + (1 − z)·h_t, per dimension.
    The biases (zero at init) let the gate learn a prior preference for one modality.
    pooled_BD: [B, out_dim]; the gate z is sown as intermediates/gate_BO (float32)."""

    out_dim: int

    @nn.compact
    def fuse_pooled(self, v_BD: jax.Array, t_BD: jax.Array) -> FusionOutput:
        axes, f32 = ("embed", "proj"), jnp.float32
        # The nonlinearities and the gated sum run in float32 on the GEMM accumulators.
        hv_BO = jnp.tanh(_linear(self, "image", v_BD, self.out_dim, axes, f32))
        ht_BO = jnp.tanh(_linear(self, "text", t_BD, self.out_dim, axes, f32))
        vt_BI = jnp.concatenate([v_BD.astype(self.dtype), t_BD.astype(self.dtype)], axis=-1)
        z_BO = jax.nn.sigmoid(_linear(self, "gate", vt_BI, self.out_dim, axes, f32))
        # Kept for analysis (which modality each example and dimension relies on).
        self.sow("intermediates", "gate_BO", z_BO)
        h_BO = (z_BO * hv_BO + (1.0 - z_BO) * ht_BO).astype(self.dtype)
        return FusionOutput(nn.with_logical_constraint(h_BO, ACT_BD))


class TensorFusion(PooledFusion):
    """Tensor Fusion (Zadeh et al. 2017): the flattened outer product [v; 1] ⊗ [t; 1] (all
    unimodal and bimodal interaction terms) -> linear -> out_dim.

    The product has (d_v + 1)(d_t + 1) entries, so each input is first projected (linear) to
    `rank_dim`; `rank_dim=None` uses the inputs as they are. pooled_BD: [B, out_dim].
    """

    out_dim: int
    rank_dim: int | None = 16

    @nn.compact
    def fuse_pooled(self, v_BD: jax.Array, t_BD: jax.Array) -> FusionOutput:
        if self.rank_dim is not None:
            axes = ("embed", None)
            v_BD = _linear(self, "image_proj", v_BD, self.rank_dim, axes, jnp.float32)
            t_BD = _linear(self, "text_proj", t_BD, self.rank_dim, axes, jnp.float32)
        v_BI, t_BJ = _with_one(v_BD), _with_one(t_BD)
        z_BIJ = v_BI[:, :, None] * t_BJ[:, None, :]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        w = param(
            self,
            "fusion_kernel",
            init,
            (v_BI.shape[1], t_BJ.shape[1], self.out_dim),
            (None, None, "proj"),
            self.param_dtype,
        )
        b = param(
            self, "fusion_bias", nn.initializers.zeros, (self.out_dim,), ("norm",), self.param_dtype
        )
        out_BO = dense(z_BIJ, w, self.dtype, contract=2, bias=b)
        return FusionOutput(nn.with_logical_constraint(out_BO, ACT_BD))


class LowRankFusion(PooledFusion):
    """Low-rank Multimodal Fusion (LMF, Liu et al. 2018): TensorFusion with its weight
    W[i, j, o] = Σ_r A[i, r, o]·C[j, r, o] never formed, computed as
    h = Σ_r (A_r [v; 1]) ∘ (C_r [t; 1]) + b: cost linear in the input widths instead of their
    product. pooled_BD: [B, out_dim].
    """

    out_dim: int
    rank: int = 4

    @nn.compact
    def fuse_pooled(self, v_BD: jax.Array, t_BD: jax.Array) -> FusionOutput:
        # Each factor's output has variance rank^-1/2, so the sum over rank of products of two
        # factors starts at unit variance whatever the rank.
        init = nn.initializers.variance_scaling(
            self.rank**-0.5, "fan_in", "normal", in_axis=0, out_axis=(1, 2)
        )
        projected = []
        for name, x_BD in (("image", v_BD), ("text", t_BD)):
            x_BI = _with_one(x_BD)
            factor = param(
                self,
                f"{name}_factor",
                init,
                (x_BI.shape[1], self.rank, self.out_dim),
                ("embed", None, "proj"),
                self.param_dtype,
            )
            projected.append(dense(x_BI, factor, self.dtype, out_dtype=jnp.float32))
        a_BRO, c_BRO = projected
        b = param(
            self, "fusion_bias", nn.initializers.zeros, (self.out_dim,), ("norm",), self.param_dtype
        )
        h_BO = jnp.sum(a_BRO * c_BRO, axis=1) + b.astype(jnp.float32)[None]
        return FusionOutput(nn.with_logical_constraint(h_BO.astype(self.dtype), ACT_BD))


FUSIONS: dict[str, type[Fusion]] = {
    "early_concat": EarlyConcatFusion,
    "late_concat": LateConcatFusion,
    "gmu": GatedMultimodalUnit,
    "tensor": TensorFusion,
    "low_rank": LowRankFusion,
    "cross_attention": CrossAttentionFusion,
    "co_attention": CoAttentionFusion,
    "bottleneck": BottleneckFusion,
    "graph": GraphFusion,
}


# The fusions that can return text→image attention maps (the others pool the towers, or mix
# the streams in shared self-attention, where no map says which patches a text token reads).
ATTENTION_FUSIONS = tuple(name for name, fusion in FUSIONS.items() if fusion.attention_maps)


def build_fusion(name: str, **kwargs) -> nn.Module:
    """The fusion registered as `name` (a key of FUSIONS), constructed with `kwargs`."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; use one of {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](**kwargs)
