"""VQ-VAE image tokenizer: a convolutional encoder, a codebook of l2-normalised codes and a
convolutional decoder (the discrete image tokens of a DALL-E style text→image prior).

Images are what the training pipeline gives: float [B, S, S, 3], CLIP-normalised
(`mmjax.data.preprocess.normalize`: (pixel / 255 - IMAGE_MEAN) / IMAGE_STD); `decode` returns
images in the same normalised space (`to_pixels` maps them back to [0, 1]).

    encoder: per level, a 3×3 stride-2 conv (S → S/2), then `res_blocks` residual blocks at the
             grid resolution and a 1×1 conv to `code_dim`;
    codes:   the grid vector and the codebook rows are l2-normalised and matched by cosine
             similarity (ViT-VQGAN's factorised codes: a low-dimensional unit sphere keeps most
             codes near the data, so few go unused);
    decoder: a 1×1 conv from `code_dim`, residual blocks, then per level a sub-pixel upsampling
             (a 3×3 conv to 4× the channels at the low resolution, rearranged to 2× the size),
             and a 3×3 conv to RGB.

With `len(channels)` levels the grid is S / 2**levels per side (8×8 = 64 tokens for 64 px and
three levels). Convolutions run in `dtype` with float32 accumulation; the codebook lookup is
float32 whatever `dtype`, so the codes of an image do not depend on the compute precision's
rounding of the distances more than necessary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.data import preprocess
from mmjax.models.layers import Precision, param

# Codebook rows start small: a row's direction (all that matters after l2 normalisation) then
# moves quickly under Adam's ~learning-rate-sized steps, so an unused code pulled towards the
# data (`mmjax.losses.vq.restart_loss`) gets there in tens of steps rather than thousands.
_CODEBOOK_INIT_STD = 0.02


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / |x|` in float32 (a zero vector stays zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def to_pixels(images_BHWC: jax.Array) -> jax.Array:
    """Normalised images (the model's input and output space) -> pixel values in [0, 1]
    (clipped), float32."""
    lead = (None,) * (images_BHWC.ndim - 1)
    mean = jnp.asarray(preprocess.IMAGE_MEAN)[lead]
    std = jnp.asarray(preprocess.IMAGE_STD)[lead]
    return jnp.clip(images_BHWC.astype(jnp.float32) * std + mean, 0.0, 1.0)


class Conv(Precision):
    """A square conv, SAME padding, with a bias. Kernel axes (None, None, conv_in, embed): the
    output channels shard over `fsdp` by the default rules, as the ResNet tower's do."""

    channels: int
    kernel: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        c_in = x_BHWC.shape[-1]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        shape = (self.kernel, self.kernel, c_in, self.channels)
        kernel = param(
            self, "kernel", init, shape, (None, None, "conv_in", "embed"), self.param_dtype
        )
        bias = param(
            self, "bias", nn.initializers.zeros, (self.channels,), ("norm",), self.param_dtype
        )
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + bias.astype(jnp.float32)[None, None, None]).astype(self.dtype)


class ResBlock(Precision):
    """x + conv1×1(silu(conv3×3(silu(x)))): the residual branch mixes a 3×3 neighbourhood of
    the grid, the skip keeps the code's own information intact."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        p = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x_BHWC.shape[-1]
        h = Conv(c, 3, **p, name="conv0")(nn.silu(x_BHWC))
        return x_BHWC + Conv(c, 1, **p, name="conv1")(nn.silu(h))


class Encoder(Precision):
    channels: Sequence[int]
    res_blocks: int
    code_dim: int

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        """Unnormalised grid vectors [B, h, w, code_dim], float32."""
        p = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images_BHWC
        for i, c in enumerate(self.channels):
            x = Conv(c, 3, 2, **p, name=f"down{i}")(x)
            if i < len(self.channels) - 1:
                x = nn.silu(x)
        for i in range(self.res_blocks):
            x = ResBlock(**p, name=f"res{i}")(x)
        return Conv(self.code_dim, 1, **p, name="to_code")(nn.silu(x)).astype(jnp.float32)


class Decoder(Precision):
    channels: Sequence[int]  # the encoder's, listed from the image side
    res_blocks: int

    @nn.compact
    def __call__(self, codes_BhwD: jax.Array) -> jax.Array:
        """Normalised images [B, h·2**levels, w·2**levels, 3], float32."""
        p = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.channels[-1], 1, **p, name="from_code")(codes_BhwD)
        for i in range(self.res_blocks):
            x = ResBlock(**p, name=f"res{i}")(x)
        outs = [*reversed(self.channels[:-1]), self.channels[0]]
        for i, c in enumerate(outs):
            # Sub-pixel upsampling: the conv runs at the low resolution (4× cheaper than after a
            # nearest upsample) and has no checkerboard artefacts of a transposed conv.
            x = Conv(4 * c, 3, **p, name=f"up{i}")(nn.silu(x))
            x = einops.rearrange(x, "B h w (p q C) -> B (h p) (w q) C", p=2, q=2)
        return Conv(3, 3, **p, name="to_rgb")(nn.silu(x)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What one forward pass gives the losses (`mmjax.losses.vq`)."""

    images_BHWC: jax.Array  # reconstruction, normalised space, float32
    z_BhwD: jax.Array  # l2-normalised encoder vectors (with gradient), float32
    q_BhwD: jax.Array  # their nearest codes (with gradient to the codebook), float32
    codes_Bhw: jax.Array  # int32 indices into the codebook
    codebook_KD: jax.Array  # l2-normalised codebook, float32


jax.tree_util.register_dataclass(
    Quantized,
    data_fields=["images_BHWC", "z_BhwD", "q_BhwD", "codes_Bhw", "codebook_KD"],
    meta_fields=[],
)


class VQVAE(Precision):
    """Encoder → nearest l2-normalised code → decoder (see the module doc).

    `encode(images) -> codes [B, h, w] int32`, `decode(codes) -> images`, and `__call__`
    (training) -> `Quantized`: the straight-through reconstruction (the decoder's gradient
    reaches the encoder as if quantisation were the identity) and what the codebook and
    commitment losses need.
    """

    codebook_size: int
    code_dim: int
    channels: Sequence[int]
    res_blocks: int

    def setup(self):
        p = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.channels, self.res_blocks, self.code_dim, **p)
        self.decoder = Decoder(self.channels, self.res_blocks, **p)
        init = nn.initializers.normal(_CODEBOOK_INIT_STD)
        shape = (self.codebook_size, self.code_dim)
        self.codebook = param(self, "codebook", init, shape, ("vocab", None), jnp.float32)

    @property
    def downsample(self) -> int:
        """Image pixels per token side: the grid is image_size / downsample per side."""
        return 2 ** len(self.channels)

    def normalized_codebook(self) -> jax.Array:
        return l2_normalize(self.codebook)

    def _nearest(self, z_BhwD: jax.Array, codebook_KD: jax.Array) -> jax.Array:
        # Unit vectors: the nearest code is the one of largest cosine similarity.
        sim_BhwK = jnp.einsum("bhwd,kd->bhwk", z_BhwD, codebook_KD)
        return jnp.argmax(sim_BhwK, axis=-1).astype(jnp.int32)

    def encode(self, images_BHWC: jax.Array) -> jax.Array:
        """Codes [B, S/downsample, S/downsample] int32 of normalised images [B, S, S, 3]."""
        z = l2_normalize(self.encoder(images_BHWC))
        return self._nearest(z, self.normalized_codebook())

    def decode(self, codes_Bhw: jax.Array) -> jax.Array:
        """Normalised images [B, h·downsample, w·downsample, 3] (float32) of codes [B, h, w]."""
        return self.decoder(jnp.take(self.normalized_codebook(), codes_Bhw, axis=0))

    def __call__(self, images_BHWC: jax.Array) -> Quantized:
        z = l2_normalize(self.encoder(images_BHWC))
        codebook = self.normalized_codebook()
        codes = self._nearest(jax.lax.stop_gradient(z), jax.lax.stop_gradient(codebook))
        q = jnp.take(codebook, codes, axis=0)
        straight_through = z + jax.lax.stop_gradient(q - z)
        return Quantized(self.decoder(straight_through), z, q, codes, codebook)


def build_vqvae(config: ml_collections.ConfigDict) -> VQVAE:
    """The VQ-VAE of `config.vqvae` in the compute dtype `config.dtype`."""
    v = config.vqvae
    return VQVAE(
        codebook_size=int(v.codebook_size),
        code_dim=int(v.code_dim),
        channels=tuple(int(c) for c in v.channels),
        res_blocks=int(v.res_blocks),
        dtype=jnp.dtype(config.dtype),
    )


def grid_size(config: ml_collections.ConfigDict) -> int:
    """Tokens per image side for `config`: data.image_size / 2**len(vqvae.channels)."""
    return int(config.data.image_size) // 2 ** len(config.vqvae.channels)
