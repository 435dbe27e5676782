"""DALL-E: the frozen image tokenizer (a `vqvae.VQVAE`) and the text→image prior over its
codes, as one model: parameters `tokenizer/...` (loaded from the tokenizer's run and never
updated: `Task.frozen_prefixes`) and `prior/...` (trained).

The codes of the training images are computed on the fly, inside the jitted step, by the frozen
encoder (`__call__`): no second dataset to build and keep in step with the tokenizer, and any
augmentation of the image pipeline reaches the prior. The encoder is a few small convolutions
per image, a fraction of the prior's cost (see the README's Generation section).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.image_prior import TextImagePrior
from mmjax.models.image_sampling import Sampling, sample_codes
from mmjax.models.vqvae import VQVAE, to_pixels


class TextToImage(nn.Module):
    prior: TextImagePrior
    tokenizer: VQVAE

    @property
    def grid(self) -> int:
        """Image tokens per side."""
        return math.isqrt(self.prior.image_tokens)

    def codes(self, images_BSS3: jax.Array) -> jax.Array:
        """The frozen tokenizer's codes [B, N] (row-major grid) of normalised images."""
        codes_Bhw = self.tokenizer.encode(images_BSS3)
        return jax.lax.stop_gradient(codes_Bhw.reshape(codes_Bhw.shape[0], -1))

    def __call__(self, images_BSS3: jax.Array, text_BL: jax.Array):
        """Teacher-forced: (text logits [B, L-1, V], image logits [B, N, C], codes [B, N])."""
        codes_BN = self.codes(images_BSS3)
        text_logits, image_logits = self.prior(text_BL, codes_BN)
        return text_logits, image_logits, codes_BN

    def initialize(self, images_BSS3: jax.Array, text_BL: jax.Array):
        """Runs every part once (the decoder too, which training never reads): `init` with
        this method creates all the parameters of both parts."""
        out = self(images_BSS3, text_BL)
        return out, self.pixels(out[2])

    def pixels(self, codes_BN: jax.Array) -> jax.Array:
        """uint8 images [B, S, S, 3] decoded from codes [B, N]."""
        images = self.tokenizer.decode(codes_BN.reshape(-1, self.grid, self.grid))
        return jnp.round(to_pixels(images) * 255.0).astype(jnp.uint8)


def generate(
    model: TextToImage,
    params: dict,
    text_BL: jax.Array,
    key: jax.Array,
    sampling: Sampling,
    uncond_L: jax.Array | None = None,
    cache: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(codes [B, N], uint8 images [B, S, S, 3]) sampled for the tokenised prompts (see
    `image_sampling.sample_codes`). Jit it."""
    codes_BN = sample_codes(
        model.prior, params["prior"], text_BL, key, sampling, uncond_L, cache=cache
    )
    images = model.apply({"params": params}, codes_BN, method=TextToImage.pixels)
    return codes_BN, images
