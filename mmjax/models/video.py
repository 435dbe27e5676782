"""Video towers: clips [B, F, H, W, C] -> (pooled_BD, tokens_BND), like the ViT image tower.

Two designs (ViViT, Arnab et al. 2021):

* "factorized": the image ViT runs on every frame (frames folded into the batch), then a small
  temporal Transformer runs over the per-frame pooled features. Space and time are separate
  encoders, so attention cost is F·N² + F² instead of (F·N)², and the spatial part is exactly
  an image tower: image-pretrained ViT weights load into it unchanged.
* "tubelet": t×p×p voxel cubes are linearly embedded (a strided 3-D conv as one GEMM, as in
  ViViT / VideoMAE) and a single Encoder attends over all space-time tokens. Motion is visible
  from the first layer, at the price of quadratic cost in F·N.
"""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models import layers
from mmjax.models.layers import Encoder, LayerNorm, TowerSettings, param
from mmjax.models.vision import ViT

KINDS = ("factorized", "tubelet")


def _sincos(pos_N: jax.Array, num_freqs: int, temperature: float) -> jax.Array:
    """[N, 2·num_freqs]: sin then cos of positions at geometrically spaced frequencies."""
    omega = 1.0 / temperature ** (jnp.arange(num_freqs, dtype=jnp.float32) / num_freqs)
    angle_NF = pos_N.astype(jnp.float32)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(angle_NF), jnp.cos(angle_NF)], axis=1)


def sincos1d(n: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 1-D sine-cosine embeddings [n, width] (the original Transformer's)."""
    if width % 2:
        raise ValueError(f"sincos1d position embeddings need an even width, got {width}")
    return _sincos(jnp.arange(n), width // 2, temperature)


def sincos3d(t: int, h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 3-D sine-cosine embeddings [t*h*w, width], row-major over (time, row, column).

    Each axis gets the same width // 6 frequencies; the width % 6 leftover dimensions are zero,
    so any width >= 6 works (64 or 512 are not multiples of 6, and a few position-free
    dimensions cost nothing).
    """
    k = width // 6
    if k == 0:
        raise ValueError(f"sincos3d position embeddings need width >= 6, got {width}")
    ti, yi, xi = jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing="ij")
    parts = [_sincos(a.reshape(-1), k, temperature) for a in (ti, yi, xi)]
    parts.append(jnp.zeros((t * h * w, width - 6 * k), jnp.float32))
    return jnp.concatenate(parts, axis=1)


class VideoTower(TowerSettings):
    """A video tower over clips [B, F, H, W, C] (floats); returns (pooled_BD, tokens_BND).

    kind="factorized": `depth` spatial blocks per frame (a `vision.ViT` named "spatial", pooled
    by `frame_pool`), then `temporal_depth` blocks over the F frame features plus time
    embeddings (`time_posemb`: "sincos" fixed or "learn"). tokens_BND are those F temporal
    tokens (N = F), pooled_BD their mean ("gap") or a class token ("cls").
    The per-frame features [B, F, D] are also sown as intermediates/"frame_features".

    kind="tubelet": `tubelet_size` frames × `patch_size`² pixels per token, fixed 3-D sin-cos
    positions ("sincos3d") or learned ones ("learn"), `depth` blocks over all
    N = (F/t)·(H/p)·(W/p) tokens. The pre-position tubelet embeddings [B, F/t, (H/p)(W/p), D]
    are sown as intermediates/"tubelet_embeddings".
    """

    kind: str
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    tubelet_size: int = 2  # frames per tubelet (kind="tubelet")
    temporal_depth: int = 2  # blocks of the temporal encoder (kind="factorized")
    frame_pool: str = "gap"  # how the spatial ViT pools each frame (kind="factorized")
    frame_posemb: str = "sincos2d"  # the spatial ViT's `posemb` (kind="factorized")
    time_posemb: str = "sincos"  # "sincos" | "learn" (kind="factorized")
    posemb: str = "sincos3d"  # "sincos3d" | "learn" (kind="tubelet")
    patch_bias: bool = True
    pre_norm: bool = False

    @nn.compact
    def __call__(self, clips_BFHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.kind not in KINDS:
            raise ValueError(f"VideoTower kind must be one of {KINDS}, got {self.kind!r}")
        if self.pool not in ("gap", "cls"):
            raise ValueError(f"VideoTower pool must be 'gap' or 'cls', got {self.pool!r}")
        if clips_BFHWC.ndim != 5:
            raise ValueError(f"VideoTower expects clips [B, F, H, W, C], got {clips_BFHWC.shape}")
        _, f, h, w, _ = clips_BFHWC.shape
        p = self.patch_size
        # Checked here rather than left to einops, whose error names no model setting.
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not divisible by patch size {p}")
        if self.kind == "tubelet" and f % self.tubelet_size:
            raise ValueError(f"{f} frames are not divisible by tubelet size {self.tubelet_size}")
        if self.kind == "factorized":
            x_BND = self._factorized(clips_BFHWC)
        else:
            x_BND = self._tubelet(clips_BFHWC)
        if self.pool == "cls":
            return x_BND[:, 0], x_BND[:, 1:]
        return jnp.mean(x_BND.astype(jnp.float32), axis=1).astype(self.dtype), x_BND

    def _with_cls(self, x_BND: jax.Array, pos_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Prepends a learned class token (position-free, as in ViT) when pool == "cls"."""
        if self.pool != "cls":
            return x_BND, pos_ND
        cls = param(
            self, "cls_token", nn.initializers.zeros, (self.width,), ("norm",), self.param_dtype
        )
        cls_B1D = jnp.broadcast_to(cls.astype(self.dtype), (x_BND.shape[0], 1, self.width))
        pos_ND = jnp.concatenate([jnp.zeros((1, self.width), pos_ND.dtype), pos_ND])
        return jnp.concatenate([cls_B1D, x_BND], axis=1), pos_ND

    def _factorized(self, clips_BFHWC: jax.Array) -> jax.Array:
        b, f = clips_BFHWC.shape[:2]
        # Frames folded into the batch: one ViT call is one large GEMM per layer instead of F
        # small ones, and the spatial parameters are literally an image ViT's.
        spatial = ViT(
            patch_size=self.patch_size,
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            pool=self.frame_pool,
            posemb=self.frame_posemb,
            patch_bias=self.patch_bias,
            pre_norm=self.pre_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            activation=self.activation,
            name="spatial",
        )
        frames_bHWC = einops.rearrange(clips_BFHWC, "B F H W C -> (B F) H W C")
        pooled_bD, _ = spatial(frames_bHWC)
        x_BFD = pooled_bD.reshape(b, f, self.width)
        self.sow("intermediates", "frame_features", x_BFD)
        if self.time_posemb == "sincos":
            pos_FD = sincos1d(f, self.width)
        elif self.time_posemb == "learn":
            # Fixed to the training clip length: another F would need interpolation.
            pos_FD = layers.embedding_table(self, "time_embedding", f, nn.initializers.normal(0.02))
        else:
            raise ValueError(f"time_posemb must be 'sincos' or 'learn', got {self.time_posemb!r}")
        x_BND, pos_ND = self._with_cls(x_BFD, pos_FD)
        x_BND = x_BND + pos_ND.astype(self.dtype)[None]
        return Encoder.of_tower(self, self.temporal_depth, name="temporal")(x_BND)

    def _tubelet(self, clips_BFHWC: jax.Array) -> jax.Array:
        _, f, h, w, _ = clips_BFHWC.shape
        t, p = self.tubelet_size, self.patch_size
        # A tubelet embedding is a strided 3-D conv; as reshape + matmul it is one 2-D GEMM.
        cubes_BTNV = einops.rearrange(
            clips_BFHWC,
            "B (f t) (h p) (w q) C -> B f (h w) (t p q C)",
            t=t,
            p=p,
            q=p,
        )
        x_BTND = layers.patch_embedding(self, "tubelet", cubes_BTNV, self.patch_bias)
        self.sow("intermediates", "tubelet_embeddings", x_BTND)
        x_BND = einops.rearrange(x_BTND, "B T N D -> B (T N) D")
        if self.posemb == "sincos3d":
            pos_ND = sincos3d(f // t, h // p, w // p, self.width)
        elif self.posemb == "learn":
            rows = x_BND.shape[1]
            pos_ND = layers.embedding_table(
                self, "pos_embedding", rows, nn.initializers.normal(0.02)
            )
        else:
            raise ValueError(f"posemb must be 'sincos3d' or 'learn', got {self.posemb!r}")
        x_BND, pos_ND = self._with_cls(x_BND, pos_ND)
        x_BND = x_BND + pos_ND.astype(self.dtype)[None]
        if self.pre_norm:
            x_BND = LayerNorm(self.dtype, self.param_dtype, name="ln_pre")(x_BND)
        return Encoder.of_tower(self)(x_BND)


def build_video_tower(config: ml_collections.ConfigDict) -> VideoTower:
    """Spatial settings from `config.model.image` (the per-frame ViT of a factorized tower is
    exactly the image tower), temporal ones from `config.video`."""
    m, v = config.model, config.video
    return VideoTower(
        kind=v.kind,
        patch_size=m.image.patch_size,
        width=m.image.width,
        depth=m.image.depth,
        num_heads=m.image.num_heads,
        mlp_dim=m.image.mlp_dim,
        pool=v.pool,
        tubelet_size=v.tubelet_size,
        temporal_depth=v.temporal_depth,
        frame_pool=m.image.pool,
        frame_posemb=m.image.posemb,
        time_posemb=v.time_posemb,
        posemb=v.tubelet_posemb,
        patch_bias=m.image.patch_bias,
        pre_norm=m.image.pre_norm,
        dtype=jnp.dtype(config.dtype),
        remat=m.remat,
        scan_layers=m.scan_layers,
        activation=m.activation,
    )
