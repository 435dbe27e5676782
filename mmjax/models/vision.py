"""Vision Transformer image tower."""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dtype, Encoder, matmul, param


class ViT(nn.Module):
    """ViT: non-overlapping patches -> linear embedding + learned positions -> Encoder -> pool.

    Images are BHWC floats. Returns (pooled_BD, tokens_BND); `pool` is "gap" (mean over patch
    tokens) or "cls" (a learned class token prepended to the sequence).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.pool not in ("gap", "cls"):
            raise ValueError(f"ViT pool must be 'gap' or 'cls', got {self.pool!r}")
        _, h, w, c = images_BHWC.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        # A patch embedding is a strided conv; as reshape + matmul it is one large 2-D GEMM.
        patches_BNP = einops.rearrange(images_BHWC, "B (h p) (w q) C -> B (h w) (p q C)", p=p, q=p)
        init = nn.initializers.lecun_normal()
        w_patch = param(
            self,
            "patch_kernel",
            init,
            (p * p * c, self.width),
            ("patch", "embed"),
            self.param_dtype,
        )
        b_patch = param(
            self, "patch_bias", nn.initializers.zeros, (self.width,), ("norm",), self.param_dtype
        )
        x_BND = matmul("BNP,PD->BND", patches_BNP, w_patch, self.dtype)
        x_BND = x_BND + b_patch.astype(self.dtype)[None, None]
        n = x_BND.shape[1]
        pos = param(
            self,
            "pos_embedding",
            nn.initializers.normal(0.02),
            (n, self.width),
            ("length", "embed"),
            self.param_dtype,
        )
        x_BND = x_BND + pos.astype(self.dtype)[None]
        if self.pool == "cls":
            cls = param(
                self, "cls_token", nn.initializers.zeros, (self.width,), ("norm",), self.param_dtype
            )
            cls_B1D = jnp.broadcast_to(cls.astype(self.dtype), (x_BND.shape[0], 1, self.width))
            x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
        x_BND = Encoder(
            self.depth, self.num_heads, self.mlp_dim, self.dtype, self.param_dtype, name="encoder"
        )(x_BND)
        if self.pool == "cls":
            return x_BND[:, 0], x_BND[:, 1:]
        return jnp.mean(x_BND.astype(jnp.float32), axis=1).astype(self.dtype), x_BND
