"""The input path: host→device double buffering, worker processes, exact resume with both, and
the perf/* metrics of a training run."""

import os
import shutil

import grain
import jax
import numpy as np
import pytest

from mmjax import config as base_config
from mmjax import parallel
from mmjax.data import pipeline
from mmjax.data.prefetch import DevicePrefetch
from mmjax.main import train as run
from mmjax.metrics import read_metrics
from tests.conftest import tiny


def _rows(n=64):
    """A checkpointable iterator of 8-row batches whose values say which batch they are."""
    ds = grain.MapDataset.range(n).map(lambda i: {"x": np.full((8, 2), i, np.float32)})
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def _sharding():
    mesh = parallel.make_mesh(base_config.get_config().mesh)
    return parallel.batch_sharding(mesh, tuple(base_config.get_config().rules))


def _ids(batches):
    return [int(np.asarray(b["x"])[0, 0]) for b in batches]


def test_prefetch_yields_the_stream_on_the_batch_sharding():
    sharding = _sharding()
    batches = DevicePrefetch(_rows(), sharding)
    taken = [next(batches) for _ in range(5)]
    assert _ids(taken) == [0, 1, 2, 3, 4]
    assert all(b["x"].sharding == sharding for b in taken)
    start, end = batches.last_wait
    assert start <= end
    batches.close()


def test_prefetch_state_is_that_of_the_last_batch_handed_out():
    batches = DevicePrefetch(_rows(), _sharding())
    for _ in range(3):
        next(batches)
    # The thread has taken batch 3 from the source already; the state must not skip it.
    state = batches.get_state()
    expected = _ids(next(batches) for _ in range(4))
    resumed = DevicePrefetch(_rows(), _sharding())
    resumed.set_state(state)
    assert _ids(next(resumed) for _ in range(4)) == expected == [3, 4, 5, 6]
    # set_state on a running prefetcher drops the batch it held ahead.
    batches.set_state(state)
    assert _ids(next(batches) for _ in range(2)) == [3, 4]


def test_prefetch_raises_the_sources_error_in_next():
    def failing():
        for i in range(2):
            yield {"x": np.full((8, 2), i, np.float32)}
        raise OSError("disk gone")

    class Source:
        def __init__(self):
            self._it = failing()

        def __next__(self):
            return next(self._it)

        def get_state(self):
            return {}

    batches = DevicePrefetch(Source(), _sharding())
    assert _ids([next(batches), next(batches)]) == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        next(batches)
    with pytest.raises(OSError, match="disk gone"):
        next(batches)


def _stream(data_dir, workers):
    config = tiny(base_config.get_config(), data_dir)
    return pipeline.train_iterator(
        config.data,
        seed=0,
        global_batch_size=16,
        process_index=0,
        process_count=1,
        workers=workers,
    )


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.slow
def test_workers_give_the_thread_stream_and_resume_across_worker_counts(data_dir):
    threads = _stream(data_dir, 0)
    expected = [next(threads) for _ in range(7)]  # 4 batches per epoch: into the second
    pool = _stream(data_dir, 2)
    _same([next(pool) for _ in range(3)], expected[:3])
    state = pool.get_state()
    assert state["next_index"] == 3  # the thread iterator's state: batches handed out
    _same([next(pool) for _ in range(4)], expected[3:])
    # A state saved with workers resumes with threads and with another worker count.
    for workers in (0, 1):
        resumed = _stream(data_dir, workers)
        resumed.set_state(state)
        _same([next(resumed) for _ in range(4)], expected[3:])
    # (Worker processes stop when their iterator is collected.)


PERF_KEYS = {
    "perf/samples_per_second",
    "perf/data_wait_fraction",
    "perf/model_flops_per_second",
    "perf/mfu",
}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_reports_perf_and_resumes_exactly(workers, data_dir, tmp_path):
    """A run restarted from its step-2 checkpoint, with `workers` loader processes, continues
    the uninterrupted run's losses (written with a loader thread); every log row has the
    perf/* metrics, MFU against the overridden peak."""

    def config(workers):
        c = tiny(base_config.get_config(), data_dir)
        c.update(total_steps=4, checkpoint_every=2, keep_checkpoints=3, peak_tflops=0.001)
        c.data.workers = workers
        return c

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(config(0), str(full))
    shutil.copytree(full, resumed)
    for name in ["metrics.jsonl", "summary.json"]:
        os.remove(resumed / name)
    shutil.rmtree(resumed / "checkpoints" / "4")
    run(config(workers), str(resumed))
    rows = {d: [r for r in read_metrics(str(d)) if "train/loss" in r] for d in (full, resumed)}
    losses = {d: [r["train/loss"] for r in rows[d]] for d in rows}
    assert losses[resumed] == losses[full][2:]

    peak = 0.001e12 * jax.device_count()  # the override is per device
    for row in rows[full] + rows[resumed]:
        assert PERF_KEYS <= set(row)
        assert row["perf/mfu"] == pytest.approx(row["perf/model_flops_per_second"] / peak)
        assert 0.0 <= row["perf/data_wait_fraction"] <= 1.0
