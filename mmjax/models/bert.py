"""BERT-family text encoder (post-LayerNorm), laid out like the rest of mmjax.

It exists so that pretrained Hugging Face BERT checkpoints (e.g. sentence-transformers' MiniLM,
loaded by `mmjax.interop.hf`) run as Flax towers with the project's sharding names, dtype policy
and GEMM/attention kernels, instead of through a second framework.

Differences from the project's own `Encoder` (pre-LN), all dictated by the checkpoints:
LayerNorm comes *after* each residual add (and after the embedding sum), its epsilon is a
config value (1e-12 for BERT), the MLP activation is named by the config (BERT's "gelu" is the
exact erf form, not the tanh approximation `layers.Mlp` uses), and there are token-type
embeddings.

`bert_from_config` builds the encoder an HF `config.json` describes (`read_config`); loading
its weights is `mmjax.interop.hf`'s.

Shapes: B batch, L text length, D width, H heads, K head dim, M MLP width.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import dot_product_attention
from mmjax.models.layers import (
    ACT_BTD,
    Attention,
    Dtype,
    LayerNorm,
    Mlp,
    attention_output,
    dense,
    embedding_table,
    param,
)

# Hugging Face `hidden_act` names -> `layers.ACTIVATIONS` names. "gelu" is exact (erf);
# "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


SUPPORTED_MODEL_TYPES = ("bert",)


def check_activation(name: str) -> None:
    """Raises naming the option when `hidden_act` is not one this module implements."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"hidden_act={name!r} is not supported; use one of {', '.join(sorted(HF_ACTIVATIONS))}"
        )


class SeparateQkvAttention(nn.Module):
    """Self-attention with three q/k/v projections (the layout of the HF checkpoints).

    Same math as `layers.Attention` (which fuses q/k/v into one GEMM and is the default); this
    form keeps q, k and v as separate parameters, for adapters or freezing that address them
    one by one.
    """

    num_heads: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BLL: jax.Array | None = None) -> jax.Array:
        d = x_BLD.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
        k_dim = d // self.num_heads
        init = nn.initializers.normal(self.init_std)
        zeros = nn.initializers.zeros
        qkv = []
        for name in ("q", "k", "v"):
            w = param(
                self,
                f"{name}_kernel",
                init,
                (d, self.num_heads, k_dim),
                ("embed", "heads", "kv"),
                self.param_dtype,
            )
            b = param(
                self,
                f"{name}_bias",
                zeros,
                (self.num_heads, k_dim),
                ("heads", "kv"),
                self.param_dtype,
            )
            qkv.append(dense(x_BLD, w, self.dtype, bias=b))
        q_BLHK, k_BLHK, v_BLHK = qkv
        q_BLHK = nn.with_logical_constraint(q_BLHK, ("batch", "length", "act_heads", None))
        out_BLHK = dot_product_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL, False, self.dtype)
        return attention_output(self, out_BLHK, d, init)


class PostNormResidual(nn.Module):
    """LayerNorm(x + f(x)) with the residual add in float32 (BERT's sublayer wrapper).

    The add is done in float32 because LayerNorm reads float32 anyway: rounding the sum to
    bfloat16 first would only add error.
    """

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, y_BLD: jax.Array) -> jax.Array:
        sum_BLD = x_BLD.astype(jnp.float32) + y_BLD.astype(jnp.float32)
        out_BLD = LayerNorm(
            dtype=self.dtype, param_dtype=self.param_dtype, epsilon=self.epsilon, name="ln"
        )(sum_BLD)
        return nn.with_logical_constraint(out_BLD, ACT_BTD)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    fused_qkv: bool = True
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_BLL: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.fused_qkv:
            attn = Attention(self.num_heads, name="attn", **kw)
        else:
            attn = SeparateQkvAttention(self.num_heads, self.init_std, name="attn", **kw)
        x_BLD = PostNormResidual(self.layer_norm_eps, name="post_attn", **kw)(
            x_BLD, attn(x_BLD, mask_BLL)
        )
        check_activation(self.hidden_act)
        mlp = Mlp(self.mlp_dim, activation=HF_ACTIVATIONS[self.hidden_act], name="mlp", **kw)
        return PostNormResidual(self.layer_norm_eps, name="post_mlp", **kw)(x_BLD, mlp(x_BLD))


class BertEncoder(nn.Module):
    """Embeddings (word + absolute position + token type) -> LN -> `depth` post-LN layers.

    `attention_mask_BL` is 1 on real tokens and 0 on padding; padded keys are masked out of
    attention (padded *queries* still get outputs, as in the reference, but nothing reads them
    when pooling with `mean_pool`). Returns last_hidden_state_BLD in `dtype`.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_len: int = 512  # max_position_embeddings
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    fused_qkv: bool = True
    init_std: float = 0.02  # initializer_range, used only when training from scratch
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids_BL: jax.Array,
        attention_mask_BL: jax.Array,
        token_type_ids_BL: jax.Array | None = None,
    ) -> jax.Array:
        check_activation(self.hidden_act)
        b, length = input_ids_BL.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds max_position_embeddings {self.max_len}")
        if attention_mask_BL.shape != (b, length):
            raise ValueError(f"attention mask {attention_mask_BL.shape} != ids {(b, length)}")
        if token_type_ids_BL is None:
            token_type_ids_BL = jnp.zeros_like(input_ids_BL)
        init = nn.initializers.normal(self.init_std)
        words = embedding_table(self, "word_embedding", self.vocab_size, init, ("vocab", "embed"))
        pos = embedding_table(self, "pos_embedding", self.max_len, init)
        # The token-type table has 2 rows: an unnamed axis keeps it replicated under any rules.
        types = embedding_table(self, "type_embedding", self.type_vocab_size, init, (None, "embed"))
        # Sum in float32 (the embeddings are stored in param_dtype; LayerNorm reads float32).
        x_BLD = (
            jnp.take(words, input_ids_BL, axis=0).astype(jnp.float32)
            + pos[:length].astype(jnp.float32)[None]
            + jnp.take(types, token_type_ids_BL, axis=0).astype(jnp.float32)
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BLD = LayerNorm(epsilon=self.layer_norm_eps, name="ln_embed", **kw)(x_BLD)
        x_BLD = nn.with_logical_constraint(x_BLD, ACT_BTD)
        valid_BL = attention_mask_BL.astype(jnp.bool_)
        mask_BLL = jnp.broadcast_to(valid_BL[:, None, :], (b, length, length))
        for i in range(self.depth):
            x_BLD = BertLayer(
                self.num_heads,
                self.mlp_dim,
                self.layer_norm_eps,
                self.hidden_act,
                self.fused_qkv,
                self.init_std,
                name=f"layer{i}",
                **kw,
            )(x_BLD, mask_BLL)
        return x_BLD


def mean_pool(hidden_BLD: jax.Array, attention_mask_BL: jax.Array) -> jax.Array:
    """Mean over real tokens (sentence-transformers' mean pooling), float32 [B, D].

    Accumulated in float32 whatever the hidden dtype; the token count is clamped at 1e-9 like
    the reference, so an all-padding row gives zeros instead of NaN.
    """
    # An element-wise product and sum, not an einsum: exact float32 on every backend (a GPU
    # matmul at default precision would round to TF32).
    weights_BL = attention_mask_BL.astype(jnp.float32)
    total_BD = jnp.sum(hidden_BLD.astype(jnp.float32) * weights_BL[:, :, None], axis=1)
    return total_BD / jnp.maximum(jnp.sum(weights_BL, axis=1, keepdims=True), 1e-9)


class BertTextTower(nn.Module):
    """A BERT encoder as a two-tower text tower: mean-pooled over non-pad tokens (the
    sentence-transformers pooling), returning (pooled_BD, hidden_BLD) like `TextTransformer`.

    `frozen=True` cuts the gradient at the tower's output (LiT): no backward pass runs through
    the encoder, and its parameters get zero gradients.
    """

    bert: BertEncoder
    pad_id: int = 0
    frozen: bool = False

    @property
    def width(self) -> int:
        return self.bert.width

    @nn.compact
    def __call__(self, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        mask_BL = (tokens_BL != self.pad_id).astype(jnp.int32)
        hidden_BLD = self.bert(tokens_BL, mask_BL)
        if self.frozen:
            hidden_BLD = jax.lax.stop_gradient(hidden_BLD)
        return mean_pool(hidden_BLD, mask_BL).astype(hidden_BLD.dtype), hidden_BLD


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The HF `config.json` of a model folder."""
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def bert_from_config(
    config: Mapping[str, Any],
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    fused_qkv: bool = True,
) -> BertEncoder:
    """A BertEncoder for an HF `config.json` dict; raises naming any option it cannot honour."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"position_embedding_type={position_type!r} is not supported; only 'absolute' is"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if config.get(flag, False):
            raise ValueError(f"{flag}=True is not supported: BertEncoder is an encoder only")
    check_activation(config.get("hidden_act", "gelu"))
    width, heads = config["hidden_size"], config["num_attention_heads"]
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    return BertEncoder(
        vocab_size=config["vocab_size"],
        width=width,
        depth=config["num_hidden_layers"],
        num_heads=heads,
        mlp_dim=config["intermediate_size"],
        max_len=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_act=config.get("hidden_act", "gelu"),
        fused_qkv=fused_qkv,
        init_std=config.get("initializer_range", 0.02),
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype),
    )
