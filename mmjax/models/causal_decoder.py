"""A causal Transformer decoder over a context (CoCa's and speech-to-text's text decoder): one
module for the teacher-forced pass of training and the cached, position-by-position pass of
decoding, and `decode_tokens`, which feeds it token ids."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.cross_attention import CrossBlock, key_mask
from mmjax.models.fusion_attention import zero_padding
from mmjax.models.layers import LayerNorm, Precision


class CausalDecoder(Precision):
    """`depth` CrossBlocks (causal self-attention, cross-attention to the context, MLP) and a
    final LayerNorm: the computation and parameters (`block{i}`, `ln_final`) of
    `CrossAttentionFusion(causal=True)`'s token stream, so a decoder trained as that fusion
    loads as it is.

    `__call__(x_BTD, context_BSE, valid_BS, cache_position=None)` -> [B, T, D], zero at invalid
    positions. `valid_BS` is True at real tokens (padding is never attended to).
    - Teacher-forced (no `cache_position`): T = S tokens, each attending to itself and the valid
      tokens before it.
    - Decoding: x_BTD are the T tokens at positions cache_position..; `valid_BS` covers all S
      positions of the decoded sequence (S fixes the cache length). Earlier positions' keys and
      values come from the caches (`decoding`), filled by earlier calls; apply with
      `decoding.apply_cached`. The first call creates the caches and projects the context once.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        context_BSE: jax.Array,
        valid_BS: jax.Array,
        cache_position: jax.Array | int | None = None,
    ) -> jax.Array:
        t = x_BTD.shape[1]
        self_mask_BTS = key_mask(valid_BS, t)
        valid_BT = valid_BS
        if cache_position is not None:
            valid_BT = jax.lax.dynamic_slice_in_dim(valid_BS, cache_position, t, axis=1)
        for i in range(self.depth):
            block = CrossBlock.of(self, f"block{i}")
            x_BTD = block(
                x_BTD, context_BSE, self_mask_BTS, causal=True, cache_position=cache_position
            )
        x_BTD = LayerNorm(self.dtype, self.param_dtype, name="ln_final")(x_BTD)
        return zero_padding(x_BTD, valid_BT)


def decode_tokens(
    decoder: CausalDecoder,
    token_embedding_VD: jax.Array,
    position_embedding_LD: jax.Array,
    pad_id: int,
    context_BSE: jax.Array,
    tokens_BL: jax.Array,
    position: jax.Array | int | None = None,
) -> jax.Array:
    """`decoder`'s output for token ids (token plus learned position embeddings, in the
    decoder's dtype): [B, L, D] teacher-forced without `position`; with it, [B, 1, D] for the
    one token at `position`, from the key/value caches (`CausalDecoder`'s decoding mode).
    Padding keys are masked, but position 0 (BOS) is always a valid key, so no query row is
    ever fully masked."""
    valid_BL = (tokens_BL != pad_id) | (jnp.arange(tokens_BL.shape[1]) == 0)[None]
    start = 0 if position is None else position
    if position is not None:
        tokens_BL = jax.lax.dynamic_slice_in_dim(tokens_BL, position, 1, axis=1)
    x_BTD = jnp.take(token_embedding_VD, tokens_BL, axis=0).astype(decoder.dtype)
    rows_TD = jax.lax.dynamic_slice_in_dim(position_embedding_LD, start, tokens_BL.shape[1])
    x_BTD = x_BTD + rows_TD.astype(decoder.dtype)[None]
    return decoder(x_BTD, context_BSE, valid_BL, cache_position=position)
