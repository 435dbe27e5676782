"""ResNet image tower: open_clip's "modified ResNet" (the RN50/RN101/RN50x4 CLIP image towers).

Differences from a torchvision ResNet, as in CLIP: a stem of three 3×3 convs with an average pool
instead of one 7×7 conv and a max pool; anti-aliased downsampling (a stride-2 average pool
before the convolution instead of a strided convolution, in the blocks and their shortcuts); and
an attention-pooling head (one query, the mean of the feature map, attends to the map plus
learned positions) instead of global average pooling. The total stride is 32.

Images are BHWC. Every parameter carries logical axis names: a convolution's output channels
are `embed` (sharded over `fsdp` by the default rules: FSDP over channels), its input channels
`conv_in` (replicated); the attention head uses the Transformer's `embed`/`heads`/`kv` names, so
tensor parallelism splits its heads. Convolutions take `dtype` inputs and accumulate in float32;
normalisation statistics are always float32.

Normalisation (`norm`): "batch" is BatchNorm with PyTorch's semantics (momentum 0.1, running
variance unbiased, epsilon 1e-5). Its running statistics live in the `batch_stats` collection;
a BatchNorm normalises with the statistics of the batch and updates the running ones exactly
when that collection is mutable (`apply(..., mutable=["batch_stats"])`: training), and with the
running ones otherwise (evaluation, export). Under a sharded `jit` the mean over the global
batch axis *is* the cross-device statistic: no explicit collective is needed. "group" is
GroupNorm (no state; the same in training and evaluation).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.errors import ConfigError
from mmjax.models.attention import dot_product_attention
from mmjax.models.layers import Precision, _lead, attention_output, param

NORMS = ("batch", "group")
STATE_COLLECTION = "batch_stats"
EXPANSION = 4  # a bottleneck block's output channels per inner channel
STRIDE = 32  # input size / final feature-map size


class _ChannelNorm(Precision):
    """A normalisation with a learned per-channel scale and bias (the last axis)."""

    epsilon: float = 1e-5
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    def affine(self, c: int) -> tuple[jax.Array, jax.Array]:
        scale = param(self, "scale", self.scale_init, (c,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (c,), ("norm",), self.param_dtype)
        return scale, bias


class BatchNorm(_ChannelNorm):
    """BatchNorm over all axes but the last (channels); see the module docstring."""

    momentum: float = 0.1  # PyTorch's: running = (1 - m)·running + m·batch

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        c = x_BHWC.shape[-1]
        scale, bias = self.affine(c)
        stat = lambda name, init: self.variable(
            STATE_COLLECTION,
            name,
            nn.with_logical_partitioning(init, ("norm",)),
            jax.random.key(0),  # (unused: the initialisers are constants)
            (c,),
            jnp.float32,
        )
        mean, var = stat("mean", nn.initializers.zeros), stat("var", nn.initializers.ones)
        x32 = x_BHWC.astype(jnp.float32)
        axes = tuple(range(x32.ndim - 1))
        if self.is_mutable_collection(STATE_COLLECTION):  # training (or init)
            mu = jnp.mean(x32, axis=axes)
            sigma2 = jnp.mean(jnp.square(x32 - _lead(mu, x32)), axis=axes)
            if not self.is_initializing():
                n = math.prod(x32.shape[:-1])
                unbiased = sigma2 * (n / max(n - 1, 1))
                mean.value = (1 - self.momentum) * mean.value + self.momentum * mu
                var.value = (1 - self.momentum) * var.value + self.momentum * unbiased
        else:
            mu, sigma2 = mean.value, var.value
        inv = jax.lax.rsqrt(sigma2 + self.epsilon) * scale.astype(jnp.float32)
        y = (x32 - _lead(mu, x32)) * _lead(inv, x32) + _lead(bias.astype(jnp.float32), x32)
        return y.astype(self.dtype)


class GroupNorm(_ChannelNorm):
    """GroupNorm with float32 statistics over gcd(channels, 32) groups (32 for every ResNet
    width that is a multiple of 32)."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        c = x_BHWC.shape[-1]
        scale, bias = self.affine(c)
        g = math.gcd(c, 32)
        x32 = x_BHWC.astype(jnp.float32)
        xg = x32.reshape(*x32.shape[:-1], g, c // g)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)  # spatial and within-group axes
        mu = jnp.mean(xg, axis=axes, keepdims=True)
        sigma2 = jnp.mean(jnp.square(xg - mu), axis=axes, keepdims=True)
        y = ((xg - mu) * jax.lax.rsqrt(sigma2 + self.epsilon)).reshape(x32.shape)
        return (y * _lead(scale, y) + _lead(bias, y)).astype(self.dtype)


def avg_pool(x_BHWC: jax.Array, s: int) -> jax.Array:
    """Non-overlapping s×s average pool (PyTorch's AvgPool2d(s)); H and W divisible by s."""
    if s == 1:
        return x_BHWC
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.astype(jnp.float32).reshape(b, h // s, s, w // s, s, c)
    return jnp.mean(x, axis=(2, 4)).astype(x_BHWC.dtype)


class ConvNorm(Precision):
    """k×k convolution (no bias, `padding` k//2, stride `stride`) followed by the norm."""

    channels: int
    kernel: int = 1
    stride: int = 1
    norm: str = "batch"
    # The norm's scale starts at 0 (a block's last norm, as open_clip initialises it): each
    # residual block starts as the identity, which keeps a deep ResNet trainable from step 0.
    zero_scale: bool = False

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        k, c_in = self.kernel, x_BHWC.shape[-1]
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        w = param(
            self,
            "kernel",
            init,
            (k, k, c_in, self.channels),
            (None, None, "conv_in", "embed"),
            self.param_dtype,
        )
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.dtype),
            w.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((k // 2, k // 2), (k // 2, k // 2)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        y = nn.with_logical_constraint(y, ("batch", None, None, "act_embed"))
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        norm = BatchNorm if self.norm == "batch" else GroupNorm
        return norm(
            dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init, name="norm"
        )(y)


class Bottleneck(Precision):
    """1×1 → 3×3 → (avg pool) → 1×1 (×4 channels), ReLUs, and the anti-aliased shortcut."""

    planes: int
    stride: int = 1
    norm: str = "batch"

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, norm=self.norm)
        out = jax.nn.relu(ConvNorm(self.planes, 1, name="conv1", **kw)(x_BHWC))
        out = jax.nn.relu(ConvNorm(self.planes, 3, name="conv2", **kw)(out))
        out = avg_pool(out, self.stride)
        out = ConvNorm(self.planes * EXPANSION, 1, zero_scale=True, name="conv3", **kw)(out)
        identity = x_BHWC
        if self.stride > 1 or x_BHWC.shape[-1] != self.planes * EXPANSION:
            identity = avg_pool(identity, self.stride)
            identity = ConvNorm(self.planes * EXPANSION, 1, name="downsample", **kw)(identity)
        return jax.nn.relu(out.astype(jnp.float32) + identity.astype(jnp.float32)).astype(
            self.dtype
        )


class AttentionPool(Precision):
    """CLIP's attention pooling: the mean of the map, prepended to it, plus learned positions;
    the first position's multi-head attention output, projected to `width`.

    Returns (pooled_BD, tokens_BND): besides the pooled output, one `width`-wide token per
    position of the map, its value projection through the same output projection (the attention
    output of a position attending only to itself, MaskCLIP's dense features). So a ResNet's
    tokens live in the space of its pooled output, as a ViT's do: the similarity maps, fusion
    modules and decoders that read a tower's tokens take them as they are."""

    num_heads: int
    width: int

    @nn.compact
    def __call__(self, x_BNC: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, c = x_BNC.shape[1:]
        if c % self.num_heads:
            raise ValueError(f"ResNet features {c} are not divisible by num_heads {self.num_heads}")
        pos = param(
            self,
            "pos_embedding",
            nn.initializers.normal(c**-0.5),
            (n + 1, c),
            ("length", "embed"),
            self.param_dtype,
        )
        x32 = x_BNC.astype(jnp.float32)
        x32 = jnp.concatenate([jnp.mean(x32, axis=1, keepdims=True), x32], axis=1)
        x = (x32 + pos.astype(jnp.float32)[None]).astype(self.dtype)
        h, k = self.num_heads, c // self.num_heads
        init = nn.initializers.normal(c**-0.5)

        def project(name: str, x_BTC: jax.Array) -> jax.Array:
            w = param(
                self, f"{name}_kernel", init, (c, h, k), ("embed", "heads", "kv"), self.param_dtype
            )
            b = param(
                self,
                f"{name}_bias",
                nn.initializers.zeros,
                (h, k),
                ("heads", "kv"),
                self.param_dtype,
            )
            y = jnp.einsum(
                "BTC,CHK->BTHK", x_BTC, w.astype(self.dtype), preferred_element_type=jnp.float32
            )
            return (y + b.astype(jnp.float32)[None, None]).astype(self.dtype)

        # Only the first position's output is pooled, so only its query is computed.
        q_B1HK = project("query", x[:, :1])
        k_BSHK, v_BSHK = project("key", x), project("value", x)
        out_B1HK = dot_product_attention(q_B1HK, k_BSHK, v_BSHK, None, False, self.dtype)
        # One output projection for the pooled output and the tokens (see the docstring).
        both_BSHK = jnp.concatenate([out_B1HK, v_BSHK[:, 1:]], axis=1)
        both_BSD = attention_output(self, both_BSHK, self.width, init)
        return both_BSD[:, 0], both_BSD[:, 1:]


class ResNet(Precision):
    """open_clip's ModifiedResNet: `layers` bottleneck blocks per stage (RN50: (3, 4, 6, 3)),
    `base_width` stem channels (open_clip's `width`), an attention-pooling head with `num_heads`
    heads projecting to `width` (the tower's output width; open_clip's `output_dim`).

    Returns (pooled_BD, tokens_BND): the pooled output and a `width`-wide token per position of
    the final feature map (see `AttentionPool`), N = (H/32)·(W/32).
    """

    layers: tuple[int, ...]
    base_width: int
    num_heads: int
    width: int
    norm: str = "batch"

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.norm!r}")
        _, h, w, _ = images_BHWC.shape
        if h % STRIDE or w % STRIDE:
            raise ValueError(f"ResNet images must be multiples of {STRIDE} pixels, got {h}x{w}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, norm=self.norm)
        x = nn.with_logical_constraint(images_BHWC, ("batch", None, None, None))
        half = self.base_width // 2
        x = jax.nn.relu(ConvNorm(half, 3, stride=2, name="stem1", **kw)(x))
        x = jax.nn.relu(ConvNorm(half, 3, name="stem2", **kw)(x))
        x = jax.nn.relu(ConvNorm(self.base_width, 3, name="stem3", **kw)(x))
        x = avg_pool(x, 2)
        for stage, blocks in enumerate(self.layers):
            planes = self.base_width * 2**stage
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = Bottleneck(planes, stride, name=f"layer{stage + 1}_{i}", **kw)(x)
        b, fh, fw, c = x.shape
        return AttentionPool(
            self.num_heads,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attnpool",
        )(x.reshape(b, fh * fw, c))


def resnet_from_config(image: ml_collections.ConfigDict, dtype: jnp.dtype) -> ResNet:
    """The ResNet of `config.model.image` (kind "resnet") with compute dtype `dtype`."""
    return ResNet(
        layers=tuple(image.layers),
        base_width=image.resnet_width,
        num_heads=image.num_heads,
        width=image.width,
        norm=image.norm,
        dtype=dtype,
    )


def check_resnet_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError for `model.image` settings a ResNet tower cannot run with."""
    image, size = config.model.image, config.data.image_size
    if image.norm not in NORMS:
        raise ConfigError(f"model.image.norm={image.norm!r} is unknown; use one of {NORMS}")
    layers = tuple(image.layers)
    if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise ConfigError(
            f"model.image.layers={layers!r}: four positive block counts, e.g. (3, 4, 6, 3)"
        )
    w = image.resnet_width
    if not isinstance(w, int) or w < 2 or w % 2:
        raise ConfigError(f"model.image.resnet_width={w!r} must be a positive even integer")
    features = w * 2 ** (len(layers) - 1) * EXPANSION
    if features % image.num_heads:
        raise ConfigError(
            f"the ResNet's {features} output features (32 × model.image.resnet_width) are not "
            f"divisible by model.image.num_heads={image.num_heads}"
        )
    if size % STRIDE:
        raise ConfigError(
            f"data.image_size={size}: a ResNet image tower needs a multiple of {STRIDE}"
        )
    if image.norm == "batch" and config.microbatches > 1:
        raise ConfigError(
            f"microbatches={config.microbatches} with BatchNorm: GradCache runs the towers per "
            "microbatch, so batch statistics would differ from the global batch's; use "
            "model.image.norm=group or microbatches=1"
        )
