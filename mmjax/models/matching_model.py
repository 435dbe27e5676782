"""ALBEF-style image–text model: a two-tower contrastive model, a cross-attention fusion over its
towers' tokens, and two heads on the fused text stream: image–text matching (match / no match)
and masked language modelling conditioned on the image."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmjax.models.fusion import build_fusion
from mmjax.models.fusion_classifier import fusion_kwargs
from mmjax.models.layers import Dtype, LayerNorm, dense, param
from mmjax.models.two_tower import TwoTower, build_two_tower


class MatchingModel(nn.Module):
    """A `TwoTower` that shares this module's scope (`nn.share_scope`: its parameters keep a
    two-tower model's paths, see `coca.CoCa`), a fusion and the ITM and MLM heads.

    Methods (call through `model.apply(..., method=...)`):

    embed(images, tokens) -> (img_emb_BE, txt_emb_BE, img_BND, txt_BLD, logit_scale):
        L2-normalised float32 contrastive embeddings, the towers' token streams and exp(scale);
    text_tokens(tokens) -> txt_BLD: the text tower alone (e.g. on masked text);
    fuse(img_BND, txt_BLD, text_valid_BL) -> FusionOutput (text stream attends to the image);
    itm_logits(pooled_BD) -> [B, 2] float32 (class 1 = match);
    mlm_logits(fused_BLD) -> [B, L, V] float32.
    """

    two_tower: TwoTower
    fusion: nn.Module
    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        nn.share_scope(self, self.two_tower)
        width = self.two_tower.text.width

        def weight(name, shape, axes, init=None):
            init = nn.initializers.lecun_normal() if init is None else init
            return param(self, name, init, shape, axes, self.param_dtype)

        zeros = nn.initializers.zeros
        self.ln_itm = LayerNorm(self.dtype, self.param_dtype)
        self.itm_kernel = weight("itm_kernel", (width, 2), ("embed", None), zeros)
        self.itm_bias = weight("itm_bias", (2,), (None,), zeros)
        self.ln_mlm = LayerNorm(self.dtype, self.param_dtype)
        self.mlm_kernel = weight("mlm_kernel", (width, self.vocab_size), ("embed", None))
        self.mlm_bias = weight("mlm_bias", (self.vocab_size,), (None,), zeros)

    def embed(self, images, tokens_BL):
        img_BE, txt_BE, aux = self.two_tower(images, tokens_BL, return_tokens=True)
        img_BND, txt_BLD = aux["image_tokens_BND"], aux["text_tokens_BLD"]
        return img_BE, txt_BE, img_BND, txt_BLD, aux["logit_scale"]

    def encode_image(self, images_BHWC):
        """The two-tower image embedding (unnormalised float32): zero-shot and retrieval."""
        return self.two_tower.encode_image(images_BHWC)

    def encode_text(self, tokens_BL):
        return self.two_tower.encode_text(tokens_BL)

    def text_tokens(self, tokens_BL):
        return self.two_tower.text(tokens_BL)[1]

    def fuse(self, img_BND, txt_BLD, text_valid_BL, return_attention: bool = False):
        return self.fusion(
            None, img_BND, None, txt_BLD, text_valid_BL, return_attention=return_attention
        )

    def itm_logits(self, pooled_BD):
        h_BD = self.ln_itm(pooled_BD)
        return dense(h_BD, self.itm_kernel, self.dtype, bias=self.itm_bias, out_dtype=jnp.float32)

    def mlm_logits(self, fused_BLD):
        h_BLD = self.ln_mlm(fused_BLD)
        b, n, d = h_BLD.shape
        logits = dense(
            h_BLD.reshape(b * n, d),
            self.mlm_kernel,
            self.dtype,
            bias=self.mlm_bias,
            out_dtype=jnp.float32,
        )
        return logits.reshape(b, n, self.vocab_size)

    def __call__(self, images, tokens_BL, text_valid_BL):
        """Every parameter in one pass (initialisation): (img_emb, txt_emb, itm, mlm)."""
        img_BE, txt_BE, img_BND, txt_BLD, _ = self.embed(images, tokens_BL)
        fused = self.fuse(img_BND, txt_BLD, text_valid_BL)
        return (
            img_BE,
            txt_BE,
            self.itm_logits(fused.pooled_BD),
            self.mlm_logits(fused.text_tokens_BLD),
        )


def build_matching_model(
    config: ml_collections.ConfigDict, vocab_size: int, two_tower: TwoTower | None = None
) -> MatchingModel:
    """`two_tower` (default: the plain two-tower model of `config`), a cross-attention fusion
    (`config.model.fusion`: text layers attending to image patches, whose fused text stream
    feeds both heads), ITM and MLM heads."""
    kind = config.model.fusion.kind
    if kind != "cross_attention":
        raise ValueError(
            "task=matching needs model.fusion.kind='cross_attention' (its fused text stream "
            f"feeds the ITM and MLM heads), got {kind!r}"
        )
    if two_tower is None:
        two_tower = build_two_tower(config, vocab_size)
    return MatchingModel(
        two_tower=two_tower,
        fusion=build_fusion(kind, **fusion_kwargs(config)),
        vocab_size=vocab_size,
        dtype=jnp.dtype(config.dtype),
    )
