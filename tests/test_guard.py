"""Bad steps: non-finite values and loss spikes are never applied; the policy decides the rest."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import parallel
from mmjax.tasks import get_task
from mmjax.train import guard
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.test_models import VOCAB
from tests.test_sharding import config_for, synthetic_batches


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def setup():
    config = config_for(dict(data=2, fsdp=2, tensor=1))
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:4])
    trainer = build_trainer(get_task(config.task), config, mesh, VOCAB)
    return config, mesh, trainer


def _run(setup, batches, ceilings):
    _, mesh, trainer = setup
    state = trainer.init(jax.random.key(0))
    history = [jax.device_get(state)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        for batch, ceiling in zip(batches, ceilings, strict=True):
            global_batch = parallel.global_batch(batch, trainer.batch_sharding)
            state, metrics = trainer.step(state, global_batch, ceiling)
            history.append(jax.device_get(state))
    return history, jax.device_get(metrics)


def test_nonfinite_and_spiking_steps_are_not_applied(setup):
    batches = list(synthetic_batches(5, 16))
    batches[1] = {**batches[1], "image": batches[1]["image"].copy()}
    batches[1]["image"][3, 0, 0, 0] = np.nan  # one NaN pixel poisons the loss and gradients
    ceilings = [NO_CEILING, NO_CEILING, NO_CEILING, np.float32(0.0), NO_CEILING]  # 3: a "spike"
    history, metrics = _run(setup, batches, ceilings)
    for i in (1, 3):  # skipped: parameters and optimizer state unchanged, the step still counts
        before, after = history[i], history[i + 1]
        assert _leaves_equal(before.params, after.params)
        assert _leaves_equal(before.opt_state, after.opt_state)
        assert int(after.step) == i + 1 and int(after.last_skipped) == i + 1
    for i in (0, 2, 4):  # applied (step 0 has learning rate 0 but moves Adam's moments)
        assert not _leaves_equal(history[i].opt_state, history[i + 1].opt_state)
        assert i == 0 or not _leaves_equal(history[i].params, history[i + 1].params)
    final = history[-1]
    assert int(final.skipped) == 2 and int(final.skip_streak) == 0
    assert [int(h.skip_streak) for h in history] == [0, 0, 1, 0, 1, 0]
    assert int(metrics["train/skipped_steps"]) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final.params))


def test_spike_detector_ceiling():
    detector = guard.SpikeDetector(zscore=6.0, window=8)
    assert detector.ceiling() == float("inf")  # not enough history yet
    for loss in [2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 2.02, 1.98]:
        detector.observe(loss, applied=True)
    # median 2.0, MAD 0.035 → ceiling 2.0 + 6 × 1.4826 × 0.025
    assert detector.ceiling() == pytest.approx(2.0 + 6 * 1.4826 * 0.035)
    detector.observe(50.0, applied=False)  # a skipped spike does not enter the window
    assert detector.ceiling() == pytest.approx(2.0 + 6 * 1.4826 * 0.035)
    assert guard.SpikeDetector(zscore=0.0, window=8).enabled is False
    with pytest.raises(ValueError):
        guard.SpikeDetector(zscore=3.0, window=2)


def test_step_guard_policies():
    skip = guard.StepGuard("skip", max_consecutive_skips=3)
    skip.start(step=100, skipped=4)  # resumed run: its earlier skips are old news
    assert skip.check(step=110, skipped=4, last_skipped=50, streak=0) is None
    warning = skip.check(step=120, skipped=6, last_skipped=117, streak=1)
    assert "2 step(s) between steps 111 and 120, the last at step 117" in warning
    with pytest.raises(guard.BadStepsError, match="the last 4 steps were all skipped"):
        skip.check(step=130, skipped=10, last_skipped=130, streak=4)

    stop = guard.StepGuard("stop", max_consecutive_skips=3)
    stop.start(step=0, skipped=0)
    assert stop.check(step=10, skipped=0, last_skipped=0, streak=0) is None
    with pytest.raises(guard.BadStepsError, match=r"1 step\(s\) between steps 11 and 20.*step 13"):
        stop.check(step=20, skipped=1, last_skipped=13, streak=0)
    with pytest.raises(ValueError, match="policy"):
        guard.StepGuard("ignore", 3)


# --- the loop ----------------------------------------------------------------------------


def _loop_config(data_dir, policy, total_steps=8):
    from tests.test_eval_tasks import tiny_config as eval_tiny_config

    c = eval_tiny_config(data_dir)
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = total_steps, 1, 0, 2
    c.optim.warmup_steps, c.optim.text_frozen_steps = 2, 0
    c.eval.tasks = ("zeroshot:digits",)
    c.guard.policy = policy
    return c


def _poison_step(monkeypatch, bad_steps):
    """Makes the batches of the given (1-based) steps contain a NaN pixel."""
    real = parallel.global_batch
    calls = {"n": 0}

    def poisoned(batch, sharding):
        calls["n"] += 1
        if calls["n"] in bad_steps:
            batch = {**batch, "image": batch["image"].copy()}
            batch["image"][0, 0, 0, 0] = np.nan
        return real(batch, sharding)

    monkeypatch.setattr(parallel, "global_batch", poisoned)


@pytest.mark.slow
def test_loop_skip_policy_counts_and_finishes(tmp_path, data_dir, monkeypatch, capsys):
    from mmjax.main import train as run
    from mmjax.metrics import read_metrics

    _poison_step(monkeypatch, {4})
    summary = run(_loop_config(data_dir, "skip"), str(tmp_path / "run"))
    assert summary["train/skipped_steps"] == 1
    assert "skipped 1 step(s) between steps 4 and 4, the last at step 4" in capsys.readouterr().out
    rows = {r["step"]: r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert np.isnan(rows[4]["train/loss"]) and np.isfinite(rows[8]["train/loss"])
    assert np.isfinite(summary["zeroshot/digits/top1"])


@pytest.mark.slow
def test_loop_stop_policy_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    from mmjax.checkpoint import Checkpointer
    from mmjax.main import train as run

    _poison_step(monkeypatch, {5})
    workdir = str(tmp_path / "run")
    with pytest.raises(guard.BadStepsError, match=r"between steps 5 and 5, the last at step 5"):
        run(_loop_config(data_dir, "stop"), workdir)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]
