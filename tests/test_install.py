"""The package as a user installs it: a wheel built with `pip wheel`, installed into a fresh
virtualenv, and its command-line tools run from a directory outside the repository (so neither
the repository's `configs/` nor its source tree can be imported by accident).

To stay offline and fast, the fresh virtualenv gets mmjax's dependencies from the virtualenv
running these tests through a `.pth` path line. A directory added that way has its own `.pth`
files ignored, so an editable install of mmjax there stays inactive; the tests check that
`mmjax` is imported from the new virtualenv.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What `pip wheel` reads: pyproject.toml finds the packages (mmjax*) and the readme.
BUILD_INPUTS = ("pyproject.toml", "README.md", "mmjax")


def _run(python, *args, cwd, env, timeout=600):
    """Runs `python -m ...args` in `cwd`; the completed process, its output in the message of
    a failed assertion."""
    proc = subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel . --no-deps` builds from a copy of the build's inputs (a clean
    tree: no stale build/ of the checkout can leak into it)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy(REPO / name, source / name)
    wheel_args = ["-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(root / "dist")]
    _run(sys.executable, *wheel_args, cwd=root, env=os.environ)
    (path,) = (root / "dist").glob("mmjax-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(python of a fresh virtualenv holding the wheel, environment to run it in)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    subprocess.run([*pip, "--no-deps", "--no-index", str(wheel)], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return python, env


def test_the_wheel_holds_the_package_and_its_data_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmjax/bench/configs/clip_tiny_64.json" in names
    assert "mmjax/data/prompts/digits.json" in names
    assert "mmjax/config.py" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("mmjax-")}
    assert tops == {"mmjax"}  # no configs/, tests/ or train.py


def test_mmjax_is_imported_from_the_new_virtualenv(installed, tmp_path):
    python, env = installed
    code = "import mmjax, sys; print(mmjax.__file__); print(sys.prefix)"
    file, prefix = _run(python, "-c", code, cwd=tmp_path, env=env).stdout.split()
    assert Path(file).is_relative_to(prefix) and Path(prefix) == python.parent.parent
    missing = subprocess.run(
        [python, "-c", "import configs"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "No module named 'configs'" in missing.stderr


def test_training_a_recipe_file_outside_the_repository(installed, data_dir, tmp_path):
    """A recipe package of the user's own (one recipe building on a sibling, which builds on
    the base config), given by path, trains and writes its run directory."""
    python, env = installed
    recipes = tmp_path / "my_recipes"
    recipes.mkdir()
    (recipes / "__init__.py").write_text("")
    (recipes / "small.py").write_text(
        "from mmjax import config\n\n\n"
        "def get_config():\n"
        "    c = config.get_config()\n"
        "    c.model.embed_dim = 32\n"
        "    for tower in (c.model.image, c.model.text):\n"
        "        tower.update(width=32, depth=1, mlp_dim=64, num_heads=2)\n"
        "    return c\n"
    )
    (recipes / "siglip_small.py").write_text(
        "from my_recipes import small\n\n\n"
        "def get_config():\n"
        "    c = small.get_config()\n"
        "    c.loss = 'sigmoid'\n"
        "    return c\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir = tmp_path / "run"
    flags = ["--config.total_steps=2", "--config.batch_size=16", "--config.eval.batch_size=32"]
    flags += [f"--config.data.data_dir={data_dir}", "--config.data.num_train=64"]
    flags += ["--config.data.num_val=32", "--config.log_every=1", "--config.eval_every=0"]
    recipe = recipes / "siglip_small.py"
    args = ["-m", "mmjax.main", f"--config={recipe}", f"--workdir={workdir}", *flags]
    out = _run(python, *args, cwd=elsewhere, env=env).stdout
    assert f"workdir: {workdir}" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["train/loss"])
    assert "zeroshot/color/top1_heldout" in summary
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["loss"] == "sigmoid" and saved["model"]["embed_dim"] == 32


def test_bench_finds_its_packaged_configs(installed, data_dir, tmp_path):
    """`bench train` on the packaged open_clip config by name; `bench pipeline` on the base
    config (no --config): neither reads a file relative to the working directory."""
    python, env = installed
    args = ["-m", "mmjax.bench", "train", "--open-clip-config", "clip_tiny_64", "--batch", "4"]
    args += ["--steps", "1", "--warmup", "0", "--rounds", "1", "--json"]
    result = json.loads(_run(python, *args, cwd=tmp_path, env=env).stdout.splitlines()[-1])
    assert result["model"]["name"] == "clip_tiny_64" and result["model"]["image_size"] == 64
    assert result["model"]["vocab_size"] == 49408 and result["batch"] == 4
    (variant,) = result["variants"]
    assert variant["framework"] == "mmjax" and len(variant["step_s"]) == 1

    args = ["-m", "mmjax.bench", "pipeline", "--batch", "8", "--batches", "1", "--threads", "0"]
    args += ["--stage-examples", "4", "--json", "--override", f"data.data_dir={data_dir}"]
    args += ["--override", "data.num_train=64", "--override", "data.num_val=32"]
    result = json.loads(_run(python, *args, cwd=tmp_path, env=env).stdout.splitlines()[-1])
    assert result["config"] == "base" and result["dataset"] == "shapes"
    assert result["runs"][0]["images_per_s"] > 0


@pytest.mark.interop
def test_open_clip_import_finetune_evaluate_and_export(installed, data_dir, tmp_path):
    """Import open_clip weights, fine-tune them as the import's hint says (learning rate 0),
    evaluate the imported model and export the fine-tuned one back: open_clip's weights."""
    torch = pytest.importorskip("torch", reason="needs the interop extra")
    open_clip = pytest.importorskip("open_clip", reason="needs the interop extra")
    from safetensors.numpy import load_file, save_file

    python, env = installed
    env = {**env, "MMJAX_DATA_DIR": data_dir}
    vision = dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16)
    text = dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=1)  # CLIP BPE
    cfg = {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    reference = {k: v.numpy() for k, v in open_clip.CLIP(**cfg).state_dict().items()}
    save_file(reference, str(tmp_path / "weights.safetensors"))

    imported = tmp_path / "imported"
    args = ["-m", "mmjax.interop.open_clip", "--model-config", "tiny.json"]
    args += ["--checkpoint", "weights.safetensors", "--workdir", "imported"]
    hint = _run(python, *args, cwd=tmp_path, env=env).stdout
    assert "mmjax.interop.open_clip_config.finetune_config(" in hint
    assert f"--config.init_from={imported / 'params'}" in hint

    args = ["-m", "mmjax.evaluate", "--workdir", str(imported), "--tasks", "zeroshot:digits"]
    _run(python, *args, cwd=tmp_path, env=env)
    record = json.loads((imported / "eval" / "zeroshot_digits.json").read_text())
    assert record["checkpoint"]["kind"] == "open_clip"
    assert record["counts"]["num_examples"] == 359
    assert 0.0 <= record["metrics"]["zeroshot/digits/top1"] <= 1.0

    recipe = tmp_path / "finetune.py"
    recipe.write_text(
        "from mmjax.interop.open_clip_config import finetune_config\n\n\n"
        "def get_config():\n"
        f"    return finetune_config({str(imported / 'open_clip_config.json')!r})\n"
    )
    run = tmp_path / "run"
    args = ["-m", "mmjax.main", f"--config={recipe}", f"--workdir={run}"]
    args += [f"--config.init_from={imported / 'params'}", "--config.total_steps=1"]
    args += ["--config.optim.learning_rate=0.0", "--config.optim.weight_decay=0.0"]
    args += ["--config.batch_size=8", "--config.eval.batch_size=16", "--config.eval_every=0"]
    args += ["--config.data.num_train=64", "--config.data.num_val=32"]
    _run(python, *args, cwd=tmp_path, env=env)
    assert json.loads((run / "summary.json").read_text())["steps"] == 1

    args = ["-m", "mmjax.interop.open_clip", "--model-config", "tiny.json", "--export", "run"]
    _run(python, *args, "--out", "exported.safetensors", cwd=tmp_path, env=env)
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(exported[name], value, name)
