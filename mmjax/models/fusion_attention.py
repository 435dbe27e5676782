"""Cross-modal attention fusions (cross-attention, co-attention, bottlenecks) and what all fusions
share: the `Fusion` base class (the call convention, checked once), the `FusionOutput` they
return and the masking/pooling helpers. `mmjax.models.fusion` re-exports the fusions here next
to the others and the registry; import fusions from there.

Call convention (every fusion): `fusion(image_pooled_BD, image_tokens_BND, text_pooled_BD,
text_tokens_BLD, text_valid_BL=None, *, image_valid_BN=None, return_attention=False)`, i.e.
`fusion(*vit(images), *text_tower(tokens), text_valid_BL)`. Each fusion reads only the inputs it
needs (the others may be None). `*_valid_*` are True at real tokens (for a causal text tower:
positions up to the first EOT); None = all valid. Padding never influences any output, and the
fused tokens returned at padded positions are zero.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.cross_attention import CrossBlock, key_mask
from mmjax.models.layers import Block, Dtype, LayerNorm, Precision, dense, param


class FusionOutput(NamedTuple):
    """pooled_BD: the fused representation [B, D_out]. Token-level fusions also return their fused
    token streams (zero at padding) and, on request, `attention`: the last layer's cross-attention
    probabilities by direction ("text_to_image" [B, H, L, N], "image_to_text" [B, H, N, L])."""

    pooled_BD: jax.Array
    image_tokens_BND: jax.Array | None = None
    text_tokens_BLD: jax.Array | None = None
    attention: dict[str, jax.Array] | None = None


def validity(valid_BS: jax.Array | None, x_BSD: jax.Array) -> jax.Array:
    """Boolean [B, S] validity, all True when not given."""
    if valid_BS is None:
        return jnp.ones(x_BSD.shape[:2], jnp.bool_)
    if valid_BS.shape != x_BSD.shape[:2]:
        raise ValueError(f"validity mask {valid_BS.shape} does not match tokens {x_BSD.shape}")
    return valid_BS.astype(jnp.bool_)


def masked_mean(x_BSD: jax.Array, valid_BS: jax.Array, dtype: Dtype) -> jax.Array:
    """Mean over valid positions, accumulated in float32. `where` rather than multiplying by the
    mask, so that even non-finite values at padded positions cannot leak in."""
    x_BSD = jnp.where(valid_BS[:, :, None], x_BSD.astype(jnp.float32), 0.0)
    count_B1 = jnp.maximum(jnp.sum(valid_BS, axis=1, keepdims=True), 1).astype(jnp.float32)
    return (jnp.sum(x_BSD, axis=1) / count_B1).astype(dtype)


def zero_padding(x_BSD: jax.Array, valid_BS: jax.Array) -> jax.Array:
    return jnp.where(valid_BS[:, :, None], x_BSD, jnp.zeros((), x_BSD.dtype))


def pool_text(x_BLD: jax.Array, valid_BL: jax.Array, pool: str, dtype: Dtype) -> jax.Array:
    if pool == "mean":
        return masked_mean(x_BLD, valid_BL, dtype)
    if pool == "first":  # a CLS / BOS token at position 0
        return x_BLD[:, 0].astype(dtype)
    raise ValueError(f"text pool must be 'mean' or 'first', got {pool!r}")


def input_projection(module: nn.Module, name: str, x_BSE: jax.Array, width: int) -> jax.Array:
    """Linear map of a tower's tokens (width E) to the fusion width. The input dimension is named
    `proj` (as in TwoTower's projections): `embed` on both dims would shard one mesh axis twice."""
    e = x_BSE.shape[-1]
    w = param(
        module,
        f"{name}_kernel",
        nn.initializers.lecun_normal(),
        (e, width),
        ("proj", "embed"),
        module.param_dtype,
    )
    b = param(
        module, f"{name}_bias", nn.initializers.zeros, (width,), ("norm",), module.param_dtype
    )
    return dense(x_BSE, w, module.dtype, bias=b)


def typed_projections(
    module: nn.Module, img_BNE: jax.Array, txt_BLE: jax.Array, width: int
) -> tuple[jax.Array, jax.Array]:
    """(img_BND, txt_BLD): both towers' tokens projected to the fusion width (`image_proj`,
    `text_proj`), each plus its modality's row of a learned type embedding (`type_embedding`
    [2, width]: image, text), so a model that mixes the two sets of tokens can tell them apart."""
    type_emb = param(
        module,
        "type_embedding",
        nn.initializers.normal(0.02),
        (2, width),
        (None, "embed"),
        module.param_dtype,
    ).astype(module.dtype)
    img_BND = input_projection(module, "image_proj", img_BNE, width) + type_emb[0][None, None]
    txt_BLD = input_projection(module, "text_proj", txt_BLE, width) + type_emb[1][None, None]
    return img_BND, txt_BLD


class Streams(NamedTuple):
    """A fusion's inputs. A fusion that reads tokens gets both token streams and their validity
    (boolean, all True where not given); one that reads pooled vectors gets both of those."""

    image_pooled_BD: jax.Array | None
    image_tokens_BND: jax.Array | None
    text_pooled_BD: jax.Array | None
    text_tokens_BLD: jax.Array | None
    image_valid_BN: jax.Array | None
    text_valid_BL: jax.Array | None


class Fusion(Precision):
    """Base of every fusion: the call convention (module doc), with its inputs checked once here,
    and the keyword-only `dtype`/`param_dtype`. A fusion says what it reads (`reads`: "tokens" or
    "pooled") and whether it can return attention maps (`attention_maps`), and implements
    `fuse(streams, return_attention)`."""

    reads = "tokens"
    attention_maps = False

    def __call__(
        self,
        image_pooled_BD: jax.Array | None = None,
        image_tokens_BND: jax.Array | None = None,
        text_pooled_BD: jax.Array | None = None,
        text_tokens_BLD: jax.Array | None = None,
        text_valid_BL: jax.Array | None = None,
        *,
        image_valid_BN: jax.Array | None = None,
        return_attention: bool = False,
    ) -> FusionOutput:
        name = type(self).__name__
        if return_attention and not self.attention_maps:
            raise ValueError(
                f"{name} has no cross-attention to return; use CrossAttentionFusion or "
                "CoAttentionFusion for attention maps"
            )
        given = dict(
            image_pooled_BD=image_pooled_BD,
            image_tokens_BND=image_tokens_BND,
            text_pooled_BD=text_pooled_BD,
            text_tokens_BLD=text_tokens_BLD,
        )
        needed = ("image_tokens_BND", "text_tokens_BLD")
        if self.reads == "pooled":
            needed = ("image_pooled_BD", "text_pooled_BD")
        for key in needed:
            if given[key] is None:
                raise ValueError(f"{name} needs {key}, got None")
        valid = (None, None)
        if self.reads == "tokens":
            valid = (
                validity(image_valid_BN, image_tokens_BND),
                validity(text_valid_BL, text_tokens_BLD),
            )
        streams = Streams(*given.values(), *valid)
        return self.fuse(streams, return_attention)

    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        raise NotImplementedError


class CrossAttentionFusion(Fusion):
    """Single-stream cross-attention fusion (ALBEF / BLIP text encoder): a stack of `depth`
    CrossBlocks over the text tokens (self-attention, optionally causal, then cross-attention to
    the image tokens), then a final LayerNorm. Runs at the text width; the image width may differ.
    pooled_BD: [B, D_text] by `pool` ("mean" over valid text tokens, or "first" = CLS/BOS).
    Attention maps: "text_to_image" [B, H, L, N].
    """

    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "mean"
    causal: bool = False
    activation: str = "gelu_tanh"
    attention_maps = True

    @nn.compact
    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        img_BND, x_BLD = s.image_tokens_BND, s.text_tokens_BLD
        img_valid_BN, txt_valid_BL = s.image_valid_BN, s.text_valid_BL
        self_mask_BLL = key_mask(txt_valid_BL, x_BLD.shape[1])
        probs_BHLN = None
        for i in range(self.depth):
            last = return_attention and i == self.depth - 1
            out = CrossBlock.of(self, f"block{i}")(
                x_BLD, img_BND, self_mask_BLL, img_valid_BN, self.causal, return_attention=last
            )
            x_BLD, probs_BHLN = out if last else (out, probs_BHLN)
        x_BLD = LayerNorm(self.dtype, self.param_dtype, name="ln_final")(x_BLD)
        return FusionOutput(
            pool_text(x_BLD, txt_valid_BL, self.pool, self.dtype),
            text_tokens_BLD=zero_padding(x_BLD, txt_valid_BL),
            attention={"text_to_image": probs_BHLN} if return_attention else None,
        )


class CoAttentionFusion(Fusion):
    """Two-stream co-attention (ViLBERT): in each of `depth` layers the text stream queries the
    image stream and the image stream queries the text stream, both reading the other's tokens
    from the previous layer, each followed by its own MLP (and, with `self_attention`, preceded by
    its own self-attention). The streams keep their own widths. Pooled per stream (text: `pool`;
    image: mean over valid tokens), then `combine`: "concat" -> [image; text] of
    [B, D_img + D_txt], or "product" (ViLBERT's element-wise product; equal widths) -> [B, D].
    Attention maps: "text_to_image" [B, H, L, N] and "image_to_text" [B, H, N, L].
    """

    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "mean"
    combine: str = "concat"
    self_attention: bool = False
    activation: str = "gelu_tanh"
    attention_maps = True

    @nn.compact
    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        if self.combine not in ("concat", "product"):
            raise ValueError(f"combine must be 'concat' or 'product', got {self.combine!r}")
        img_BND = s.image_tokens_BND.astype(self.dtype)
        txt_BLD = s.text_tokens_BLD.astype(self.dtype)
        img_valid_BN, txt_valid_BL = s.image_valid_BN, s.text_valid_BL
        if self.combine == "product" and img_BND.shape[-1] != txt_BLD.shape[-1]:
            raise ValueError(
                f"combine='product' needs equal widths, got image {img_BND.shape[-1]} and text "
                f"{txt_BLD.shape[-1]}"
            )
        n, length = img_BND.shape[1], txt_BLD.shape[1]
        masks = {}
        if self.self_attention:
            masks = dict(txt=key_mask(txt_valid_BL, length), img=key_mask(img_valid_BN, n))
        block = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            activation=self.activation,
            self_attention=self.self_attention,
            # The context is the other stream's residual stream, not a final-LN tower output.
            norm_context=True,
        )
        attention = None
        for i in range(self.depth):
            last = return_attention and i == self.depth - 1
            txt_out = CrossBlock(name=f"text_block{i}", **block)(
                txt_BLD, img_BND, masks.get("txt"), img_valid_BN, return_attention=last
            )
            img_out = CrossBlock(name=f"image_block{i}", **block)(
                img_BND, txt_BLD, masks.get("img"), txt_valid_BL, return_attention=last
            )
            if last:
                (txt_BLD, t2i), (img_BND, i2t) = txt_out, img_out
                attention = {"text_to_image": t2i, "image_to_text": i2t}
            else:
                txt_BLD, img_BND = txt_out, img_out
        txt_BLD = LayerNorm(self.dtype, self.param_dtype, name="ln_text")(txt_BLD)
        img_BND = LayerNorm(self.dtype, self.param_dtype, name="ln_image")(img_BND)
        txt_BD = pool_text(txt_BLD, txt_valid_BL, self.pool, self.dtype)
        img_BD = masked_mean(img_BND, img_valid_BN, self.dtype)
        if self.combine == "concat":
            pooled_BD = jnp.concatenate([img_BD, txt_BD], axis=-1)
        else:
            pooled_BD = (img_BD.astype(jnp.float32) * txt_BD.astype(jnp.float32)).astype(self.dtype)
        return FusionOutput(
            pooled_BD,
            image_tokens_BND=zero_padding(img_BND, img_valid_BN),
            text_tokens_BLD=zero_padding(txt_BLD, txt_valid_BL),
            attention=attention,
        )


class BottleneckFusion(Fusion):
    """Attention bottlenecks (MBT, Nagrani et al. 2021). Each modality has its own Transformer
    layers at `width`; from layer `fusion_layer` on, each layer runs modality m's block over
    [tokens_m; bottlenecks] and the bottleneck outputs are averaged over the modalities, so all
    cross-modal information passes through `num_bottlenecks` shared tokens (layers before
    `fusion_layer` are unimodal). pooled_BD: [B, width], the mean over modalities of each
    modality's mean over its valid tokens (after a per-modality final LayerNorm).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_bottlenecks: int = 4
    fusion_layer: int = 0
    activation: str = "gelu_tanh"

    @nn.compact
    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        if not 0 <= self.fusion_layer < self.depth:
            raise ValueError(
                f"fusion_layer={self.fusion_layer} must be in [0, depth={self.depth}): "
                "otherwise no layer exchanges information between the modalities"
            )
        x = {
            "image": input_projection(self, "image_proj", s.image_tokens_BND, self.width),
            "text": input_projection(self, "text_proj", s.text_tokens_BLD, self.width),
        }
        valid = {"image": s.image_valid_BN, "text": s.text_valid_BL}
        b, z = s.image_tokens_BND.shape[0], self.num_bottlenecks
        bottleneck = param(
            self,
            "bottleneck_tokens",
            nn.initializers.normal(0.02),
            (z, self.width),
            (None, "embed"),
            self.param_dtype,
        )
        z_BZD = jnp.broadcast_to(bottleneck.astype(self.dtype), (b, z, self.width))
        # In fusion layers the bottleneck tokens are always valid keys.
        ones_BZ = jnp.ones((b, z), jnp.bool_)
        masks = {
            m: key_mask(jnp.concatenate([v, ones_BZ], axis=1), v.shape[1] + z)
            for m, v in valid.items()
        }
        unimodal = {m: key_mask(v, v.shape[1]) for m, v in valid.items()}
        for i in range(self.depth):
            updates = []
            for m in x:
                block = Block(
                    self.num_heads,
                    self.mlp_dim,
                    self.dtype,
                    self.param_dtype,
                    self.activation,
                    name=f"{m}_block{i}",
                )
                if i < self.fusion_layer:
                    x[m] = block(x[m], unimodal[m])
                    continue
                s = x[m].shape[1]
                y_BSD = block(jnp.concatenate([x[m], z_BZD], axis=1), masks[m])
                x[m] = y_BSD[:, :s]
                updates.append(y_BSD[:, s:].astype(jnp.float32))
            if updates:
                z_BZD = (sum(updates) / len(updates)).astype(self.dtype)
        pooled = []
        for m in x:
            x[m] = LayerNorm(self.dtype, self.param_dtype, name=f"ln_{m}")(x[m])
            pooled.append(masked_mean(x[m], valid[m], jnp.float32))
        return FusionOutput(
            (sum(pooled) / len(pooled)).astype(self.dtype),
            image_tokens_BND=zero_padding(x["image"], valid["image"]),
            text_tokens_BLD=zero_padding(x["text"], valid["text"]),
        )
