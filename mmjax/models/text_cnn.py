"""Sentence classification CNN over word vectors (Kim 2014): embeddings -> parallel 1-D
convolutions of several widths with ReLU -> max over time -> linear head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dtype, dense, param


class TextCNN(nn.Module):
    """tokens_BL (0 = padding) -> float32 logits [B, num_classes].

    The max over time takes only windows that start at a real word and, for sentences shorter
    than a window, the one window at position 0, so padding never changes the result. The
    embedding table is the parameter `embedding` [vocab, embed_dim]; the task writes the
    pretrained vectors into it. `freeze_embeddings` stops its gradient: words never seen in
    training keep their pretrained place next to the seen words whose classifier was learnt
    (the task also gives the table no optimizer state then)."""

    vocab_size: int
    embed_dim: int
    num_classes: int
    widths: tuple[int, ...] = (3, 4, 5)
    filters: int = 64
    freeze_embeddings: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        table = param(
            self,
            "embedding",
            nn.initializers.normal(0.1),
            (self.vocab_size, self.embed_dim),
            ("vocab", "embed"),
            self.param_dtype,
        )
        if self.freeze_embeddings:
            table = jax.lax.stop_gradient(table)
        # Padding embeds as zeros, inside the sentence length and beyond it alike.
        x_BLD = jnp.take(table, tokens_BL, axis=0).astype(self.dtype)
        x_BLD = jnp.where((tokens_BL != 0)[..., None], x_BLD, jnp.zeros((), self.dtype))
        n = tokens_BL.shape[1]
        length_B = jnp.sum(tokens_BL != 0, axis=1)
        pooled = []
        for w in self.widths:
            kernel = param(
                self,
                f"conv{w}_kernel",
                nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1)),
                (w, self.embed_dim, self.filters),
                (None, "embed", "mlp"),
                self.param_dtype,
            )
            bias = param(
                self,
                f"conv{w}_bias",
                nn.initializers.zeros,
                (self.filters,),
                ("mlp",),
                self.param_dtype,
            )
            padded_BLD = jnp.pad(x_BLD, ((0, 0), (0, w - 1), (0, 0)))  # zeros = pad embeddings
            h_BLF = jax.lax.conv_general_dilated(
                padded_BLD,
                kernel.astype(self.dtype),
                window_strides=(1,),
                padding="VALID",
                dimension_numbers=("NWC", "WIO", "NWC"),
                preferred_element_type=jnp.float32,
            )
            h_BLF = jax.nn.relu(h_BLF + bias.astype(jnp.float32)[None, None])
            start_L = jnp.arange(n)
            valid_BL = start_L[None] < jnp.maximum(length_B - w + 1, 1)[:, None]
            pooled.append(jnp.max(jnp.where(valid_BL[..., None], h_BLF, -jnp.inf), axis=1))
        h_BF = jnp.concatenate(pooled, axis=-1)
        head = param(
            self,
            "head_kernel",
            nn.initializers.lecun_normal(),
            (h_BF.shape[-1], self.num_classes),
            ("mlp", None),
            self.param_dtype,
        )
        head_bias = param(
            self, "head_bias", nn.initializers.zeros, (self.num_classes,), (None,), self.param_dtype
        )
        return dense(h_BF, head, self.dtype, bias=head_bias, out_dtype=jnp.float32)
