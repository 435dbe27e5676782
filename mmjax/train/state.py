"""Train state, initialised directly into its shardings."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmjax import model_state, parallel


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training. Model and optimizer are closed over elsewhere."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    # Steps whose update was not applied (non-finite loss, gradient or parameters, or a loss
    # spike; see `step.train_step`), the newest such step (0 = none), and how many of the
    # latest steps in a row were skipped. Checkpointed, so a resumed run keeps counting.
    skipped: jax.Array
    last_skipped: jax.Array
    skip_streak: jax.Array
    # The model's non-parameter variables (`mmjax.model_state`: BatchNorm running statistics),
    # {} for a stateless model. Updated with the parameters, checkpointed and sharded with them.
    model_state: dict


def sharded_initializer(
    init_variables: Callable[[jax.Array], dict],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: parallel.Rules,
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
    """Returns (init, abstract_state): `init(rng)` builds the state straight into its shardings and
    `abstract_state` holds ShapeDtypeStructs with those shardings (a checkpoint-restore target).

    The state is never materialised whole on one device: its shape and logical axes come from
    `jax.eval_shape`, and the jitted initialiser writes each shard straight to its device.
    """

    def boxed_state(key: jax.Array) -> TrainState:
        params, state = model_state.split(init_variables(key))
        # Initialising the optimizer on boxed params gives its moments the same logical axes.
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero,
            params=params,
            opt_state=tx.init(params),
            skipped=zero,
            last_skipped=zero,
            skip_streak=zero,
            model_state=state,
        )

    abstract_boxed = jax.eval_shape(boxed_state, rng)
    logical_specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.unbox(abstract_boxed)
    shardings = parallel.logical_shardings(shapes, logical_specs, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    init = jax.jit(lambda key: nn.unbox(boxed_state(key)), out_shardings=shardings)
    return init, abstract


def shardings_of(abstract: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, abstract)
