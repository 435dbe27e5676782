"""Contrastive losses over the whole global batch, computed in float32.

Both losses take L2-normalised embeddings `img_BE`, `txt_BE` whose row i is a matching pair, and
return per-example losses `[B]` whose mean is the batch loss. Under `jax.jit` with sharded inputs
the logits matrix is the global B×B one, so every example sees every other example of the global
batch as a negative whatever the mesh (exact, not a per-device approximation). Memory-lean
sharded variants (gathered / ring-chunked) come with `jax.shard_map` and must equal these.
"""

import jax
import jax.numpy as jnp


def pairwise_logits(img_BE: jax.Array, txt_BE: jax.Array, scale: jax.Array, bias=0.0) -> jax.Array:
    """logits[i, j] = scale * <img_i, txt_j> + bias, in float32."""
    sim_BB = jnp.einsum(
        "ie,je->ij",
        img_BE.astype(jnp.float32),
        txt_BE.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return scale * sim_BB + bias


def softmax_contrastive(img_BE: jax.Array, txt_BE: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP): per-example mean of image→text and text→image cross-entropy."""
    logits_BB = pairwise_logits(img_BE, txt_BE, scale)
    positive_B = jnp.diagonal(logits_BB)
    i2t_B = jax.nn.logsumexp(logits_BB, axis=1) - positive_B
    t2i_B = jax.nn.logsumexp(logits_BB, axis=0) - positive_B
    return 0.5 * (i2t_B + t2i_B)


def sigmoid_contrastive(
    img_BE: jax.Array, txt_BE: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """Pairwise sigmoid loss (SigLIP). Example i's term sums over its row: image i against every
    text, the matching one labelled +1 and all others -1, so `mean` over examples equals SigLIP's
    sum over all B² pairs divided by B."""
    logits_BB = pairwise_logits(img_BE, txt_BE, scale, bias)
    b = logits_BB.shape[0]
    labels_BB = 2.0 * jnp.eye(b, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels_BB * logits_BB), axis=1)


KINDS = ("softmax", "sigmoid")
