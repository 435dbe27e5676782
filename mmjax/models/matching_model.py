"""ALBEF-style image–text model: contrastive towers, a cross-attention fusion over their tokens,
and two heads on the fused text stream: image–text matching (match / no match) and masked
language modelling conditioned on the image."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmjax.models.fusion import build_fusion
from mmjax.models.fusion_classifier import fusion_kwargs
from mmjax.models.layers import Dtype, LayerNorm, dense, param
from mmjax.models.two_tower import build_towers


class MatchingModel(nn.Module):
    """Methods (call through `model.apply(..., method=...)`):

    embed(images, tokens) -> (img_emb_BE, txt_emb_BE, img_BND, txt_BLD, logit_scale):
        L2-normalised float32 contrastive embeddings, the towers' token streams and exp(scale);
    text_tokens(tokens) -> txt_BLD: the text tower alone (e.g. on masked text);
    fuse(img_BND, txt_BLD, text_valid_BL) -> FusionOutput (text stream attends to the image);
    itm_logits(pooled_BD) -> [B, 2] float32 (class 1 = match);
    mlm_logits(fused_BLD) -> [B, L, V] float32.
    """

    image: nn.Module
    text: nn.Module
    fusion: nn.Module
    embed_dim: int
    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        def weight(name, shape, axes, init=None):
            init = nn.initializers.lecun_normal() if init is None else init
            return param(self, name, init, shape, axes, self.param_dtype)

        zeros = nn.initializers.zeros
        self.image_projection = weight(
            "image_projection", (self.image.width, self.embed_dim), ("embed", "proj")
        )
        self.text_projection = weight(
            "text_projection", (self.text.width, self.embed_dim), ("embed", "proj")
        )
        self.logit_scale = param(
            self,
            "logit_scale",
            nn.initializers.constant(math.log(1 / 0.07)),
            (),
            (),
            jnp.float32,
        )
        self.ln_itm = LayerNorm(self.dtype, self.param_dtype)
        self.itm_kernel = weight("itm_kernel", (self.text.width, 2), ("embed", None), zeros)
        self.itm_bias = weight("itm_bias", (2,), (None,), zeros)
        self.ln_mlm = LayerNorm(self.dtype, self.param_dtype)
        self.mlm_kernel = weight("mlm_kernel", (self.text.width, self.vocab_size), ("embed", None))
        self.mlm_bias = weight("mlm_bias", (self.vocab_size,), (None,), zeros)

    def embed(self, images, tokens_BL):
        img_pooled_BD, img_BND = self.image(images)
        txt_pooled_BD, txt_BLD = self.text(tokens_BL)
        img_BE = dense(img_pooled_BD, self.image_projection, self.dtype, out_dtype=jnp.float32)
        txt_BE = dense(txt_pooled_BD, self.text_projection, self.dtype, out_dtype=jnp.float32)
        unit = lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
        return unit(img_BE), unit(txt_BE), img_BND, txt_BLD, jnp.exp(self.logit_scale)

    def text_tokens(self, tokens_BL):
        return self.text(tokens_BL)[1]

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


def build_matching_model(config: ml_collections.ConfigDict, vocab_size: int) -> MatchingModel:
    """Towers of `config.model`, a cross-attention fusion (`config.model.fusion`: text layers
    attending to image patches, whose fused text stream feeds both heads), ITM and MLM heads."""
    image, text = build_towers(config, vocab_size)
    kind = config.model.fusion.kind
    if kind != "cross_attention":
        raise ValueError(
            "task=matching needs model.fusion.kind='cross_attention' (its fused text stream "
            f"feeds the ITM and MLM heads), got {kind!r}"
        )
    return MatchingModel(
        image=image,
        text=text,
        fusion=build_fusion(kind, **fusion_kwargs(config)),
        embed_dim=config.model.embed_dim,
        vocab_size=vocab_size,
        dtype=jnp.dtype(config.dtype),
    )
