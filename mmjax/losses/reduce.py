"""Reductions shared by the objectives."""

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum(w * v) / sum(w) in float32; 0 (with zero, finite gradients) when sum(w) == 0.

    The denominator is swapped for 1 when it is 0 *before* dividing, not after: a `where` on
    the quotient would still put 0/0 = NaN into the backward pass.
    """
    values = values.astype(jnp.float32)
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(jnp.float32)
    if weights.shape != values.shape:
        raise ValueError(f"weights {weights.shape} must have the shape of values {values.shape}")
    total_w = jnp.sum(weights)
    denom = jnp.where(total_w > 0, total_w, 1.0)
    return jnp.sum(weights * values) / denom
