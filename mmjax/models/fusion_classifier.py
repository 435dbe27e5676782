"""Image (or video) + text -> class logits through a fusion module: multimodal classification,
VQA as answer classification, image–text matching (2 classes)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.errors import ConfigError
from mmjax.models.fusion import FUSIONS, build_fusion
from mmjax.models.layers import Dtype, LayerNorm, dense, param
from mmjax.models.two_tower import build_towers

# fusion kind -> (constructor argument, `model.fusion` field) pairs: `width` is the fused width
# (token fusions over concatenated streams, pooled fusions' output), `depth`/`num_heads`/`mlp_dim`
# size the fusion's Transformer layers (or late concat's MLP).
_LAYERS = (("depth", "depth"), ("num_heads", "num_heads"), ("mlp_dim", "mlp_dim"))
CONFIG_FIELDS = {
    "early_concat": (("width", "width"), *_LAYERS),
    "late_concat": (("out_dim", "width"), ("hidden_dim", "mlp_dim")),
    "gmu": (("out_dim", "width"),),
    "tensor": (("out_dim", "width"), ("rank_dim", "rank_dim")),
    "low_rank": (("out_dim", "width"), ("rank", "rank")),
    "cross_attention": _LAYERS,
    "co_attention": _LAYERS,
    "bottleneck": (("width", "width"), *_LAYERS),
    "graph": (("width", "width"), ("depth", "depth"), ("num_heads", "num_heads")),
}


class FusionClassifier(nn.Module):
    """towers -> fusion -> LayerNorm -> linear head. `image` is any tower returning
    (pooled_BD, tokens_BND) (ViT, VideoTower); `text` returns (pooled_BD, tokens_BLD).

    `__call__` returns float32 logits [B, num_classes], and with `return_attention` also the
    fusion's attention maps (cross-attention fusions; see FusionOutput)."""

    image: nn.Module
    text: nn.Module
    fusion: nn.Module
    num_classes: int
    pad_id: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, tokens_BL: jax.Array, return_attention: bool = False):
        img_pooled_BD, img_BND = self.image(images)
        txt_pooled_BD, txt_BLD = self.text(tokens_BL)
        out = self.fusion(
            img_pooled_BD,
            img_BND,
            txt_pooled_BD,
            txt_BLD,
            tokens_BL != self.pad_id,
            return_attention=return_attention,
        )
        h_BD = LayerNorm(self.dtype, self.param_dtype, name="ln_head")(out.pooled_BD)
        w = param(
            self,
            "head_kernel",
            nn.initializers.zeros,  # uniform predictions at step 0: the loss starts at log(C)
            (h_BD.shape[-1], self.num_classes),
            ("embed", None),
            self.param_dtype,
        )
        b = param(
            self, "head_bias", nn.initializers.zeros, (self.num_classes,), (None,), self.param_dtype
        )
        logits_BC = dense(h_BD, w, self.dtype, bias=b, out_dtype=jnp.float32)
        return (logits_BC, out.attention) if return_attention else logits_BC


def fusion_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The constructor arguments of `config.model.fusion.kind` from `config.model.fusion` (see
    CONFIG_FIELDS) and the compute dtype."""
    f = config.model.fusion
    if f.kind not in FUSIONS:
        raise ValueError(
            f"model.fusion.kind={f.kind!r} is unknown; use one of {', '.join(sorted(FUSIONS))}"
        )
    kwargs = {"dtype": jnp.dtype(config.dtype), **{a: f[k] for a, k in CONFIG_FIELDS[f.kind]}}
    if f.kind == "graph" and "video" in config:
        kwargs["grid"] = _video_grid(config)
    readout = f.get("readout", "attention")
    if f.kind == "graph":
        kwargs["readout"] = readout
    elif readout != "attention":  # a setting this fusion cannot use
        raise ConfigError(
            f"model.fusion.readout={readout!r} is the graph fusion's (model.fusion.kind=graph); "
            f"{f.kind} has no such readout: drop the setting"
        )
    return kwargs


def _video_grid(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The token grid of the video tower (graph fusion's spatial edges): (time, rows, columns)
    tubelets, or a chain of frames for the factorized tower. Image towers' square grids are
    found from the token count."""
    v = config.video
    if v.kind != "tubelet":
        return (v.frames,)
    side = config.data.image_size // config.model.image.patch_size
    return (v.frames // v.tubelet_size, side, side)


def build_fusion_classifier(
    config: ml_collections.ConfigDict, vocab_size: int, num_classes: int, image=None
) -> FusionClassifier:
    """Towers of `config.model` (or `image` in place of the ViT), the fusion of
    `config.model.fusion` and a `num_classes` head."""
    vit, text = build_towers(config, vocab_size)
    image = vit if image is None else image
    fusion = build_fusion(config.model.fusion.kind, **fusion_kwargs(config))
    return FusionClassifier(
        image=image,
        text=text,
        fusion=fusion,
        num_classes=num_classes,
        pad_id=config.model.text.pad_id,
        dtype=jnp.dtype(config.dtype),
    )
