"""End-to-end resumes on a bad day, through the command line: another number of processes, a
signal during the final evaluation, and a fault-injection loop (kills, damaged files, changed
configs, a second run on the workdir) that must never lose a good checkpoint."""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax import config as base_config
from mmjax import main
from mmjax.checkpoint import Checkpointer
from mmjax.errors import ConfigError
from mmjax.metrics import read_metrics
from tests.test_train_e2e import REPO, TINY, env_with_devices, free_port, losses, train_cmd

pytestmark = pytest.mark.slow


def wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while max(losses(workdir), default=0) < step:
        assert proc.poll() is None, "the run ended first"
        assert time.time() < deadline
        time.sleep(0.02)


def start(workdir, data_dir, steps, env, cmd=None, **popen):
    """`python train.py` as `cmd` builds it (default `train_cmd`), running in the background."""
    cmd = cmd or train_cmd
    return subprocess.Popen(cmd(workdir, data_dir, *steps), env=env, text=True, **popen)


def base_cmd(workdir, data_dir, *extra):
    """`train_cmd` on the base config's ViT: over 60 steps at lr 2e-3 the default run's
    BatchNorm reductions across devices drift apart by up to 6e-4 relative (measured), which would
    hide what the test below checks, an exact resume on another process count. (absl wants
    --config before any --config.* override.)"""
    cmd = train_cmd(workdir, data_dir, *extra)
    return [*cmd[:2], f"--config={base_config.__file__}", *cmd[2:]]


@pytest.mark.multidevice
def test_resume_on_two_processes_and_back_on_one(data_dir, tmp_path):
    """1 process × 4 devices, stopped; resumed by 2 processes × 2 devices, stopped; finished by 1
    process: the losses equal an uninterrupted run's (to float32 reduction order, as between
    meshes). Once, the resume on 2 processes found no `process_<i>-of-2.json` and set every
    checkpoint aside."""
    total = 60  # enough steps that a signal lands mid-run, and across an epoch (32 steps)
    steps = [f"--config.total_steps={total}", "--config.checkpoint_every=0"]
    one = env_with_devices(4)
    reference = tmp_path / "uninterrupted"
    subprocess.run(base_cmd(reference, data_dir, *steps), check=True, env=one, capture_output=True)
    workdir = tmp_path / "resized"
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}

    proc = start(workdir, data_dir, steps, one, cmd=base_cmd, **piped)
    wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    first_stop = max(Checkpointer(str(workdir / "checkpoints")).all_steps())
    assert first_stop < total, "the signal came too late to test a resume"

    two = env_with_devices(2)
    two["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    port = free_port()
    distributed = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [
        start(
            workdir,
            data_dir,
            [*steps, *distributed, f"--process_id={i}"],
            two,
            cmd=base_cmd,
            **piped,
        )
        for i in range(2)
    ]
    wait_for_step(workdir, first_stop + 3, procs[0])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    assert f"Resumed from step {first_stop}" in outputs[0]
    second_stop = max(Checkpointer(str(workdir / "checkpoints")).all_steps())
    assert first_stop < second_stop < total

    last = subprocess.run(
        base_cmd(workdir, data_dir, *steps), env=one, capture_output=True, text=True
    )
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"Resumed from step {second_stop}" in last.stdout
    assert not os.path.exists(workdir / "checkpoints" / "corrupt")
    ref, got = losses(reference), losses(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, total + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)


SLOW_FINAL_EVALUATION = """
import sys, time
sys.path.insert(0, {repo!r})
from mmjax.tasks import get_task
from mmjax.train import loop
from tests.test_checkpoint_recovery import _config

data_dir, workdir, started = sys.argv[1:]
config = _config(data_dir, 4)
task = get_task(config.task)
make_evaluator = task.evaluator

def slow_evaluator(config, model, sharding):
    evaluate = make_evaluator(config, model, sharding)
    def run(params):
        open(started, "w").close()
        time.sleep(600)  # a long final evaluation
        return evaluate(params)
    return run

task.evaluator = slow_evaluator
loop.run(task, config, workdir)
"""


def test_sigterm_during_the_final_evaluation_stops_at_once(data_dir, tmp_path):
    from tests.test_checkpoint_recovery import _config

    workdir, started = str(tmp_path / "run"), str(tmp_path / "evaluating")
    script = SLOW_FINAL_EVALUATION.format(repo=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, data_dir, workdir, started],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not os.path.exists(started):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)  # not the 600 s evaluation
    assert proc.returncode == 0, out[-3000:]
    assert "received during the final evaluation" in out
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()[-1] == 4
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    summary = main.train(_config(data_dir, 4), workdir)  # the rerun evaluates
    assert summary["steps"] == 4 and "zeroshot/digits/top1" in summary


# --- fault injection -----------------------------------------------------------------------

ROUNDS = 20
TOTAL = 24
STEPS = [f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2"]
KEEP = 2  # the default keep_checkpoints
# Weighted towards the in-process actions: a subprocess round costs its start (~5-10 s here).
ACTIONS = ["sigkill", "sigkill", "sigterm", "damage", "damage", "config", "config", "second_run"]


def cli_config(data_dir):
    """The in-process twin of train_cmd(..., *STEPS): the same settings."""
    config = base_config.get_config()
    for flag in [*TINY, *STEPS, f"--config.data.data_dir={data_dir}"]:
        key, value = flag.removeprefix("--config.").split("=")
        *path, leaf = key.split(".")
        node = config
        for name in path:
            node = node[name]
        node[leaf] = type(node[leaf])(value)
    return config


def good_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return set(Checkpointer(directory).all_steps()) if os.path.isdir(directory) else set()


def set_aside(workdir):
    directory = os.path.join(workdir, "checkpoints", "corrupt")
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


def damage_newest(workdir, rng, damaged):
    """Damages a random file of the newest checkpoint, if an older good one remains (the last
    good checkpoint damaged stops every run, by design: see test_checkpoint_faults)."""
    steps = sorted(good_steps(workdir))
    if len(steps) < 2 or not set(steps[:-1]) - damaged:
        return None
    step_dir = os.path.join(workdir, "checkpoints", str(steps[-1]))
    victims = [
        *glob.glob(os.path.join(step_dir, "state", "d", "*")),
        os.path.join(step_dir, "state", "_METADATA"),
        os.path.join(step_dir, "state", "manifest.ocdbt"),
        os.path.join(step_dir, "data_position", "metadata"),
    ]
    # An earlier round may have removed one already (the same newest checkpoint, damaged again).
    victims = [path for path in victims if os.path.exists(path)]
    if not victims:
        return None
    victim = rng.choice(victims)
    how = rng.choice(["truncate", "garble", "remove"])
    if how == "remove":
        os.remove(victim)
    else:
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            if how == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size // 2)
                f.write(os.urandom(max(8, min(64, size // 4))))
    return steps[-1], f"{how} {os.path.relpath(victim, workdir)}"


def kill_mid_run(workdir, data_dir, env, rng, sig):
    """Starts a run and signals it a random moment after it logged a step it had not reached
    (mid-step, mid-save, mid-log; or in the final evaluation of a finished run)."""
    reached = max(losses(workdir), default=0)
    proc = start(workdir, data_dir, STEPS, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if max(losses(workdir), default=0) > reached:
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL, -signal.SIGTERM), err[-2000:]


def second_run_is_refused(workdir, data_dir, env):
    """Starts a run, and once it holds the workdir a second one, which must exit 2 naming it."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    first = start(workdir, data_dir, STEPS, env, **quiet)
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline:
        try:
            if json.load(open(lock))["pid"] == first.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    if first.poll() is None:
        second = subprocess.run(
            train_cmd(workdir, data_dir, *STEPS), env=env, capture_output=True, text=True
        )
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        if first.poll() is None:  # (unless it finished meanwhile)
            assert second.returncode == 2, second.stderr[-2000:]
            assert re.search(f"in use by another run .*pid {first.pid}", errors[0])
        first.send_signal(signal.SIGKILL)
    first.wait(timeout=300)


def test_fault_injection_never_loses_a_good_checkpoint(data_dir, tmp_path):
    seed = int(os.environ.get("MMJAX_FAULT_SEED", time.time_ns() % 2**31))
    print(f"fault-injection seed {seed} (rerun with MMJAX_FAULT_SEED={seed})")
    rng = random.Random(seed)
    env = env_with_devices(1)
    # The same compiled programs for every run: shorter rounds, and the losses stay bit-equal.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    reference = str(tmp_path / "uninterrupted")
    subprocess.run(train_cmd(reference, data_dir, *STEPS), env=env, check=True, capture_output=True)
    workdir = str(tmp_path / "faults")
    damaged: set[int] = set()  # steps on disk whose files this test damaged
    aside_before: set[str] = set()

    for round_ in range(ROUNDS):
        before = good_steps(workdir) - damaged
        action = rng.choice(ACTIONS)
        if action in ("sigkill", "sigterm"):
            sig = signal.SIGKILL if action == "sigkill" else signal.SIGTERM
            kill_mid_run(workdir, data_dir, env, rng, sig)
        elif action == "damage":
            hit = damage_newest(workdir, rng, damaged)
            if hit:
                damaged.add(hit[0])
                action = f"damage: {hit[1]}"
        elif action == "config" and before:  # (with no checkpoint it would just train)
            config = cli_config(data_dir)
            config.model.image.depth = rng.choice([2, 3])
            kept = open(os.path.join(workdir, "config.json"), "rb").read()
            with pytest.raises(ConfigError, match="does not fit this run"):
                main.train(config, workdir)
            assert open(os.path.join(workdir, "config.json"), "rb").read() == kept
        elif action == "second_run":
            second_run_is_refused(workdir, data_dir, env)

        after = good_steps(workdir)
        print(f"round {round_:2d} {action}: checkpoints {sorted(after)}")
        newer = {g: len([s for s in after if s > g]) for g in before}
        lost = [g for g in before if g not in after and newer[g] < KEEP]  # not rotated out
        assert not lost, f"round {round_} ({action}) lost good checkpoints {lost}"
        quarantined = set_aside(workdir)
        new_aside = {int(name.split(".")[0]) for name in quarantined - aside_before}
        assert new_aside <= damaged, f"round {round_} ({action}) set good checkpoints aside"
        # Set aside or rotated out: gone; saved again under the same step: good.
        damaged = {d for d in damaged if d in after and d not in new_aside}
        aside_before = quarantined

    last = subprocess.run(
        train_cmd(workdir, data_dir, *STEPS), env=env, capture_output=True, text=True
    )
    assert last.returncode == 0, last.stderr[-3000:]
    ref, got = losses(reference), losses(workdir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]
    finals = [r for r in read_metrics(workdir) if r["step"] == TOTAL and "train/loss" not in r]
    assert len(finals) == 1  # one final-evaluation row, however often it was interrupted
