"""Connectionist temporal classification (Graves et al. 2006) of an encoder's per-token
distributions against a text, as an extra loss term of speech to text (`optax.ctc_loss`)."""

import jax
import jax.numpy as jnp
import optax


def ctc_nll(
    logits_BAV: jax.Array, tokens_BL: jax.Array, pad_id: int, eot_id: int
) -> tuple[jax.Array, jax.Array]:
    """(CTC negative log-likelihood [B], number of target tokens [B]), float32.

    `tokens_BL` are decoder rows [BOS, ids..., EOT, PAD...]: the CTC targets are the ids between
    BOS and EOT, and the blank is `pad_id` (never a target). Every audio token is a frame (the
    clips have a fixed length; trailing silence is emitted as blanks).
    """
    labels_BL = tokens_BL[:, 1:]
    label_pad_BL = ((labels_BL == pad_id) | (labels_BL == eot_id)).astype(jnp.float32)
    frame_pad_BA = jnp.zeros(logits_BAV.shape[:2], jnp.float32)
    nll_B = optax.ctc_loss(
        logits_BAV.astype(jnp.float32), frame_pad_BA, labels_BL, label_pad_BL, blank_id=pad_id
    )
    return nll_B, jnp.sum(1.0 - label_pad_BL, axis=1)


def ctc_loss(logits_BAV: jax.Array, tokens_BL: jax.Array, pad_id: int, eot_id: int) -> jax.Array:
    """Mean CTC negative log-likelihood per target token over the batch (float32 scalar); the
    rows as in `ctc_nll`."""
    nll_B, count_B = ctc_nll(logits_BAV, tokens_BL, pad_id, eot_id)
    return jnp.sum(nll_B) / jnp.maximum(jnp.sum(count_B), 1.0)
