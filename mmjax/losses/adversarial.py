"""Modality-adversarial alignment with a gradient reversal layer (Ganin & Lempitsky, 2015).

A discriminator D tells image features (label 1) from text features (label 0). It is applied to
`gradient_reversal(features, lam)`: D itself descends its BCE, while the encoders below the
reversal receive -lam times that gradient, i.e. they *ascend* it and learn features D cannot
tell apart. One loss and one optimizer step train both sides:

    logits_img_B = disc(gradient_reversal(img_BE, lam))
    logits_txt_B = disc(gradient_reversal(txt_BE, lam))
    loss = mean(modality_discriminator_loss(logits_img_B, logits_txt_B))
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _reverse(x, lam):
    return x


def _reverse_fwd(x, lam):
    return x, lam


def _reverse_bwd(lam, g):
    # Cast back: a float32 `lam` would otherwise promote bf16 cotangents, which custom_vjp rejects.
    flip = lambda t: (-lam * t).astype(t.dtype)
    return jax.tree.map(flip, g), jnp.zeros_like(lam)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x, lam: float | jax.Array = 1.0):
    """Identity in the forward pass; multiplies the incoming gradient by -lam in the backward.

    `x` is a float array or a pytree of them. `lam` may be traced (a schedule, see
    `dann_lambda`) and receives no gradient.
    """
    return _reverse(x, jnp.asarray(lam, jnp.float32))


def dann_lambda(progress: float | jax.Array, gamma: float = 10.0) -> jax.Array:
    """DANN's ramp lam(p) = 2 / (1 + exp(-gamma p)) - 1 for training progress p in [0, 1]: starts
    at 0 so the encoders are not pushed by a discriminator that has not learnt anything yet."""
    p = jnp.asarray(progress, jnp.float32)
    return 2.0 * jax.nn.sigmoid(gamma * p) - 1.0


def modality_discriminator_loss(logits_image_B: jax.Array, logits_text_B: jax.Array) -> jax.Array:
    """Per-example BCE `[B]` of the modality discriminator, images labelled 1 and texts 0:

        L_i = ½ (-log σ(z_img_i) - log(1 - σ(z_txt_i))) = ½ (softplus(-z_img_i) + softplus(z_txt_i))

    (the mean over i is the BCE over all 2B features). It is log 2 at chance (logits 0).
    """
    if logits_image_B.shape != logits_text_B.shape:
        raise ValueError(
            f"image logits {logits_image_B.shape} and text logits {logits_text_B.shape} differ"
        )
    z_img = logits_image_B.astype(jnp.float32)
    z_txt = logits_text_B.astype(jnp.float32)
    return 0.5 * (jax.nn.softplus(-z_img) + jax.nn.softplus(z_txt))
