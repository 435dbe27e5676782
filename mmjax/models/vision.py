"""Vision Transformer image tower."""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import (
    Encoder,
    LayerNorm,
    TowerSettings,
    embedding_table,
    param,
    patch_embedding,
)


def sincos2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sine-cosine position embeddings [h*w, width], row-major over the patch grid.

    Unlike learned embeddings initialised at 0.02, they have unit scale from step 0, so a small
    model sees *where* each patch is immediately instead of learning it slowly.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need width % 4 == 0, got {width}")
    y, x = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (jnp.arange(width // 4, dtype=jnp.float32) / (width // 4))
    y_NF = y.reshape(-1, 1) * omega[None]
    x_NF = x.reshape(-1, 1) * omega[None]
    return jnp.concatenate([jnp.sin(x_NF), jnp.cos(x_NF), jnp.sin(y_NF), jnp.cos(y_NF)], axis=1)


class ViT(TowerSettings):
    """ViT: non-overlapping patches -> linear embedding + learned positions -> Encoder -> pool.

    Images are BHWC floats. Returns (pooled_BD, tokens_BND); `pool` is "gap" (mean over patch
    tokens) or "cls" (a learned class token prepended to the sequence); `posemb` is "sincos2d"
    (fixed) or "learn". With `stem_channels`,
    a convolutional stem (one 3×3 stride-2 conv + GELU per entry) runs before patchifying: local
    edge and corner detectors that a linear patch embedding learns slowly, which helps small
    models on small data; `patch_size` then applies to the downsampled feature map.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    stem_channels: tuple[int, ...] = ()
    posemb: str = "sincos2d"
    patch_bias: bool = True
    pre_norm: bool = False  # a LayerNorm before the first block (open_clip's `ln_pre`)

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.pool not in ("gap", "cls"):
            raise ValueError(f"ViT pool must be 'gap' or 'cls', got {self.pool!r}")
        x_BHWC = images_BHWC
        for i, channels in enumerate(self.stem_channels):
            x_BHWC = nn.gelu(self._conv(f"stem{i}", x_BHWC, channels))
        _, h, w, _ = x_BHWC.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} (after a stem of {len(self.stem_channels)} stride-2 convs) "
                f"is not divisible by patch size {p}"
            )
        # A patch embedding is a strided conv; as reshape + matmul it is one large 2-D GEMM.
        patches_BNP = einops.rearrange(x_BHWC, "B (h p) (w q) C -> B (h w) (p q C)", p=p, q=p)
        x_BND = patch_embedding(self, "patch", patches_BNP, self.patch_bias)
        if self.pool == "cls":
            cls = param(
                self, "cls_token", nn.initializers.zeros, (self.width,), ("norm",), self.param_dtype
            )
            cls_B1D = jnp.broadcast_to(cls.astype(self.dtype), (x_BND.shape[0], 1, self.width))
            x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
        n = x_BND.shape[1]
        if self.posemb == "sincos2d":  # fixed positions for the patches; the class token has none
            pos = sincos2d(h // p, w // p, self.width)
            if self.pool == "cls":
                pos = jnp.concatenate([jnp.zeros((1, self.width), pos.dtype), pos])
        elif self.posemb == "learn":  # one learned row per token, class token included
            pos = embedding_table(self, "pos_embedding", n, nn.initializers.normal(0.02))
        else:
            raise ValueError(f"ViT posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        x_BND = x_BND + pos.astype(self.dtype)[None]
        if self.pre_norm:
            x_BND = LayerNorm(self.dtype, self.param_dtype, name="ln_pre")(x_BND)
        x_BND = Encoder.of_tower(self)(x_BND)
        if self.pool == "cls":
            return x_BND[:, 0], x_BND[:, 1:]
        return jnp.mean(x_BND.astype(jnp.float32), axis=1).astype(self.dtype), x_BND

    def _conv(self, name: str, x_BHWC: jax.Array, channels: int) -> jax.Array:
        """3×3, stride 2, SAME padding; float32 accumulation."""
        c_in = x_BHWC.shape[-1]
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        kernel = param(
            self,
            f"{name}_kernel",
            init,
            (3, 3, c_in, channels),
            (None, None, "conv_in", "conv_out"),
            self.param_dtype,
        )
        bias = param(
            self, f"{name}_bias", nn.initializers.zeros, (channels,), ("norm",), self.param_dtype
        )
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(2, 2),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + bias[None, None, None]).astype(self.dtype)
