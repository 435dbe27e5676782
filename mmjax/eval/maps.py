"""Where a model looks in an image for a text, per patch: what `python -m mmjax.visualize` draws.

A task that can be visualised returns one of these from `Task.visualizer(config)`:

  - `AttentionMaps` (fusion models): the last fusion layer's text→image cross-attention,
    averaged over heads, for every text token, and the model's class probabilities;
  - `SimilarityMaps` (two-tower models): the cosine similarity between each patch token
    projected into the embedding space and the text embedding, and the image–text cosine.

Both are called inside the model's mesh and rule context, on one normalised image [1, S, S, 3]
and its tokens [1, L], and return `Maps` on the g×g patch grid (ViT tokens are the patches in
row-major order).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import model_state
from mmjax.models.layers import dense


@dataclasses.dataclass(frozen=True)
class Maps:
    """`attention_Lgg` and `probs_C` (attention maps; each valid row sums to 1: a softmax over
    the patches) or `similarity_gg` and `cosine` (similarity maps); `prediction`: one line."""

    prediction: str
    attention_Lgg: np.ndarray | None = None
    probs_C: np.ndarray | None = None
    similarity_gg: np.ndarray | None = None
    cosine: float | None = None


def grid(x_SN: np.ndarray) -> np.ndarray:
    """[..., N] patch values -> [..., g, g]."""
    g = math.isqrt(x_SN.shape[-1])
    if g * g != x_SN.shape[-1]:
        raise ValueError(f"{x_SN.shape[-1]} image tokens do not form a square patch grid")
    return x_SN.reshape(*x_SN.shape[:-1], g, g)


class AttentionMaps:
    """`forward(module, images, tokens_BL, valid_BL) -> (logits_BC, attention)`, run as a method
    of the model, where `attention["text_to_image"]` is [B, H, L, N] (see `FusionOutput`);
    `describe(probs_C)` says the prediction in one line."""

    def __init__(self, forward: Callable, describe: Callable[[np.ndarray], str], pad_id: int):
        self._forward, self._describe, self._pad_id = forward, describe, pad_id

    def __call__(self, model: nn.Module, params, images, tokens_BL) -> Maps:
        tokens_BL = jnp.asarray(tokens_BL)
        logits_BC, attention = jax.jit(
            lambda p, *x: model.apply(model_state.variables(p), *x, method=self._forward)
        )(params, images, tokens_BL, tokens_BL != self._pad_id)
        attn_LN = np.asarray(jnp.mean(attention["text_to_image"][0], axis=0), np.float32)
        probs_C = np.asarray(jax.nn.softmax(logits_BC[0]), np.float32)
        return Maps(self._describe(probs_C), attention_Lgg=grid(attn_LN), probs_C=probs_C)


def _patch_and_text(m, images, tokens_BL):
    """TwoTower method: (patch_BNE, img_BE, txt_BE) in float32, before normalisation. With mean
    pooling ("gap") the image embedding is the mean of the patch projections."""
    pooled_BD, img_BND = m.image(images)
    patch_BNE = dense(img_BND, m.image_projection, m.dtype).astype(jnp.float32)
    img_BE = dense(pooled_BD, m.image_projection, m.dtype).astype(jnp.float32)
    return patch_BNE, img_BE, m.encode_text(tokens_BL)


class SimilarityMaps:
    """Two-tower models (`TwoTower`: an image tower, `image_projection`, `encode_text`)."""

    def __call__(self, model: nn.Module, params, images, tokens_BL) -> Maps:
        patch_BNE, img_BE, txt_BE = jax.jit(
            lambda p, *x: model.apply(model_state.variables(p), *x, method=_patch_and_text)
        )(params, images, jnp.asarray(tokens_BL))
        unit = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
        patch_NE, img_E, txt_E = (unit(np.asarray(x[0])) for x in (patch_BNE, img_BE, txt_BE))
        cosine = float(img_E @ txt_E)
        return Maps(
            f"image-text cosine similarity: {cosine:.4f}",
            similarity_gg=grid(patch_NE @ txt_E),
            cosine=cosine,
        )
