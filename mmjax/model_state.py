"""A model's state besides its parameters: variables that change in the forward pass, not by the
optimizer (BatchNorm running statistics, the `batch_stats` collection of `models.resnet`).

The train state holds it as `model_state` (a dict of collections; empty for a stateless model,
so nothing changes for one). Training applies the model with those collections mutable and keeps
the updated values only when the step's update is applied (`train.step`); evaluation passes
`ParamsAndState` where it would pass parameters, and every evaluator applies the model with
`variables(params)`: the collections are then immutable, i.e. running statistics, frozen.
This module is a leaf: the trainer, the evaluators and the objectives all read it.
"""

from collections.abc import Callable
from typing import Any

import flax.struct

# The variable collections carried in the train state (others an `init` may create are dropped).
COLLECTIONS = ("batch_stats",)


@flax.struct.dataclass
class ParamsAndState:
    """Parameters with the model's state: what evaluators get for a stateful model."""

    params: Any
    state: dict


def with_state(params: Any, state: dict) -> Any:
    """What an evaluator takes: `params` alone for a stateless model, else `ParamsAndState`."""
    return ParamsAndState(params, state) if state else params


def variables(params: Any) -> dict:
    """Flax variables for `model.apply` from parameters or `ParamsAndState` (collections frozen)."""
    if isinstance(params, ParamsAndState):
        return {"params": params.params, **params.state}
    return {"params": params}


def split(variables: dict) -> tuple[Any, dict]:
    """(parameters, the state collections of `COLLECTIONS` present) of `model.init`'s output."""
    return variables["params"], {k: variables[k] for k in COLLECTIONS if k in variables}


def apply_training(
    apply: Callable[..., Any], params: Any, state: dict, *args, **kwargs
) -> tuple[Any, dict]:
    """`(apply(variables, *args, **kwargs), new state)` with the state's collections mutable
    (training mode: BatchNorm normalises with, and updates from, the batch); `apply` is a
    module's `apply`. A stateless model (`state` empty) runs as usual and returns `{}`."""
    if not state:
        return apply({"params": params}, *args, **kwargs), state
    out, updated = apply({"params": params, **state}, *args, mutable=list(state), **kwargs)
    return out, {k: updated[k] for k in state}
