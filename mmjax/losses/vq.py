"""Vector-quantisation losses of a VQ-VAE (`mmjax.models.vqvae`), pure functions in float32.

    codebook   ‖sg(z) − q‖²: moves each used code towards the encoder vectors assigned to it;
    commitment ‖z − sg(q)‖²: keeps the encoder's vectors near their codes;
    restart    Σ_dead ‖c_k − sg(t_k)‖² / K: dead-code restarts without mutable state (below).

Dead-code restarts: a code no grid vector of the (global) batch chose is *dead* for this step,
and is pulled towards a target among the batch's vectors: the one that maximises its cosine
similarity to the code plus the vector's quantisation error ‖z − q‖² (near the code, and badly
represented by the codebook). Near: the target moves little from step to step, so a dead code
gets there instead of chasing targets across the sphere (targets chosen by error alone jump
between batches, and dead codes never arrived). Badly represented: two dead codes that head for
the same vector split once one of them arrives, since it then represents that vector well. The
step stays a pure function of (params, batch): deterministic, the same on any mesh, and a
resumed run restarts the same codes; no usage counters are needed. A used code gets no restart
gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


def codebook_loss(z_ND: jax.Array, q_ND: jax.Array) -> jax.Array:
    """Mean ‖sg(z) − q‖² over vectors (gradient only to the codes)."""
    return jnp.mean(_sq_dist(jax.lax.stop_gradient(z_ND), q_ND))


def commitment_loss(z_ND: jax.Array, q_ND: jax.Array) -> jax.Array:
    """Mean ‖z − sg(q)‖² over vectors (gradient only to the encoder)."""
    return jnp.mean(_sq_dist(z_ND, jax.lax.stop_gradient(q_ND)))


def code_counts(codes: jax.Array, codebook_size: int) -> jax.Array:
    """How many times each code occurs in `codes` (any shape), float32 [K]."""
    one_hot = jax.nn.one_hot(codes.reshape(-1), codebook_size, dtype=jnp.float32)
    return jnp.sum(one_hot, axis=0)


def usage_stats(counts_K: jax.Array) -> dict[str, jax.Array]:
    """Fraction of codes used at least once, and the perplexity exp(H) of the code frequencies
    (K when every code is used equally, 1 when one code takes everything)."""
    p_K = counts_K / jnp.maximum(jnp.sum(counts_K), 1.0)
    entropy = -jnp.sum(jnp.where(p_K > 0, p_K * jnp.log(jnp.where(p_K > 0, p_K, 1.0)), 0.0))
    return {"used_fraction": jnp.mean(counts_K > 0), "perplexity": jnp.exp(entropy)}


def restart_targets(z_ND: jax.Array, q_ND: jax.Array, codebook_KD: jax.Array) -> jax.Array:
    """Indices [K] into `z_ND` of every code's restart target (see the module doc): argmax over
    vectors of cos(code, z) + ‖z − q‖², without gradient. Only dead codes use theirs."""
    z_ND = jax.lax.stop_gradient(z_ND.astype(jnp.float32))
    error_N = _sq_dist(z_ND, jax.lax.stop_gradient(q_ND))
    sim_KN = jax.lax.stop_gradient(codebook_KD.astype(jnp.float32)) @ z_ND.T
    return jnp.argmax(sim_KN + error_N[None], axis=1)


def restart_loss(
    z_ND: jax.Array, q_ND: jax.Array, codebook_KD: jax.Array, counts_K: jax.Array
) -> jax.Array:
    """Σ over codes unused in the batch of ‖c_k − t_k‖² / K (see the module doc): gradient only
    to the dead codes' rows."""
    dead_K = counts_K == 0
    targets_KD = jax.lax.stop_gradient(z_ND.astype(jnp.float32))[
        restart_targets(z_ND, q_ND, codebook_KD)
    ]
    per_code = _sq_dist(codebook_KD, targets_KD)
    return jnp.sum(jnp.where(dead_K, per_code, 0.0)) / codebook_KD.shape[0]
