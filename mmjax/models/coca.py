"""CoCa-style captioner: a two-tower contrastive model plus a causal text decoder that
cross-attends to the image tokens (Yu et al. 2022), and captioning by greedy / beam-search
decoding with static shapes and key/value caches (`caption`)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmjax import model_state
from mmjax.models import decoding
from mmjax.models.causal_decoder import CausalDecoder, decode_tokens
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
    precomputed image tokens (`image_tokens(images)`); `decode_step` is one position of it with
    key/value caches, for decoding (`caption`)."""

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
        self.decoder = CausalDecoder(
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp,
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

    def _hidden(self, img_BND, tokens_BL, position=None):
        embeddings = (self.token_embedding, self.position_embedding, self.pad_id)
        return decode_tokens(self.decoder, *embeddings, img_BND, tokens_BL, position)

    def _logits(self, h_BTD):
        h_BTD = self.ln_out(h_BTD)
        b, t, d = h_BTD.shape
        logits = dense(
            h_BTD.reshape(b * t, d), self.output_kernel, self.dtype, out_dtype=jnp.float32
        )
        return logits.reshape(b, t, self.vocab_size)

    def decoder_logits(self, img_BND, tokens_BL):
        """float32 [B, L, V]: logits of the token after each position (causal: position t sees
        tokens <= t only). Padding keys are masked; the image tokens are all valid."""
        return self._logits(self._hidden(img_BND, tokens_BL))

    def decode_step(self, img_BND, tokens_BL, position):
        """float32 [B, V]: `decoder_logits(img_BND, tokens_BL)[:, position]`, computed for that
        one position from the decoder's key/value caches (apply with `decoding.apply_cached`).
        The caches must hold positions < `position` of the same tokens (the earlier calls');
        the first call (position 0) creates them, `tokens_BL.shape[1]` slots long, and projects
        the image tokens once (later calls do not read `img_BND`)."""
        return self._logits(self._hidden(img_BND, tokens_BL, position))[:, 0]

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


def caption(
    model: CoCa,
    params,
    images,
    length: int,
    beam: int,
    bos: int,
    eot: int,
    pad: int,
    cache: bool = True,
):
    """(tokens [B, length], log-probability [B]) of the best of `beam` beams for each image
    (`decoding.beam_search`; beam=1 is greedy). With `cache` each position runs the decoder on
    its one new token against key/value caches; without, the whole prefix is rerun at every
    position (the reference: the same captions, slower). `params` may carry the model's state
    (`model_state.ParamsAndState`: a BatchNorm image tower's running statistics, frozen); the
    decoder has none."""
    variables = model_state.variables(params)
    _, img_BND = model.apply(variables, images, method=CoCa.image_tokens)
    weights = variables["params"]
    return decoding.search_on_context(model, weights, img_BND, length, beam, bos, eot, pad, cache)
