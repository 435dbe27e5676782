"""Everything a training run builds from its config before the first step, in one place."""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from mmjax import parallel
from mmjax.models.two_tower import build_two_tower
from mmjax.train import optimizer
from mmjax.train import state as train_state
from mmjax.train import step as train_step


@dataclasses.dataclass(frozen=True)
class Trainer:
    model: nn.Module
    rules: parallel.Rules
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], train_state.TrainState]  # rng -> sharded state
    abstract_state: train_state.TrainState  # shapes + shardings: the restore target
    step: Callable  # jitted (state, batch) -> (state, metrics); trace under `rules` and `mesh`


def build_trainer(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int) -> Trainer:
    """Model, optimizer, sharded initialiser and jitted step of `config` on `mesh`."""
    model = build_two_tower(config, vocab_size)
    tx, schedule = optimizer.build_optimizer(config)
    rules = tuple(config.rules)
    size = config.data.image_size
    example_image = jnp.zeros((1, size, size, 3), jnp.float32)
    example_tokens = jnp.zeros((1, config.data.text_length), jnp.int32)
    # Initialisation needs no mesh context: its shardings come from the logical axes and rules.
    init, abstract = train_state.sharded_initializer(
        lambda key: model.init(key, example_image, example_tokens),
        tx,
        jax.random.key(config.seed),
        mesh,
        rules,
    )
    batch_sharding = parallel.batch_sharding(mesh, rules)
    objective = train_step.ContrastiveObjective(
        model, config.loss, config.loss_impl, mesh, parallel.batch_axes(rules)
    )
    step = train_step.jit_train_step(
        objective,
        tx,
        schedule,
        train_state.shardings_of(abstract),
        batch_sharding,
        config.microbatches,
    )
    return Trainer(model, rules, batch_sharding, init, abstract, step)
