"""What a restore may discard, where the data position lives, and one run per workdir: unit tests
on small states (the end-to-end runs are in test_checkpoint_recovery.py and test_resume_faults.py).
"""

import errno
import glob
import json
import os
import socket
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import main
from mmjax.checkpoint import DATA_ITEM, Checkpointer
from mmjax.checkpoint_errors import CheckpointDamagedError, CheckpointStorageError, is_damage
from mmjax.data import pipeline, stream_position
from mmjax.errors import ConfigError
from mmjax.train import workdir_lock
from mmjax.train.resume_check import check_checkpoints_fit
from mmjax.train.workdir_lock import WorkdirBusyError, WorkdirLock
from tests.test_eval_tasks import tiny_config

SOURCE = list(range(64))  # sample i is the integer i: a batch shows which samples it holds


def stream(batch_size, process_index=0, process_count=1):
    ds = pipeline.batched_stream(
        SOURCE,
        None,
        seed=0,
        global_batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return pipeline.positioned(pipeline.iterate(ds, num_threads=0), batch_size, len(SOURCE))


def take(iterator, n):
    return [np.asarray(next(iterator)).tolist() for _ in range(n)]


def state_of(value: float):
    # Enough arrays that a damaged file leaves many reads in flight (the noise test needs them).
    return {f"w{i}": jnp.full((64,), value + i, jnp.float32) for i in range(40)}


def saved_run(tmp_path, steps=(2, 4)):
    """A checkpoint directory with `steps`, each holding state_of(step) and a stream position."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
    it = stream(16)
    for step in steps:
        take(it, 1)
        ckpt.save(step, state_of(step), it)
    ckpt.close()
    return str(tmp_path / "checkpoints")


def restore(directory, iterator=None):
    return Checkpointer(directory, keep=5).restore(state_of(0), iterator or stream(16))


def damage(directory, step):
    (victim,) = glob.glob(os.path.join(directory, str(step), "state", "d", "*"))
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        f.write(os.urandom(64))


# --- what a restore may discard ----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("out of memory"),
        ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes"),
        OSError(errno.EIO, "Input/output error"),
        RuntimeError("something nobody anticipated"),
    ],
    ids=["MemoryError", "xla_oom", "EIO", "unknown"],
)
def test_a_failing_machine_discards_no_checkpoint(tmp_path, monkeypatch, error):
    directory = saved_run(tmp_path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    with pytest.raises(CheckpointStorageError, match="nothing was discarded") as caught:
        restore(directory)
    assert f"{directory}/4" in str(caught.value)
    assert Checkpointer(directory).all_steps() == [2, 4]
    assert not os.path.exists(os.path.join(directory, "corrupt"))


def test_damaged_newest_is_set_aside_and_the_previous_restored(tmp_path, capsys):
    directory = saved_run(tmp_path)
    damage(directory, 4)
    step, state = restore(directory)
    assert step == 2 and float(state["w0"][0]) == 2.0
    assert Checkpointer(directory).all_steps() == [2]
    assert len(glob.glob(os.path.join(directory, "corrupt", "4.*"))) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_the_last_damaged_checkpoint_stops_the_run_and_stays(tmp_path):
    directory = saved_run(tmp_path, steps=(2,))
    damage(directory, 2)
    with pytest.raises(CheckpointDamagedError, match="no older one is left"):
        restore(directory)
    assert Checkpointer(directory).all_steps() == [2]  # not moved: a rerun stops again
    assert not os.path.exists(os.path.join(directory, "corrupt"))


def test_missing_manifest_is_one_warning_not_a_flood(tmp_path, capsys, monkeypatch):
    reports = []  # what reaches Python's unraisable hook, which prints each as a traceback
    directory = saved_run(tmp_path)
    os.remove(os.path.join(directory, "4", "state", "manifest.ocdbt"))
    time.sleep(1.0)  # (late reports of earlier tests' failed restores arrive before this)
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    assert restore(directory)[0] == 2
    time.sleep(1.0)  # tensorstore's late completions arrive after the restore returned
    assert [str(r.exc_value) for r in reports] == []
    assert capsys.readouterr().err.count("is unreadable") == 1


def test_damage_is_told_from_other_errors():
    assert is_damage(ValueError("DATA_LOSS: CRC-32C checksum verification failed"))
    assert is_damage(ValueError("OUT_OF_RANGE: Requested byte range [0, 9) is not valid"))
    assert is_damage(ValueError('NOT_FOUND: Metadata at "step/.zarray" does not exist'))
    assert is_damage(json.JSONDecodeError("Unterminated string", "{", 1))
    assert is_damage(FileNotFoundError("_METADATA"))
    assert not is_damage(ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left"))
    assert not is_damage(ValueError("tree structures do not match"))  # a config mismatch
    assert not is_damage(MemoryError())
    assert not is_damage(OSError(errno.EIO, "Input/output error"))


def test_a_state_of_other_shapes_or_another_task_does_not_fit(tmp_path):
    directory = saved_run(tmp_path)
    workdir = str(tmp_path)
    config = ml_collections.ConfigDict({"task": "contrastive", "model": {"width": 64}})
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"task": "contrastive", "model": {"width": 32}}, f)
    narrower = {k: v[:32] for k, v in state_of(0).items()}
    with pytest.raises(ConfigError, match=r"w0 is float32\[64\] there, float32\[32\] here"):
        check_checkpoints_fit(Checkpointer(directory), narrower, config, workdir)
    with pytest.raises(ConfigError, match=r"model\.width: 32 -> 64"):
        check_checkpoints_fit(Checkpointer(directory), narrower, config, workdir)
    check_checkpoints_fit(Checkpointer(directory), state_of(0), config, workdir)  # fits
    config.task = "captioning"  # the same arrays, but another task's
    with pytest.raises(ConfigError, match='task: "contrastive" -> "captioning"'):
        check_checkpoints_fit(Checkpointer(directory), state_of(0), config, workdir)


# --- the data position -------------------------------------------------------------------


def test_data_position_is_stored_once_and_resumes_on_another_process_count(tmp_path):
    directory = saved_run(tmp_path)  # 2 batches of 16 read
    assert os.path.isdir(os.path.join(directory, "4", DATA_ITEM))
    assert not glob.glob(os.path.join(directory, "4", "**", "process_*.json"), recursive=True)
    expected = take(stream(16), 3)[2]  # the uninterrupted run's third global batch
    halves = []
    for p in range(2):  # resumed by 2 processes, each reads its half of that batch
        it = stream(16, process_index=p, process_count=2)
        Checkpointer(directory).restore(state_of(0), it)
        halves += take(it, 1)[0]
    assert halves == expected


def test_checkpoints_with_per_process_iterator_files_still_restore(tmp_path):
    """Checkpoints written before the position was global: grain's process_<i>-of-<n>.json."""
    import grain

    old = stream(16)
    take(old, 3)
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_of(3)),
            data=grain.checkpoint.CheckpointSave(old._iterator),
        ),
    )
    manager.wait_until_finished()
    it = stream(16)
    step, _ = Checkpointer(str(tmp_path / "checkpoints")).restore(state_of(0), it)
    assert step == 3 and take(it, 1) == take(old, 1)


def test_a_changed_batch_size_resumes_at_the_same_sample(tmp_path, capsys):
    directory = saved_run(tmp_path, steps=(1, 2, 3))  # 3 batches of 16: samples 0..47 read
    uninterrupted = [s for batch in take(stream(16), 4) for s in batch]
    it = stream(8)
    Checkpointer(directory).restore(state_of(0), it)
    # The 49th sample of the epoch onwards, not batch 3 of the new stream (samples 24..31).
    assert take(it, 2) == [uninterrupted[48:56], uninterrupted[56:64]]
    assert "batch size changed from 16 to 8" in capsys.readouterr().err


def test_remap_rounds_down_and_counts_the_repeated_samples():
    # 1 batch of 16 read; batches of 32 restart the epoch and show those 16 again.
    assert stream_position.remap(1, (16, 4), (32, 2)) == (0, 16)
    assert stream_position.remap(5, (16, 4), (32, 2)) == (2, 16)  # epoch 1, sample 16
    assert stream_position.remap(6, (16, 4), (8, 8)) == (12, 0)  # epoch 1, sample 32
    assert stream_position.remap(3, (20, 3), (25, 2)) == (2, 0)  # past the new last batch


# --- one run per workdir -----------------------------------------------------------------


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        holder = f"host {socket.gethostname()}, pid {os.getpid()}"
        with pytest.raises(WorkdirBusyError, match=holder):
            main.train(tiny_config(data_dir), workdir)
        assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]  # the second run wrote nothing
    assert os.listdir(workdir) == []  # released


def _stale_lock(workdir, host, age_s=0.0):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, workdir_lock.LOCK_FILE)
    with open(path, "w") as f:  # as a killed run leaves it: the file, but no flock on it
        json.dump({"host": host, "pid": 2**22 + 1, "started": time.time() - age_s}, f)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_a_killed_runs_lock_on_this_host_is_taken_over(tmp_path, capsys):
    path = _stale_lock(str(tmp_path), socket.gethostname())
    with WorkdirLock(str(tmp_path)):
        assert json.load(open(path))["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err


def test_another_hosts_lock_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    path = _stale_lock(str(tmp_path), "elsewhere.example")
    with pytest.raises(WorkdirBusyError, match=f"host elsewhere.example.*remove {path}"):
        WorkdirLock(str(tmp_path)).__enter__()
    _stale_lock(str(tmp_path), "elsewhere.example", age_s=2 * workdir_lock.STALE_AFTER_S)
    with WorkdirLock(str(tmp_path)):
        assert json.load(open(path))["host"] == socket.gethostname()
