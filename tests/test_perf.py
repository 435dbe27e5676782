"""Live MFU: the model FLOPs of a train step counted from the objective's jaxpr (equal to the
analytic count of `mmjax.bench.flops`, for every task), the peak (table, measured, override),
and the interval metrics, data wait included."""

import importlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import config as base_config
from mmjax import parallel
from mmjax.bench import flops as analytic
from mmjax.data.builtin import reviews
from mmjax.tasks import TASKS, get_task
from mmjax.train import flops, perf
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny

# --- the counter on small programs -------------------------------------------------------------


def _count(fn, *args, trained=(0,)):
    closed = jax.make_jaxpr(fn)(*args)
    flat = [jax.tree.leaves(a) for a in args]
    differentiable = [i in trained for i, leaves in enumerate(flat) for _ in leaves]
    return flops.jaxpr_train_flops(closed, differentiable)


W, X = jnp.ones((8, 16)), jnp.ones((4, 8))  # 4×8 @ 8×16: 512 multiply-adds
MATMUL = 2 * 4 * 8 * 16


def test_a_trained_matmul_counts_forward_and_both_backward_matmuls():
    assert _count(lambda w, x: x @ w, W, X) == 3 * MATMUL
    # Off the gradient path (a frozen teacher, stop_gradient): the forward only.
    assert _count(lambda w, x: x @ jax.lax.stop_gradient(w), W, X) == MATMUL
    assert _count(lambda w, x: x @ w, W, X, trained=()) == MATMUL


def test_loops_count_every_iteration_and_remat_counts_once():
    def scanned(w, x):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w[:, :8]), None), x, None, length=5)[0]

    assert _count(scanned, W, X) == 5 * 3 * 2 * 4 * 8 * 8
    assert _count(lambda w, x: jax.checkpoint(lambda x: x @ w)(x), W, X) == 3 * MATMUL

    def unknown_trips(w, x):
        return jax.lax.while_loop(
            lambda c: c[1] < x.sum(), lambda c: (c[0] @ w[:, :8], c[1] + 1), (x, 0.0)
        )[0]

    with pytest.raises(flops.UncountableError, match="while"):
        _count(unknown_trips, W, X)


def test_a_carry_the_parameters_reach_is_trained_in_every_iteration():
    # The carry starts as a constant and depends on w from the second iteration on; a scan body
    # is counted once for all iterations, so its matmul on the carry counts as trained (3×).
    def fn(w, x):
        body = lambda h, _: (h @ jnp.eye(8) + x @ w[:, :8], None)
        return jax.lax.scan(body, jnp.zeros((4, 8)), None, length=2)[0]

    assert _count(fn, W, X) == 2 * 3 * (2 * 4 * 8 * 8 + 2 * 4 * 8 * 8)


def test_shard_map_counts_every_shard():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    local = jax.shard_map(
        lambda w, x: x @ w,
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
        axis_names={"data"},
    )
    assert _count(local, W, jnp.ones((16, 8))) == 3 * 2 * 16 * 8 * 16


# --- every task's objective --------------------------------------------------------------------


def _step_flops(config):
    task = get_task(config.task)
    mesh = parallel.make_mesh(config.mesh)
    trainer = build_trainer(task, config, mesh, task.tokenizer(config).vocab_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        return flops.train_step_flops(
            trainer.objective,
            trainer.abstract_state.params,
            task.example_batch(config),
            config.batch_size,
            trainer.abstract_state.model_state,  # the default run's BatchNorm statistics
        )


CONTRASTIVE_SETTINGS = {
    "default": {},
    "scanned and rematerialised": {"model.scan_layers": True, "model.remat": "full"},
    "ring-chunked loss on 2x4 devices": {"loss_impl": "chunked", "mesh.fsdp": 4},
    "stem, class token, sigmoid, gathered": {
        "model.image.stem_channels": (8, 16),
        "model.image.pool": "cls",
        "loss": "sigmoid",
        "loss_impl": "gathered",
    },
    "GradCache microbatches": {"microbatches": 4},
}


@pytest.mark.parametrize("overrides", CONTRASTIVE_SETTINGS.values(), ids=CONTRASTIVE_SETTINGS)
def test_contrastive_step_flops_equal_the_analytic_count(overrides):
    config = base_config.get_config()
    config.batch_size = 32
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    # Remat recomputation, GradCache's extra forward and the ring's rerun are not model FLOPs.
    assert _step_flops(config) == analytic.train_step_flops(config, config.batch_size)


RECIPE_OF_TASK = {
    "contrastive": "default",
    "captioning": "captioning",
    "classification": "fusion",
    "matching": "matching",
    "text_classification": "text_classification",
    "video_contrastive": "video_contrastive",
    "video_qa": "video_qa",
    "image_tokenizer": "image_tokenizer",
    "text_to_image": "text_to_image",
    "speech_to_text": "speech_to_text",
}


def use_own_vectors(config, tmp_path) -> None:
    """A text_classification recipe reads a vectors file of its own: the packaged MiniLM vectors
    need the interop extra, which the fast tier does not install."""
    if config.task == "text_classification":
        path = tmp_path / "vectors.txt"
        path.write_text("".join(f"{w} 0.1 0.2 0.3 0.4\n" for w in reviews.vocabulary()))
        config.text_cnn.vectors = str(path)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_counts_its_model_flops(task, data_dir, tmp_path, monkeypatch):
    recipe = importlib.import_module(f"configs.{RECIPE_OF_TASK[task]}")
    config = tiny(recipe.get_config(), data_dir)
    assert config.task == task
    if task == "text_to_image":  # a random image tokenizer instead of a trained run's
        from mmjax.tasks import text_to_image
        from tests.test_text_to_image import random_tokenizer_run

        monkeypatch.setattr(text_to_image, "_tokenizer_run", random_tokenizer_run)
    use_own_vectors(config, tmp_path)
    per_step = _step_flops(config)
    config.batch_size *= 2
    # Linear in the batch (plus the in-batch similarity matrices of contrastive terms).
    assert 2 * per_step <= _step_flops(config) < 2.5 * per_step


# --- peak and interval metrics -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
        ("NVIDIA H100 80GB HBM3", "float32", 494.5),  # TF32
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),
        ("NVIDIA H200", "bfloat16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("TPU v4", "float32", 275.0),
        ("TPU v5 lite", "bfloat16", 197.0),
        ("TPU v5", "bfloat16", 459.0),
        ("TPU v6 lite", "bfloat16", 918.0),
        ("Some future chip", "bfloat16", None),
    ],
)
def test_known_peaks(kind, dtype, tflops):
    assert perf.known_peak_tflops(kind, dtype) == tflops


def test_the_peak_override_is_used():
    config = base_config.get_config()
    config.peak_tflops = 2.5
    peak = perf.peak_flops(config)
    assert peak.flops_per_second == 2.5e12 * jax.device_count()
    assert "peak_tflops" in peak.source


def test_cpu_peak_is_a_measured_gemm():
    config = base_config.get_config()
    peak = perf.peak_flops(config)
    assert peak.flops_per_second == perf.measured_gemm_flops("float32") > 1e8
    assert "measured" in peak.source


class FakeClock:
    def __init__(self, done_at):
        self.done_at = dict(done_at)
        self.watched = []

    def watch(self, index, output):
        self.watched.append(index)

    def sync(self):
        pass


def test_data_wait_counts_only_time_the_devices_were_idle():
    # Step 4 finished at t=10. Waiting for batch 5 from 9 to 12 cost 2 s (10 → 12); waiting for
    # batch 6 from 12.5 to 13 while step 5 ran until 14 cost nothing. The first step of a run
    # has no earlier step: its whole wait counts.
    clock = FakeClock({4: 10.0, 5: 14.0, 6: 20.0})
    meter = perf.IntervalMeter(16, 4, None, None, clock=clock)
    meter.record_step(5, (9.0, 12.0), None)
    meter.record_step(6, (12.5, 13.0), None)
    assert clock.watched == [5, 6]
    assert meter.starved_seconds() == pytest.approx(2.0)
    fresh = perf.IntervalMeter(16, 0, None, None, clock=FakeClock({}))
    fresh.record_step(0, (1.0, 1.5), None)
    assert fresh.starved_seconds() == pytest.approx(0.5)


def test_interval_metrics_follow_flops_and_peak():
    peak = perf.Peak(4e9, "test")
    meter = perf.IntervalMeter(8, 0, 1e9, peak, clock=FakeClock({}))
    out = meter.interval(10)
    per_second = out["perf/samples_per_second"] / 8  # steps per second
    assert out["perf/model_flops_per_second"] == pytest.approx(1e9 * per_second)
    assert out["perf/mfu"] == pytest.approx(out["perf/model_flops_per_second"] / 4e9)
    assert out["perf/data_wait_fraction"] == 0.0
    no_flops = perf.IntervalMeter(8, 0, None, None, clock=FakeClock({})).interval(1)
    assert set(no_flops) == {"perf/samples_per_second", "perf/data_wait_fraction"}


def test_the_step_clock_records_when_each_step_finished():
    clock = perf._StepClock()
    start = time.perf_counter()
    clock.watch(0, jnp.ones(3) * 2)
    clock.sync()
    assert start <= clock.done_at[0] <= time.perf_counter()


def test_peak_tflops_must_not_be_negative():
    from mmjax.errors import ConfigError
    from mmjax.train.validate import validate_config

    config = base_config.get_config()
    config.peak_tflops = -1.0
    with pytest.raises(ConfigError, match="peak_tflops"):
        validate_config(config, get_task(config.task))
    config.peak_tflops, config.data.workers = 0.0, -1
    with pytest.raises(ConfigError, match=r"data\.workers"):
        validate_config(config, get_task(config.task))
