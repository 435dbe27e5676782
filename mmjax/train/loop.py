"""The host training loop: one loop for every objective, mesh and process count."""

import json
import os
import time

import flax.linen as nn
import jax
import ml_collections

from mmjax import checkpoint, metrics, model_state, parallel
from mmjax.data import sources
from mmjax.data.prefetch import DevicePrefetch
from mmjax.errors import ConfigError, DataError, EvalSpecError
from mmjax.train import perf, pretrained, resume_check
from mmjax.train.guard import BadStepsError, SpikeDetector, StepGuard
from mmjax.train.preemption import Interrupted, PreemptionGuard, interrupt_on_signal
from mmjax.train.task import Task
from mmjax.train.trainer import build_trainer
from mmjax.train.validate import (
    validate_config,
    validate_disk_space,
    validate_workdir,
)
from mmjax.train.workdir_lock import WorkdirLock


def _preflight(task: Task, config: ml_collections.ConfigDict, workdir: str):
    """Every check that can fail on a bad setting, before anything compiles or trains:
    returns (mesh, trainer, evaluator, train iterator, checkpointer), or raises ConfigError."""
    validate_config(config, task)
    is_main = jax.process_index() == 0
    if is_main:
        validate_workdir(workdir)
    try:
        mesh = parallel.make_mesh(config.mesh)
        parallel.check_batch_size(config.batch_size, mesh, config.microbatches)
    except ValueError as e:  # a mesh or batch that cannot work: say so before compiling
        raise ConfigError(str(e)) from e

    try:
        tokenizer = task.tokenizer(config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r}: {e}") from e
    text = config.model.text
    ids, expected = (tokenizer.eot_id, tokenizer.pad_id), (text.eot_id, text.pad_id)
    # (A tokenizer without an end marker feeds no text tower: nothing to agree with.)
    if tokenizer.eot_id is not None and ids != expected:
        raise ConfigError(
            f"data.tokenizer={config.data.tokenizer!r} has EOT {tokenizer.eot_id} and pad "
            f"{tokenizer.pad_id}, but model.text.eot_id={text.eot_id} and pad_id={text.pad_id}; "
            "set them to the tokenizer's"
        )
    trainer = build_trainer(task, config, mesh, tokenizer.vocab_size)  # traces shapes, no compile
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    if is_main:
        validate_disk_space(
            workdir, trainer.abstract_state, config.keep_checkpoints, len(ckpt.all_steps())
        )
    try:
        train_iter = task.train_iterator(config, jax.process_index(), jax.process_count())
        evaluator = task.evaluator(config, trainer.model, trainer.batch_sharding)
    except (DataError, EvalSpecError) as e:
        raise ConfigError(str(e)) from e
    return mesh, trainer, evaluator, train_iter, ckpt


def run(task: Task, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `task` under `config` in `workdir`, resuming from its newest checkpoint. Returns
    the summary. (`mmjax.main.train(config, workdir)` looks the task up by `config.task`.)

    Raises ConfigError (before compiling anything) for settings that cannot work (a workdir
    that another run holds, or whose checkpoints another configuration wrote, included),
    `guard.BadStepsError` when bad steps end the run (see `mmjax.train.guard`), and
    `checkpoint_errors.CheckpointStorageError` when checkpoints cannot be read or written.
    """
    workdir = os.path.abspath(workdir)
    with WorkdirLock(workdir):
        return _run(task, config, workdir)


def _run(task: Task, config: ml_collections.ConfigDict, workdir: str) -> dict:
    t_start = time.time()
    is_main = jax.process_index() == 0
    mesh, trainer, evaluator, train_iter, ckpt = _preflight(task, config, workdir)
    # Read on the host outside any mesh context, and checked before anything trains.
    abstract_params = trainer.abstract_state.params
    start_from = task.pretrained(config, abstract_params)
    pretrained.check(start_from, abstract_params)
    resume_check.check_checkpoints_fit(ckpt, trainer.abstract_state, config, workdir)
    if is_main:  # only now: a rejected run leaves the config of the checkpoints in place
        resume_check.write_config(workdir, config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        restored = ckpt.restore(trainer.abstract_state, train_iter)
        if restored is None:  # a fresh run: initialised, then the saved parameters placed
            start, state = 0, trainer.init(jax.random.key(config.seed))
            params = pretrained.merge(state.params, abstract_params, start_from)
            model_state = pretrained.merge_state(state.model_state, start_from)
            state = state.replace(params=params, model_state=model_state)
        else:
            start, state = restored
            metrics.note(f"Resumed from step {start} in {workdir}")
        writer = metrics.MetricWriter(
            workdir,
            total_steps=config.total_steps,
            start_step=start,
            batch_size=config.batch_size,
            is_main=is_main,
        )
        spikes = SpikeDetector(config.guard.spike_zscore, config.guard.spike_window)
        step_guard = StepGuard(config.guard.policy, config.guard.max_consecutive_skips)
        step_guard.start(start, int(jax.device_get(state.skipped)))

        def check_bad_steps(done: int) -> None:
            counters = jax.device_get((state.skipped, state.last_skipped, state.skip_streak))
            warning = step_guard.check(done, *(int(c) for c in counters))
            if warning:
                metrics.note(warning)

        meter = perf.build_meter(config, trainer, start)
        batches = DevicePrefetch(train_iter, trainer.batch_sharding)  # batch n+1 placed during n
        last_metrics: dict = {}
        preempted_at = None
        try:
            with PreemptionGuard() as guard:
                for step in range(start, config.total_steps):
                    batch = next(batches)
                    if spikes.enabled:  # (the step donates `state`: read it first)
                        skipped_before = int(jax.device_get(state.skipped))
                    state, step_metrics = trainer.step(state, batch, spikes.ceiling())
                    meter.record_step(step, batches.last_wait, step_metrics["train/loss"])
                    if spikes.enabled:  # needs this step's loss on the host (see guard.py)
                        loss, after = jax.device_get((step_metrics["train/loss"], state.skipped))
                        spikes.observe(float(loss), applied=int(after) == skipped_before)
                    done = step + 1
                    log_due = done % config.log_every == 0 or done == config.total_steps
                    stop = guard.requested() and done < config.total_steps
                    save_due = (
                        (config.checkpoint_every and done % config.checkpoint_every == 0)
                        or done == config.total_steps
                        or stop
                    )
                    if log_due or save_due:  # never save past a bad step under "stop"
                        check_bad_steps(done)
                    if log_due:
                        last_metrics = {
                            k: float(v) for k, v in jax.device_get(step_metrics).items()
                        }
                        perf_metrics = meter.interval(done)
                        writer.write(done, {**last_metrics, **perf_metrics})
                        loss, mfu = last_metrics["train/loss"], perf_metrics.get("perf/mfu")
                        writer.progress(done, loss, mfu)
                    eval_due = config.eval_every and done % config.eval_every == 0
                    if eval_due and done < config.total_steps:
                        writer.write(done, evaluator(_eval_input(state)))
                    if save_due:
                        ckpt.save(done, state, batches)
                    if stop:
                        preempted_at = done
                        break
        except BadStepsError:
            ckpt.close()  # finishes writing the last good checkpoint
            writer.close()
            raise
        if preempted_at is not None:
            ckpt.close()  # waits for the asynchronous save
            writer.close()
            metrics.note(
                f"{guard.signal_name or 'preemption'} received: stopped after step "
                f"{preempted_at} with a checkpoint in {workdir}; rerun the same command to resume"
            )
            return {"steps": preempted_at, "preempted": True, "workdir": workdir}

        # The final checkpoint is on disk before the (possibly long) final evaluation, which a
        # signal then interrupts at once: the rerun restores it and evaluates again.
        ckpt.close()
        skipped = int(jax.device_get(state.skipped))
        try:
            with interrupt_on_signal():
                final = evaluator(_eval_input(state))
        except Interrupted as e:
            writer.close()
            metrics.note(
                f"{e.signal_name} received during the final evaluation: stopped; the final "
                f"checkpoint is in {workdir}; rerun the same command to evaluate it"
            )
            return {"steps": config.total_steps, "preempted": True, "workdir": workdir}
    writer.write_once(config.total_steps, final)
    summary = {
        **final,
        **({"task/metric_name": trainer.task.metric_name} if trainer.task.metric_name else {}),
        "steps": config.total_steps,
        "wall_seconds": time.time() - t_start,
        "train/loss": last_metrics.get("train/loss", _last_logged_loss(workdir)),
        "train/skipped_steps": skipped,
        **sources.build_counts(config.data),
        "workdir": workdir,
    }
    writer.write_summary(summary)
    writer.plot()
    writer.close()
    metrics.note(json.dumps({k: v for k, v in summary.items() if k != "workdir"}, sort_keys=True))
    return summary


def _eval_input(state) -> object:
    """What the evaluator takes: the parameters, with the model's state frozen if it has one."""
    return model_state.with_state(state.params, state.model_state)


def _last_logged_loss(workdir: str) -> float:
    """The newest `train/loss` in the workdir's metrics (a rerun of a finished run trains no
    step but should still report the run's final loss)."""
    losses = [r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
    return float(losses[-1]) if losses else float("nan")
