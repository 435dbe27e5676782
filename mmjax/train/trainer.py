"""Everything a training run builds from its config before the first step, in one place."""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from mmjax import parallel
from mmjax.errors import ConfigError
from mmjax.train import optimizer
from mmjax.train import state as train_state
from mmjax.train import step as train_step
from mmjax.train.task import Objective, StatefulObjective, Task


@dataclasses.dataclass(frozen=True)
class Trainer:
    task: Task
    model: nn.Module
    rules: parallel.Rules
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], train_state.TrainState]  # rng -> sharded state
    abstract_state: train_state.TrainState  # shapes + shardings: the restore target
    step: Callable  # jitted (state, batch) -> (state, metrics); trace under `rules` and `mesh`
    objective: Objective  # what `step` differentiates (its jaxpr gives the model FLOPs)


def build_trainer(
    task: Task, config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int
) -> Trainer:
    """Model, optimizer, sharded initialiser and jitted step of `task` under `config` on `mesh`."""
    model = task.build_model(config, vocab_size)
    tx, schedule = optimizer.build_optimizer(config, task.frozen_prefixes(config))
    rules = tuple(config.rules)
    # Initialisation needs no mesh context: its shardings come from the logical axes and rules.
    init, abstract = train_state.sharded_initializer(
        lambda key: task.init_variables(model, config, key),
        tx,
        jax.random.key(config.seed),
        mesh,
        rules,
    )
    batch_sharding = parallel.batch_sharding(mesh, rules)
    objective = task.objective(model, config, mesh, rules)
    if abstract.model_state and not isinstance(objective, StatefulObjective):
        raise ConfigError(
            f"task={task.name}'s objective cannot train a model with state "
            f"({', '.join(abstract.model_state)}: BatchNorm); use model.image.norm=group"
        )
    step = train_step.jit_train_step(
        objective,
        tx,
        schedule,
        train_state.shardings_of(abstract),
        batch_sharding,
        config.microbatches,
    )
    return Trainer(task, model, rules, batch_sharding, init, abstract, step, objective)
