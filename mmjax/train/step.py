"""The pure train step: (state, batch) -> (state, metrics)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.train import gradcache
from mmjax.train.state import TrainState
from mmjax.train.task import Objective

NO_CEILING = np.float32(np.inf)  # the `loss_ceiling` that disables spike skipping


def train_step(
    state: TrainState,
    batch: dict,
    loss_ceiling: jax.Array,
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer step. The update is applied only if the loss and the gradient norm are
    finite and the loss is at most `loss_ceiling` (+inf = no spike check); otherwise parameters
    and optimizer state stay as they were, the step still counts (the batch is consumed) and
    `skipped` records it. So a non-finite value never enters the state, and never a checkpoint:
    from finite parameters, moments and a finite global gradient norm, the clipped gradient is
    finite and AdamW's step is bounded (|m̂| / (√v̂ + ε) is finite for ε > 0), so the new
    parameters are finite too.

    The decision is made before the update and the update runs under `lax.cond`: checking the
    new parameters instead (as this step once did) needs their norm before the state can be
    chosen, i.e. a select pass over every parameter and both moments after the update, which
    cost 6-8% of the tiny CLIP step on CPU (see README Performance).

    A model with state (`state.model_state` not empty: BatchNorm statistics) trains through a
    `StatefulObjective`; its new state is kept exactly when the update is applied."""
    new_model_state = state.model_state
    if state.model_state:  # (a static fact: the state's structure)
        if microbatches != 1:  # (configs refuse it first: see models.resnet.check_resnet_config)
            raise ValueError("GradCache microbatches cannot train a model with state")
        stateful = lambda p: _loss_and_aux(
            objective.with_state(p, state.model_state, batch, state.step)
        )
        (loss, (logs, new_model_state)), grads = jax.value_and_grad(stateful, has_aux=True)(
            state.params
        )
    elif microbatches == 1:
        (loss, logs), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, batch, state.step
        )
    else:  # a SplitObjective (validated before compiling)
        (loss, logs), grads = gradcache.value_and_grad(
            functools.partial(objective.embed, step=state.step),
            objective.loss,
            state.params,
            batch,
            microbatches,
        )
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= loss_ceiling)

    def update(grads, params, opt_state, _, model_state):
        with jax.named_scope("optimizer"):  # names only: profiles tell its ops apart
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, model_state

    keep = lambda grads, params, opt_state, model_state, _: (params, opt_state, model_state)
    params, opt_state, model_state = jax.lax.cond(
        ok, update, keep, grads, state.params, state.opt_state, state.model_state, new_model_state
    )
    step = state.step + 1
    new_state = state.replace(
        step=step,
        params=params,
        opt_state=opt_state,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        last_skipped=jnp.where(ok, state.last_skipped, step),
        skip_streak=jnp.where(ok, 0, state.skip_streak + 1),
        model_state=model_state,
    )
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/param_norm": optax.tree.norm(new_state.params),
        "train/lr": schedule(state.step),
        "train/skipped_steps": new_state.skipped,
        **logs,
    }
    return new_state, metrics


def _loss_and_aux(out: tuple) -> tuple:
    """`(loss, logs, new_model_state)` -> `(loss, (logs, new_model_state))` for has_aux."""
    loss, logs, new_model_state = out
    return loss, (logs, new_model_state)


def jit_train_step(objective, tx, schedule, state_shardings, batch_sharding, microbatches=1):
    """Jits the step once with explicit shardings; the old state is donated (updated in place).

    Call it as `step(state, batch, loss_ceiling)`, `NO_CEILING` to skip only non-finite steps.
    """
    step = functools.partial(
        train_step, objective=objective, tx=tx, schedule=schedule, microbatches=microbatches
    )
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
