"""Corrupt and half-written checkpoints: detected, set aside, the previous good one restored,
and the resumed run ends bit-identical to an uninterrupted one."""

import errno
import glob
import os
import re
import shutil

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from mmjax import evaluate, main, parallel
from mmjax.checkpoint import Checkpointer
from mmjax.checkpoint_errors import CheckpointStorageError
from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.main import train as run
from mmjax.metrics import read_metrics
from mmjax.tasks import get_task
from mmjax.train import loop
from mmjax.train.preemption import PreemptionGuard
from mmjax.train.trainer import build_trainer
from tests.test_eval_tasks import tiny_config

pytestmark = pytest.mark.slow


def _config(data_dir, total_steps):
    c = tiny_config(data_dir)
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = total_steps, 1, 0, 2
    c.keep_checkpoints = 3
    c.optim.warmup_steps, c.optim.text_frozen_steps = 2, 0
    c.eval.tasks = ("zeroshot:digits",)
    return c


def run_until(monkeypatch, config, workdir, stop_after):
    """Runs `config` (its full schedule) but stops after step `stop_after` with a checkpoint,
    as a preemption would: the checkpoints then match the uninterrupted run's."""
    calls = {"n": 0}

    class StopAfter(PreemptionGuard):
        def requested(self) -> bool:
            calls["n"] += 1
            return calls["n"] >= stop_after

    with monkeypatch.context() as patch:
        patch.setattr(loop, "PreemptionGuard", StopAfter)
        summary = main.train(config, workdir)
    assert summary.get("preempted") and summary["steps"] == stop_after


def final_params(workdir):
    """(step, host params) of the newest checkpoint of a training workdir."""
    config, _ = evaluate.load_config(str(workdir))
    mesh = parallel.make_mesh(config.mesh)
    trainer = build_trainer(
        get_task(config.task), config, mesh, pipeline.tokenizer_for(config.data).vocab_size
    )
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
    step, state = checkpoints.restore_state(trainer.abstract_state)
    return step, jax.device_get(state.params)


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("recovery") / "reference")
    run(_config(data_dir, 8), workdir)
    return data_dir, workdir


# Which files a restore reads: the array data (orbax merges each save's per-process OCDBT
# files into state/d/) and the tree metadata. (Superseded per-process files under
# state/ocdbt.process_0/ are not read at all; damaging them changes nothing, which we checked.)
DAMAGE = {
    "truncated_data": ("state/d/*", "truncate"),
    "garbled_data": ("state/d/*", "garble"),
    "truncated_metadata": ("state/_METADATA", "truncate"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    reference, tmp_path, damage, capsys, monkeypatch
):
    data_dir, reference_dir = reference
    workdir = str(tmp_path / "run")
    run_until(monkeypatch, _config(data_dir, 8), workdir, 6)  # checkpoints 2, 4, 6
    newest = os.path.join(workdir, "checkpoints", "6")
    pattern, how = DAMAGE[damage]
    (victim,) = glob.glob(os.path.join(newest, pattern))
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        else:  # 64 random bytes in the middle: OCDBT's checksums catch it
            f.seek(size // 2)
            f.write(os.urandom(64))
    summary = run(_config(data_dir, 8), workdir)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err and "trying the previous one" in err
    # The bad checkpoint is kept aside for inspection, out of the rotation; the good ones stay.
    assert len(glob.glob(os.path.join(workdir, "checkpoints", "corrupt", "6.*"))) == 1
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4, 6, 8]
    # Resumed from step 4: steps 5..8 repeat the uninterrupted run's losses and parameters.
    ref_losses, losses = _losses(reference_dir), _losses(workdir)
    assert [losses[s] for s in range(5, 9)] == [ref_losses[s] for s in range(5, 9)]
    (ref_step, ref_params), (step, params) = final_params(reference_dir), final_params(workdir)
    assert step == ref_step == 8
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert summary["steps"] == 8


def test_half_written_save_is_ignored(reference, tmp_path, monkeypatch):
    data_dir, reference_dir = reference
    workdir = str(tmp_path / "run")
    run_until(monkeypatch, _config(data_dir, 8), workdir, 6)
    # A save interrupted mid-write (orbax writes into a temporary directory, renamed at the end).
    partial = os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "half_written"), "wb") as f:
        f.write(b"\0" * 100)
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4, 6]
    run(_config(data_dir, 8), workdir)
    losses, ref_losses = _losses(workdir), _losses(reference_dir)
    assert [losses[s] for s in (7, 8)] == [ref_losses[s] for s in (7, 8)]


def _copy_of(reference_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    return workdir


def _snapshot(workdir):
    """Every file of the workdir's checkpoints and its config.json, with their bytes."""
    files = glob.glob(os.path.join(workdir, "checkpoints", "**", "*"), recursive=True)
    files.append(os.path.join(workdir, "config.json"))
    return {f: open(f, "rb").read() for f in sorted(files) if os.path.isfile(f)}


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda c: c.model.image.update(depth=2), "model.image.depth: 1 -> 2"),
        (lambda c: c.optim.update(frozen_prefixes=("text/",)), "optim.frozen_prefixes"),
    ],
    ids=["deeper_model", "other_optimizer_state"],
)
def test_a_changed_config_stops_before_training_and_changes_nothing(
    reference, tmp_path, change, named
):
    """Once, any restore error set the checkpoints aside as "unreadable" and restarted from
    step 0; a config change is not damage: one error naming it, and everything kept."""
    data_dir, reference_dir = reference
    workdir = _copy_of(reference_dir, tmp_path)
    before = _snapshot(workdir)
    config = _config(data_dir, 10)
    change(config)
    with pytest.raises(ConfigError, match=re.escape(named)) as caught:
        run(config, workdir)
    assert "does not fit this run" in str(caught.value) and "\n" not in str(caught.value)
    assert _snapshot(workdir) == before  # checkpoints and config.json untouched
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "corrupt"))
    assert evaluate.main(["--workdir", workdir, "--tasks", "zeroshot:digits"]) == 0


def test_rerunning_a_finished_run_logs_its_final_evaluation_once(reference, tmp_path):
    data_dir, reference_dir = reference
    workdir = _copy_of(reference_dir, tmp_path)
    run(_config(data_dir, 8), workdir)  # as after a kill between the final row and summary
    finals = [r for r in read_metrics(workdir) if "zeroshot/digits/top1" in r]
    assert [r["step"] for r in finals] == [8]


def test_disk_full_mid_run_names_the_last_good_checkpoint(reference, tmp_path, monkeypatch, capsys):
    """The save of step 4 fails in orbax's background commit, as a full disk makes it fail."""
    data_dir, _ = reference
    workdir = str(tmp_path / "run")
    real_save = JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, x, directory):
        if f"{os.sep}4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_save(self, x, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    with pytest.raises(CheckpointStorageError) as caught:
        run(_config(data_dir, 8), workdir)
    message = str(caught.value)
    assert "No space left on device" in message and "\n" not in message
    assert f"the last good checkpoint is {workdir}/checkpoints/2" in message
    assert "Traceback" not in capsys.readouterr().err
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
    monkeypatch.undo()  # space freed: the rerun resumes from step 2 and finishes
    assert run(_config(data_dir, 8), workdir)["steps"] == 8
