"""The text→image prior (DALL-E): a decoder-only Transformer over one sequence of L text tokens
followed by N image tokens (the codes of a frozen image tokenizer), trained to predict each
token from the ones before it.

One embedding table holds both vocabularies: text id i is row i, image code c is row V + c
(V the text vocabulary), and every position has a learned embedding. Two output heads: the
text head reads positions 0..L-2 (predicting text tokens 1..L-1), the image head positions
L-1..L+N-2 (predicting image codes 0..N-1). Text padding stays in the sequence as ordinary
tokens (the prompt length is fixed), it is never a target.

The blocks are `layers.Block` (causal self-attention + MLP): training runs them on the whole
sequence; sampling (`mmjax.models.image_sampling`) runs `decode` with `cache_position`, the
key/value caches of `decoding` (the same path as CoCa's captioner).

Shapes: B batch, L text length, N image tokens, T tokens of one call, S = L + N the sequence,
D width, V text vocabulary, C codebook size.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import ACT_BTD, Block, LayerNorm, Precision, dense, embedding_table, param


class TextImagePrior(Precision):
    text_vocab: int
    codebook_size: int
    text_length: int
    image_tokens: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu_tanh"

    @property
    def sequence_length(self) -> int:
        return self.text_length + self.image_tokens

    def setup(self):
        rows = self.text_vocab + self.codebook_size
        init = nn.initializers.normal(0.02)
        self.token_embedding = embedding_table(
            self, "token_embedding", rows, init, ("vocab", "embed")
        )
        self.position_embedding = embedding_table(
            self, "position_embedding", self.sequence_length, init
        )
        settings = (self.num_heads, self.mlp_dim, self.dtype, self.param_dtype, self.activation)
        self.blocks = [Block(*settings, name=f"block{i}") for i in range(self.depth)]
        self.ln_final = LayerNorm(self.dtype, self.param_dtype, name="ln_final")
        head_init = nn.initializers.normal(0.02)
        d, pd = self.width, self.param_dtype
        self.text_head = param(
            self, "text_head", head_init, (d, self.text_vocab), ("embed", "vocab"), pd
        )
        self.image_head = param(
            self, "image_head", head_init, (d, self.codebook_size), ("embed", "vocab"), pd
        )

    def sequence(self, text_BL: jax.Array, codes_BN: jax.Array) -> jax.Array:
        """The joint ids [B, L + N]: text ids, then image codes offset past the text vocabulary."""
        return jnp.concatenate([text_BL, codes_BN + self.text_vocab], axis=1).astype(jnp.int32)

    def _hidden(self, ids_BT, position, cache_position):
        t = ids_BT.shape[1]
        x_BTD = jnp.take(self.token_embedding, ids_BT, axis=0)
        pos_TD = jax.lax.dynamic_slice_in_dim(self.position_embedding, position, t, axis=0)
        x_BTD = nn.with_logical_constraint((x_BTD + pos_TD[None]).astype(self.dtype), ACT_BTD)
        mask_BTS = None
        if cache_position is not None:  # every cache slot holds a real token: causal only
            mask_BTS = jnp.ones((ids_BT.shape[0], t, self.sequence_length), jnp.bool_)
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_BTS, True, cache_position)
        return self.ln_final(x_BTD)

    def _logits(self, h_BTD, head):
        return dense(h_BTD, head, self.dtype, out_dtype=jnp.float32)

    def __call__(self, text_BL: jax.Array, codes_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced: (text logits [B, L-1, V] predicting text tokens 1.., image logits
        [B, N, C] predicting codes 0..), float32."""
        if text_BL.shape[1] != self.text_length or codes_BN.shape[1] != self.image_tokens:
            raise ValueError(
                f"the prior reads {self.text_length} text and {self.image_tokens} image tokens, "
                f"got {text_BL.shape[1]} and {codes_BN.shape[1]}"
            )
        h_BSD = self._hidden(self.sequence(text_BL, codes_BN)[:, :-1], 0, None)
        last_text = self.text_length - 1  # the position that predicts the first image token
        text_logits = self._logits(h_BSD[:, :last_text], self.text_head)
        image_logits = self._logits(h_BSD[:, last_text:], self.image_head)
        return text_logits, image_logits

    def decode(self, ids_BT: jax.Array, position: jax.Array | int) -> jax.Array:
        """Decoding with key/value caches (apply with `decoding.apply_cached`): the T joint ids
        at positions position.. -> float32 image logits [B, T, C] of the token after each. The
        first call (no cache yet) creates the caches, of the whole sequence's length."""
        return self._logits(self._hidden(ids_BT, position, position), self.image_head)

    def full_image_logits(self, ids_BS: jax.Array) -> jax.Array:
        """Without a cache: image logits [B, S, C] after every position of the joint ids (the
        whole buffer rerun; the reference cached decoding must equal)."""
        return self._logits(self._hidden(ids_BS, 0, None), self.image_head)
