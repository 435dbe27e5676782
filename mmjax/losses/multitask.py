"""Combining several objectives into the one scalar the optimizer minimises."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def weighted_sum(
    losses: Mapping[str, jax.Array], weights: Mapping[str, float | jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """total = Σ_name weights[name] · losses[name] in float32; logs `loss/<name>` unweighted.

    Both dicts must name exactly the same objectives: a loss without a weight would silently be
    dropped and a weight without a loss usually means a typo or a disabled head, so both raise.
    Weight 0 is allowed (the loss is still logged). Weights may be traced (schedules). Names
    are summed in sorted order so the float result does not depend on dict order.
    """
    no_weight = sorted(set(losses) - set(weights))
    no_loss = sorted(set(weights) - set(losses))
    if no_weight or no_loss:
        raise ValueError(
            f"losses and weights must name the same objectives: losses without a weight "
            f"{no_weight}, weights without a loss {no_loss}"
        )
    if not losses:
        raise ValueError("weighted_sum needs at least one loss")
    total = jnp.zeros((), jnp.float32)
    logs = {}
    for name in sorted(losses):
        loss = jnp.asarray(losses[name])
        if loss.ndim != 0:
            raise ValueError(f"loss {name!r} must be a scalar, got shape {loss.shape}")
        weight = jnp.asarray(weights[name], jnp.float32)
        if weight.ndim != 0:
            raise ValueError(f"weight {name!r} must be a scalar, got shape {weight.shape}")
        total = total + weight * loss.astype(jnp.float32)
        logs[f"loss/{name}"] = loss
    return total, logs
