"""The modality discriminator of adversarial alignment: is an embedding an image's or a text's?

A two-layer MLP on the shared embeddings (E → M → 1). The objective applies it behind a gradient
reversal layer (`mmjax.losses.gradient_reversal`), so one optimizer step trains it to tell
the modalities apart while pushing the towers to make them indistinguishable.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Dtype, dense, param


class ModalityDiscriminator(nn.Module):
    """`emb_BE` → logits `[B]` in float32, positive = image. `hidden` is the MLP width M."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb_BE: jax.Array) -> jax.Array:
        e, m = emb_BE.shape[-1], self.hidden
        kernel_init = nn.initializers.lecun_normal()
        zeros = nn.initializers.zeros
        # "proj" is the embedding dimension's name in TwoTower's projections (unsharded).
        in_EM = param(self, "hidden_kernel", kernel_init, (e, m), ("proj", "mlp"), self.param_dtype)
        in_bias_M = param(self, "hidden_bias", zeros, (m,), ("mlp",), self.param_dtype)
        out_M1 = param(self, "out_kernel", kernel_init, (m, 1), ("mlp", None), self.param_dtype)
        out_bias_1 = param(self, "out_bias", zeros, (1,), (None,), self.param_dtype)
        h_BM = nn.gelu(dense(emb_BE, in_EM, self.dtype, bias=in_bias_M))
        logits_B1 = dense(h_BM, out_M1, self.dtype, bias=out_bias_1, out_dtype=jnp.float32)
        return logits_B1[:, 0]
