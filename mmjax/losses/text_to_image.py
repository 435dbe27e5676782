"""The text→image prior's loss (DALL-E): next-token cross-entropy over the text tokens and over
the image tokens, weighted (DALL-E weighs them 1/8 and 7/8: the image is what is generated, the
text is learned only as far as it helps).

Each term is a mean over its own predicted tokens, so the weights say how much each part counts
whatever the text and image lengths (a prompt has far fewer real tokens than padding).
"""

import jax
import jax.numpy as jnp
import optax


def text_nll(text_logits_BTV: jax.Array, text_BL: jax.Array, pad_id: int) -> jax.Array:
    """Mean cross-entropy of text tokens 1..L-1 given the logits of positions 0..L-2
    (T = L - 1); padding targets are not predicted, EOT is. 0 when no token is predicted."""
    targets_BT = text_BL[:, 1:]
    weights_BT = (targets_BT != pad_id).astype(jnp.float32)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        text_logits_BTV.astype(jnp.float32), targets_BT
    )
    return jnp.sum(nll_BT * weights_BT) / jnp.maximum(jnp.sum(weights_BT), 1.0)


def image_nll(image_logits_BNC: jax.Array, codes_BN: jax.Array) -> jax.Array:
    """Mean cross-entropy of the N image codes."""
    nll_BN = optax.softmax_cross_entropy_with_integer_labels(
        image_logits_BNC.astype(jnp.float32), codes_BN
    )
    return jnp.mean(nll_BN)
