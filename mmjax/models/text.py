"""Transformer text tower."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Encoder, TowerSettings, embedding_table


class TextTransformer(TowerSettings):
    """Token + position embedding -> Encoder -> pooled feature.

    `tokens_BL` are int ids with `pad_id` after the end of each sequence. With `causal=True` the
    feature is taken at the first `eot_id` token (CLIP-style; the last non-pad position if a
    sequence has none); with
    `causal=False` it is the mean over non-pad tokens. Padding never influences the output: padded
    keys are masked out of attention and padded positions out of pooling.
    Returns (pooled_BD, tokens_BLD).
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_len: int
    causal: bool = True
    pad_id: int = 0
    eot_id: int = 2

    @nn.compact
    def __call__(self, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, length = tokens_BL.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the tower's max_len {self.max_len}")
        normal = nn.initializers.normal
        embedding = embedding_table(
            self, "token_embedding", self.vocab_size, normal(0.02), ("vocab", "embed")
        )
        pos = embedding_table(self, "pos_embedding", self.max_len, normal(0.01))
        x_BLD = jnp.take(embedding, tokens_BL, axis=0).astype(self.dtype)
        x_BLD = x_BLD + pos[:length].astype(self.dtype)[None]
        not_pad_BL = tokens_BL != self.pad_id
        is_eot_BL = tokens_BL == self.eot_id
        if self.causal:
            # Valid = up to the first EOT (or the last non-pad token if there is none). Not
            # `tokens != pad_id`: in CLIP's BPE vocabulary the pad id 0 is also "!".
            last_valid_B = jnp.sum(not_pad_BL, axis=1) - 1
            eot_B = jnp.where(
                jnp.any(is_eot_BL, axis=1), jnp.argmax(is_eot_BL, axis=1), last_valid_B
            )
            valid_BL = jnp.arange(length)[None, :] <= eot_B[:, None]
        else:
            valid_BL = not_pad_BL
        mask_BLL = jnp.broadcast_to(valid_BL[:, None, :], (b, length, length))
        x_BLD = Encoder.of_tower(self)(x_BLD, mask_BLL, self.causal)
        if self.causal:
            pooled_BD = jnp.take_along_axis(x_BLD, eot_B[:, None, None], axis=1)[:, 0]
        else:
            weights_BL = valid_BL.astype(jnp.float32)
            total_BD = jnp.einsum("BLD,BL->BD", x_BLD.astype(jnp.float32), weights_BL)
            pooled_BD = (total_BD / jnp.maximum(weights_BL.sum(1, keepdims=True), 1.0)).astype(
                self.dtype
            )
        return pooled_BD, x_BLD
