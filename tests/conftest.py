"""Test-wide JAX settings, the shared test-size config and the session's datasets folder.

Tiers: `python -m pytest` runs the fast tier (pyproject's addopts deselect `slow`);
`python -m pytest -m slow` runs the slow one. Tests that need the interop extra are marked
`interop` and skip, with the reason, when it is not installed.

XLA_FLAGS must be set before jax is first imported.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax
import ml_collections
import pytest

# Safety switches: implicit rank promotion hides shape bugs; partitionable threefry makes
# sharded random numbers equal the unsharded ones.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
# Compiling dominates these tests of tiny models: skip XLA's expensive LLVM passes (the HLO
# passes, hence fusion, sharding and memory use, are unchanged; ~40% less test time).
# Subprocesses (the CLI tests) compile as users do.
jax.config.update("jax_disable_most_optimizations", True)


def tiny(
    config: ml_collections.ConfigDict, data_dir: str | None = None, **data
) -> ml_collections.ConfigDict:
    """`config` (a recipe) at test size, in place: 32-wide one-block towers (and fusion),
    4-frame 16 px clips for video recipes, batches of 16 (32 to evaluate), one step, every step
    logged, evaluation only at the end, 64 training and 32 validation examples. `data` updates
    `config.data`. The behaviour under test does not depend on size, and equal sizes let the
    tests share the built datasets of the session's `data_dir`."""
    from mmjax.tasks import get_task  # on use: XLA_FLAGS and the switches above come first

    m = config.model
    # A task refuses changes to the model fields it does not read (e.g. image_tokenizer's
    # network is configured by vqvae.*): those stay as they are.
    unread = get_task(config.task).unread_model_settings
    resize = lambda name: not any(name == u or name.startswith(f"{u}.") for u in unread)
    if resize("model.embed_dim"):
        m.embed_dim = 32
    for name in ("image", "text"):
        if resize(f"model.{name}"):
            m[name].update(width=32, num_heads=2)
            if m[name].get("kind") != "resnet":  # (a ResNet has layers, no depth or MLP)
                m[name].update(depth=1, mlp_dim=64)
    if "fusion" in m:
        m.fusion.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    if "video" in config:
        config.video.update(frames=4, temporal_depth=1)
        config.data.image_size = 16
    config.update(total_steps=1, batch_size=16, log_every=1, eval_every=0)
    config.eval.batch_size = 32
    config.data.update({"num_train": 64, "num_val": 32, **data})
    if data_dir is not None:
        config.data.data_dir = data_dir
    return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The session's datasets folder. Built-in datasets are built once per content (size,
    split sizes, seed) and reused: tests of equal `tiny` sizes share one build."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session", autouse=True)
def _pin_data_dir(data_dir):
    """`data.data_dir = ""` reads $MMJAX_DATA_DIR: pinned to the session's folder, so no test
    (nor a subprocess it starts) reads or writes the user's dataset cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMJAX_DATA_DIR", data_dir)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips for want of the interop extra must be marked `interop`: CI runs
    `-m "slow or interop"` with the extra installed, and an unmarked one would never run."""
    report = yield
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if report.skipped and "interop" in reason and item.get_closest_marker("interop") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({reason}) but is not marked `interop`: add "
            "@pytest.mark.interop so that CI runs it where the extra is installed"
        )
    return report
