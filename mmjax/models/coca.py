"""CoCa-style captioner: a two-tower contrastive model plus a causal text decoder that
cross-attends to the image tokens (Yu et al. 2022), and greedy / beam-search decoding with static
shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.fusion_attention import CrossAttentionFusion
from mmjax.models.layers import Dtype, LayerNorm, dense, param
from mmjax.models.two_tower import TwoTower, build_two_tower


class CoCa(nn.Module):
    """A `TwoTower` (towers, projections, temperature and bias, and the parts its objective terms
    need) and a causal decoder on its image tokens.

    The two-tower model shares this module's scope (`nn.share_scope`), so its parameters keep
    their paths (`image/...`, `text/...`, `logit_scale`, `teacher/...`) next to the decoder's:
    towers from a contrastive run load as they are (`init_towers_from`) and the contrastive
    objective applies `two_tower` to these parameters directly.

    `__call__(images, tokens)` -> (img_emb_BE, txt_emb_BE, aux, logits_BLV): the two-tower
    outputs and teacher-forced next-token logits (position t predicts token t + 1); it creates
    every parameter at init. `decoder_logits(img_BND, tokens_BL)` runs the decoder alone on
    precomputed image tokens (`image_tokens(images)`), for decoding."""

    two_tower: TwoTower
    vocab_size: int
    max_len: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp: int
    pad_id: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        nn.share_scope(self, self.two_tower)
        width = self.two_tower.text.width

        def weight(name, shape, axes, init=None):
            init = nn.initializers.lecun_normal() if init is None else init
            return param(self, name, init, shape, axes, self.param_dtype)

        self.token_embedding = weight(
            "decoder_token_embedding",
            (self.vocab_size, width),
            ("vocab", "embed"),
            nn.initializers.normal(0.02),
        )
        self.position_embedding = weight(
            "decoder_position_embedding",
            (self.max_len, width),
            ("length", "embed"),
            nn.initializers.normal(0.01),
        )
        self.decoder = CrossAttentionFusion(
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp,
            causal=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.ln_out = LayerNorm(self.dtype, self.param_dtype)
        self.output_kernel = weight(
            "decoder_output_kernel", (width, self.vocab_size), ("embed", None)
        )

    def encode_image(self, images_BHWC):
        """The two-tower image embedding (unnormalised float32): zero-shot and retrieval."""
        return self.two_tower.encode_image(images_BHWC)

    def encode_text(self, tokens_BL):
        return self.two_tower.encode_text(tokens_BL)

    def image_tokens(self, images):
        """(pooled_BD, img_BND): the image tower's outputs."""
        return self.two_tower.image(images)

    def decoder_logits(self, img_BND, tokens_BL):
        """float32 [B, L, V]: logits of the token after each position (causal: position t sees
        tokens <= t only). Padding keys are masked; the image tokens are all valid."""
        x_BLD = jnp.take(self.token_embedding, tokens_BL, axis=0).astype(self.dtype)
        x_BLD = x_BLD + self.position_embedding[: tokens_BL.shape[1]].astype(self.dtype)[None]
        # Position 0 (BOS) is always a valid key, so no query row is ever fully masked.
        valid_BL = (tokens_BL != self.pad_id) | (jnp.arange(tokens_BL.shape[1]) == 0)[None]
        fused = self.decoder(None, img_BND, None, x_BLD, valid_BL)
        h_BLD = self.ln_out(fused.text_tokens_BLD)
        b, n, d = h_BLD.shape
        logits = dense(
            h_BLD.reshape(b * n, d), self.output_kernel, self.dtype, out_dtype=jnp.float32
        )
        return logits.reshape(b, n, self.vocab_size)

    def __call__(self, images, tokens_BL):
        img_BE, txt_BE, aux = self.two_tower(images, tokens_BL, return_tokens=True)
        img_BND = aux.pop("image_tokens_BND")
        del aux["text_tokens_BLD"]  # the decoder reads the tokens, not the text tower's output
        return img_BE, txt_BE, aux, self.decoder_logits(img_BND, tokens_BL)


def build_coca(
    config: ml_collections.ConfigDict, vocab_size: int, two_tower: TwoTower | None = None
) -> CoCa:
    """The captioner of `config`: `two_tower` (default: the plain two-tower model of `config`,
    with the loss-specific temperature and bias initialisation) and a decoder of
    `config.captioning.decoder_depth` blocks as wide as the text tower."""
    if two_tower is None:
        two_tower = build_two_tower(config, vocab_size)
    text = config.model.text
    return CoCa(
        two_tower=two_tower,
        vocab_size=vocab_size,
        max_len=config.data.text_length,
        decoder_depth=config.captioning.decoder_depth,
        decoder_heads=text.num_heads,
        decoder_mlp=text.mlp_dim,
        pad_id=text.pad_id,
        dtype=jnp.dtype(config.dtype),
    )


def beam_search(logits_fn, batch: int, length: int, beam: int, bos: int, eot: int, pad: int):
    """Beam search with static shapes. `logits_fn(tokens_NL)` -> float32 [N, L, V] next-token
    logits for N = batch·beam sequences (row b·beam + k is beam k of example b).

    Every sequence starts [BOS, PAD, ...]; at step t the token at t + 1 is chosen. A beam is
    finished once it emits EOT: it then only extends with PAD at no cost. Beams are ranked by
    their summed log-probability (no length normalisation: the captions here have similar
    lengths, and a finished beam keeps its score). The decoder is re-run on the whole prefix each
    step (no key/value cache): captions are at most `length` (≤ 64) tokens.
    Returns (tokens [batch, length] of the best beam, its log-probability [batch]).
    `beam=1` is greedy decoding.
    """
    tokens = jnp.full((batch, beam, length), pad, jnp.int32).at[:, :, 0].set(bos)
    # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
    scores = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)
    finished = jnp.zeros((batch, beam), bool)

    def step(t, carry):
        tokens, scores, finished = carry
        logits = logits_fn(tokens.reshape(batch * beam, length))[:, t]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(batch, beam, -1)
        v = logp.shape[-1]
        only_pad = jnp.where(jnp.arange(v) == pad, 0.0, -jnp.inf)
        logp = jnp.where(finished[..., None], only_pad, logp)
        total = (scores[..., None] + logp).reshape(batch, beam * v)
        scores, flat = jax.lax.top_k(total, beam)
        parent, token = flat // v, (flat % v).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        tokens = tokens.at[:, :, t + 1].set(token)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (token == eot)
        return tokens, scores, finished

    tokens, scores, _ = jax.lax.fori_loop(0, length - 1, step, (tokens, scores, finished))
    return tokens[:, 0], scores[:, 0]  # top_k keeps beams sorted: beam 0 is the best
