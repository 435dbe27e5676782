"""The host training loop: one loop for every objective, mesh and process count."""

import json
import os
import time

import flax.linen as nn
import jax
import ml_collections

from mmjax import checkpoint, metrics, parallel
from mmjax.data import pipeline
from mmjax.eval.shapes_eval import ShapesEvaluator
from mmjax.train.preemption import PreemptionGuard
from mmjax.train.pretrained import read_text_tower, with_pretrained
from mmjax.train.trainer import build_trainer
from mmjax.train.validate import ConfigError, validate_config, validate_workdir


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the summary."""
    t_start = time.time()
    validate_config(config)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        validate_workdir(workdir)
    try:
        mesh = parallel.make_mesh(config.mesh)
        parallel.check_batch_size(config.batch_size, mesh, config.microbatches)
    except ValueError as e:  # a mesh or batch that cannot work: say so before compiling
        raise ConfigError(str(e)) from e
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2, sort_keys=True))

    try:
        tokenizer = pipeline.tokenizer_for(config.data)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r}: {e}") from e
    text = config.model.text
    if (tokenizer.eot_id, tokenizer.pad_id) != (text.eot_id, text.pad_id):
        raise ConfigError(
            f"data.tokenizer={config.data.tokenizer!r} has EOT {tokenizer.eot_id} and pad "
            f"{tokenizer.pad_id}, but model.text.eot_id={text.eot_id} and pad_id={text.pad_id}; "
            "set them to the tokenizer's"
        )
    trainer = build_trainer(config, mesh, tokenizer.vocab_size)
    pretrained_text = read_text_tower(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        train_iter = pipeline.train_iterator(
            config.data,
            seed=config.seed,
            global_batch_size=config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
        )
        restored = ckpt.restore(trainer.abstract_state, train_iter)
        if restored is None:
            start, state = 0, trainer.init(jax.random.key(config.seed))
            state = with_pretrained(config, state, trainer.abstract_state, pretrained_text)
        else:
            start, state = restored
            print(f"Resumed from step {start} in {workdir}")
        writer = metrics.MetricWriter(
            workdir,
            total_steps=config.total_steps,
            start_step=start,
            batch_size=config.batch_size,
            is_main=is_main,
        )
        evaluator = ShapesEvaluator(config, trainer.model, trainer.batch_sharding)

        last_log = (start, time.time())
        last_metrics: dict = {}
        preempted_at = None
        with PreemptionGuard() as guard:
            for step in range(start, config.total_steps):
                batch = parallel.global_batch(next(train_iter), trainer.batch_sharding)
                state, step_metrics = trainer.step(state, batch)
                done = step + 1
                if done % config.log_every == 0 or done == config.total_steps:
                    last_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    now = time.time()
                    rate = (done - last_log[0]) * config.batch_size / max(now - last_log[1], 1e-9)
                    last_log = (done, now)
                    writer.write(done, {**last_metrics, "perf/samples_per_second": rate})
                    writer.progress(done, last_metrics["train/loss"])
                eval_due = config.eval_every and done % config.eval_every == 0
                if eval_due and done < config.total_steps:
                    writer.write(done, evaluator(state.params))
                stop = guard.requested() and done < config.total_steps
                if (
                    (config.checkpoint_every and done % config.checkpoint_every == 0)
                    or done == config.total_steps
                    or stop
                ):
                    ckpt.save(done, state, train_iter)
                if stop:
                    preempted_at = done
                    break
        if preempted_at is not None:
            ckpt.close()  # waits for the asynchronous save
            writer.close()
            print(
                f"{guard.signal_name or 'preemption'} received: stopped after step "
                f"{preempted_at} with a checkpoint in {workdir}; rerun the same command to resume"
            )
            return {"steps": preempted_at, "preempted": True, "workdir": workdir}

        final = evaluator(state.params)
        ckpt.close()
    writer.write(config.total_steps, final)
    summary = {
        **final,
        "steps": config.total_steps,
        "wall_seconds": time.time() - t_start,
        "train/loss": last_metrics.get("train/loss", _last_logged_loss(workdir)),
        "workdir": workdir,
    }
    writer.write_summary(summary)
    writer.plot()
    writer.close()
    if is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "workdir"}, sort_keys=True))
    return summary


def _last_logged_loss(workdir: str) -> float:
    """The newest `train/loss` in the workdir's metrics (a rerun of a finished run trains no
    step but should still report the run's final loss)."""
    losses = [r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
    return float(losses[-1]) if losses else float("nan")
