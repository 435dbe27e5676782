"""The pure train step: (state, batch) -> (state, metrics)."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax import losses
from mmjax.train.state import TrainState

# (params, batch) -> (scalar loss, dict of float32 scalars to log)
Objective = Callable[[dict, dict], tuple[jax.Array, dict]]


def contrastive_objective(model: nn.Module, loss_kind: str) -> Objective:
    """Two-tower contrastive objective (CLIP softmax or SigLIP sigmoid) over the global batch."""
    if loss_kind not in losses.LOSSES:
        raise ValueError(f"unknown loss {loss_kind!r}; choose one of {losses.LOSSES}")

    def objective(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        img_BE, txt_BE, aux = model.apply({"params": params}, batch["image"], batch["tokens"])
        per_example_B = losses.contrastive_loss(loss_kind, img_BE, txt_BE, aux)
        loss = jnp.mean(per_example_B)
        logs = {
            "train/logit_scale": aux["logit_scale"],
            "train/logit_bias": aux["logit_bias"],
            "train/image_norm": aux["image_norm"],
            "train/text_norm": aux["text_norm"],
        }
        return loss, logs

    return objective


def train_step(
    state: TrainState,
    batch: dict,
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict]:
    (loss, logs), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/param_norm": optax.tree.norm(params),
        "train/lr": schedule(state.step),
        **logs,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def jit_train_step(objective, tx, schedule, state_shardings, batch_sharding):
    """Jits the step once with explicit shardings; the old state is donated (updated in place)."""
    step = functools.partial(train_step, objective=objective, tx=tx, schedule=schedule)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
