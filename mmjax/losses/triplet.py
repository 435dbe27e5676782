"""Margin (triplet) losses on cosine similarity, VSE++ (Faghri et al., 2018).

With s(a, p) the cosine similarity, anchor i, its positive p_i and in-batch negatives p_j (j ≠ i):

    hardest:  L_i = [m - s(a_i, p_i) + max_{j≠i} s(a_i, p_j)]_+
    sum:      L_i = Σ_{j≠i} [m - s(a_i, p_i) + s(a_i, p_j)]_+

VSE++ showed the hardest negative trains better retrieval than the sum of hinges, whose many
easy negatives dominate the gradient; the sum is kept as an option (VSE0, and a warm-up).
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / max(|x|, eps) along the last axis, in float32. Computed as rsqrt of the clamped squared
    norm so that a zero row maps to 0 with finite gradients (d sqrt / dx is infinite at 0)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine_similarity(a_AE: jax.Array, b_BE: jax.Array, eps: float = 1e-8) -> jax.Array:
    """sim[i, j] = <a_i, b_j> / (|a_i| |b_j|) in float32 (zero rows give 0)."""
    return jnp.einsum(
        "ie,je->ij", l2_normalize(a_AE, eps), l2_normalize(b_BE, eps), precision=_HIGHEST
    )


def triplet_from_similarity(
    sim_BB: jax.Array,
    margin: float | jax.Array,
    *,
    hardest: bool = True,
    mask_B: jax.Array | None = None,
) -> jax.Array:
    """Per-anchor hinge losses `[B]` from `sim_BB[i, j]` = s(anchor i, candidate j), positives on
    the diagonal. Candidates with `mask_B` False are never negatives and invalid anchors get 0;
    an anchor with no negative at all gets 0."""
    sim_BB = sim_BB.astype(jnp.float32)
    b = sim_BB.shape[0]
    negative_BB = ~jnp.eye(b, dtype=bool)
    if mask_B is not None:
        negative_BB &= mask_B.astype(bool)[None, :]
    pos_B = jnp.diagonal(sim_BB)
    if hardest:
        # -inf for non-negatives: max ignores them and the hinge of an empty row is [-inf]_+ = 0.
        hardest_B = jnp.max(jnp.where(negative_BB, sim_BB, -jnp.inf), axis=1)
        loss_B = jax.nn.relu(margin - pos_B + hardest_B)
    else:
        hinge_BB = jax.nn.relu(margin - pos_B[:, None] + sim_BB)
        loss_B = jnp.sum(jnp.where(negative_BB, hinge_BB, 0.0), axis=1)
    if mask_B is not None:
        loss_B = jnp.where(mask_B.astype(bool), loss_B, 0.0)
    return loss_B


def triplet_loss(
    anchor_BE: jax.Array,
    positive_BE: jax.Array,
    margin: float | jax.Array,
    *,
    hardest: bool = True,
    mask_B: jax.Array | None = None,
) -> jax.Array:
    """One-direction triplet loss `[B]`: anchor i against positive i and the other positives of
    the batch as negatives, on cosine similarity (see the module docstring)."""
    sim_BB = cosine_similarity(anchor_BE, positive_BE)
    return triplet_from_similarity(sim_BB, margin, hardest=hardest, mask_B=mask_B)


def bidirectional_triplet(
    img_BE: jax.Array,
    txt_BE: jax.Array,
    margin: float | jax.Array,
    *,
    hardest: bool = True,
    mask_B: jax.Array | None = None,
) -> jax.Array:
    """VSE++ loss `[B]`: image i as anchor against all texts plus text i as anchor against all
    images (sum of the two directions, as in the paper), from one similarity matrix."""
    sim_BB = cosine_similarity(img_BE, txt_BE)
    i2t_B = triplet_from_similarity(sim_BB, margin, hardest=hardest, mask_B=mask_B)
    t2i_B = triplet_from_similarity(sim_BB.T, margin, hardest=hardest, mask_B=mask_B)
    return i2t_B + t2i_B
