"""Captioning: next-token cross-entropy of a decoder under teacher forcing (CoCa's caption loss).

Per example, so a caption term can sit next to the contrastive loss in a GradCache objective
(`mmjax.train.gradcache`): each microbatch sums its own examples' token losses and counts, and
the loss over the global batch is Σ nll / Σ tokens, the same as without microbatches.
"""

import jax
import jax.numpy as jnp
import optax


def caption_nll(
    logits_BLV: jax.Array, tokens_BL: jax.Array, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """(summed negative log-likelihood [B], number of predicted tokens [B]), float32.

    Position t predicts token t + 1; padding targets are ignored, EOT is a target (the decoder
    learns to stop). The caption loss of a batch is `sum(nll_B) / max(sum(count_B), 1)`.
    """
    targets_BL = tokens_BL[:, 1:]
    weights_BL = (targets_BL != pad_id).astype(jnp.float32)
    logits_BLV = logits_BLV[:, :-1].astype(jnp.float32)
    nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    return jnp.sum(nll_BL * weights_BL, axis=1), jnp.sum(weights_BL, axis=1)


def mean_caption_loss(nll_B: jax.Array, count_B: jax.Array) -> jax.Array:
    """The mean loss per predicted token of the batch (0 when no token is predicted)."""
    return jnp.sum(nll_B) / jnp.maximum(jnp.sum(count_B), 1.0)
