"""The `perf/*` metrics of each logging interval: throughput, model FLOP/s, MFU and data wait.

- `perf/samples_per_second`: examples trained per second of wall time.
- `perf/model_flops_per_second`: the step's model FLOPs (`mmjax.train.flops`: matmuls only,
  remat recomputation excluded) × steps / wall time.
- `perf/mfu`: that over the peak of the devices the run uses (`peak_flops`).
- `perf/data_wait_fraction`: the share of wall time during which the devices had finished every
  step dispatched so far while the loop was blocked waiting for the next batch: time the input
  path cost the run. Time blocked in `next()` while a step was still running costs nothing, so it
  is not counted: with asynchronous dispatch the loop runs ahead of the devices, and raw blocked
  time would count waits the devices never saw. A daemon thread records when each step's output
  becomes ready (one `block_until_ready` per step on a scalar, off the training thread).

The first interval of a run includes compiling the step, as its samples/s always did.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import metrics

# Dense bf16 peak TFLOP/s per chip, by a substring of `jax.Device.device_kind` (first match
# wins: more specific names first). Sources: NVIDIA's and Google Cloud's data sheets.
KNOWN_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)
# float32 matmuls run as TF32 on these GPUs under JAX's default precision (half the bf16 rate);
# TPUs run them as bf16 passes (the bf16 rate).
TF32_GPU_KINDS = ("H100", "H200", "A100")
PROBE_SIZE = 2048  # the CPU probe: a PROBE_SIZE³ GEMM, as `python -m mmjax.bench train` uses


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_second: float  # of all devices of the run together
    source: str  # where the number comes from, for the start-of-run note


@functools.cache
def measured_gemm_flops(dtype: str, n: int = PROBE_SIZE, steps: int = 5) -> float:
    """Best-of-`steps` FLOP/s of an [n, n] @ [n, n] GEMM with `dtype` inputs and float32
    accumulation on the default device: the ceiling of a matmul-bound step. Measured once per
    process and dtype (~0.5 s on 2 CPU cores); best rather than median so that a burst of load
    from other processes does not lower the denominator."""
    a = jnp.ones((n, n), dtype) * jnp.asarray(0.5, dtype)
    gemm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(gemm(a, a))  # compile
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(gemm(a, a))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def known_peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's dense peak of one chip in the step's compute `dtype`, or None."""
    for name, tflops in KNOWN_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            tf32 = dtype == "float32" and any(k in device_kind for k in TF32_GPU_KINDS)
            return tflops / 2 if tf32 else tflops
    return None


def peak_flops(config: ml_collections.ConfigDict) -> Peak | None:
    """The run's peak FLOP/s: `config.peak_tflops` per device if set (> 0), else the table's
    entry for the device kind, else (CPU) a measured GEMM in the compute dtype; None for an
    accelerator the table does not know (the MFU metric is then left out)."""
    devices = jax.devices()
    kind = devices[0].device_kind
    if config.peak_tflops > 0:
        return Peak(config.peak_tflops * 1e12 * len(devices), "--config.peak_tflops")
    known = known_peak_tflops(kind, config.dtype)
    if known is not None:
        return Peak(known * 1e12 * len(devices), f"{kind}: {known:g} TFLOP/s per chip")
    if devices[0].platform != "cpu":
        return None
    # Fake CPU devices share the host's cores: the peak is the host's, once per process.
    probe = measured_gemm_flops(config.dtype)
    source = f"{PROBE_SIZE}³ {config.dtype} GEMM measured here: {probe / 1e9:.1f} GFLOP/s"
    return Peak(probe * jax.process_count(), source)


class _StepClock:
    """Times at which dispatched steps finished, recorded by a daemon thread."""

    def __init__(self):
        self._pending: queue.Queue = queue.Queue()
        self.done_at: dict[int, float] = {}
        thread = threading.Thread(
            target=self._watch, args=(self._pending, self.done_at), daemon=True
        )
        thread.start()
        weakref.finalize(self, self._pending.put, None)  # ends the thread with the clock

    @staticmethod
    def _watch(pending: queue.Queue, done_at: dict) -> None:
        while (item := pending.get()) is not None:
            index, output = item
            try:
                jax.block_until_ready(output)
            except Exception:  # a failed step: the loop reports it; the clock just moves on
                pass
            done_at[index] = time.perf_counter()
            pending.task_done()

    def watch(self, index: int, output) -> None:
        self._pending.put((index, output))

    def sync(self) -> None:
        """Waits until every watched step's finish time is recorded."""
        self._pending.join()


class IntervalMeter:
    """Turns the loop's timings into the `perf/*` metrics of each logging interval."""

    def __init__(
        self,
        batch_size: int,
        start_step: int,
        flops_per_step: int | None,
        peak: Peak | None,
        clock=None,  # (tests pass one with chosen finish times)
    ):
        self._batch_size = batch_size
        self._flops = flops_per_step
        self._peak = peak
        self._last = (start_step, time.perf_counter())
        self._clock = clock or _StepClock()
        self._waits: list[tuple[int, float, float]] = []  # (step, blocked from, until)

    def record_step(self, step: int, waited: tuple[float, float], output) -> None:
        """Step `step` was dispatched after the loop blocked for its batch during `waited`
        (perf_counter times); `output` is any array the step returns."""
        self._waits.append((step, *waited))
        self._clock.watch(step, output)

    def starved_seconds(self) -> float:
        """Seconds of the recorded waits during which the previous step had finished."""
        self._clock.sync()
        idle = 0.0
        for step, start, end in self._waits:
            # No earlier step in this run: the devices were idle for the whole wait.
            free_from = self._clock.done_at.get(step - 1, float("-inf"))
            idle += max(0.0, end - max(start, free_from))
        self._waits.clear()
        self._clock.done_at.clear()
        return idle

    def interval(self, done: int) -> dict[str, float]:
        """The `perf/*` metrics since the previous call (or the start), after step `done`."""
        now = time.perf_counter()
        steps, elapsed = done - self._last[0], max(now - self._last[1], 1e-9)
        self._last = (done, now)
        out = {
            "perf/samples_per_second": steps * self._batch_size / elapsed,
            "perf/data_wait_fraction": min(self.starved_seconds() / elapsed, 1.0),
        }
        if self._flops is not None:
            out["perf/model_flops_per_second"] = steps * self._flops / elapsed
            if self._peak is not None:
                out["perf/mfu"] = out["perf/model_flops_per_second"] / self._peak.flops_per_second
        return out


def build_meter(config, trainer, start_step: int) -> IntervalMeter:
    """The meter of a run: counts the step's model FLOPs (trace under the run's mesh and axis
    rules) and finds the peak; says once what is left out and why."""
    from mmjax.train import flops  # (the FLOP counter is only needed here)

    try:
        flops_per_step = flops.train_step_flops(
            trainer.objective,
            trainer.abstract_state.params,
            trainer.task.example_batch(config),
            config.batch_size,
            trainer.abstract_state.model_state,
        )
    except flops.UncountableError as e:
        metrics.note(f"perf/mfu and perf/model_flops_per_second are not reported: {e}")
        flops_per_step = None
    peak = peak_flops(config) if flops_per_step is not None else None
    if flops_per_step is not None and peak is None:
        metrics.note(
            f"perf/mfu is not reported: the peak of {jax.devices()[0].device_kind!r} is not "
            "known; set --config.peak_tflops (dense TFLOP/s per device in the compute dtype)"
        )
    if flops_per_step is not None:
        peak_text = f"; peak {peak.flops_per_second / 1e12:.3g} TFLOP/s ({peak.source})"
        metrics.note(
            f"model FLOPs per step: {flops_per_step / 1e9:.4g} GFLOP" + (peak_text if peak else "")
        )
    return IntervalMeter(config.batch_size, start_step, flops_per_step, peak)
