"""Training batches prepared in worker processes (`data.workers > 0`).

Decoding, cropping and tokenizing are Python and NumPy work that holds the GIL for much of its
time; in a thread of the training process it competes with the loop that dispatches steps. grain's
`mp_prefetch` moves it into processes (spawned: each imports what the dataset needs, a few
seconds at the first batch); worker i prepares batches i, i+W, i+2W, ... and the iterator
returns them in stream order, so the stream is the same as with threads.

`WorkerIterator` keeps the thread iterator's checkpoint state, `{"next_index": k}` (the number of
batches handed out): a checkpoint written with any number of workers resumes with any other.
It restarts the workers on `ds[k:]`, the same index-based stream from batch k (every random
choice is seeded by the global position, so slicing changes nothing about the batches).
"""

from __future__ import annotations

import grain
from absl import flags


def _grain_flags_readable() -> None:
    """grain reads its absl flags (`--grain_*`) when it starts worker processes; a program that
    never parsed absl flags (pytest, `mmjax.bench`'s argparse) would fail there, so their
    defaults are taken as parsed. A program that parses flags later still can."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class WorkerIterator(grain.DatasetIterator):
    """Iterator over the batches of `ds` (a random-access `MapDataset`), prepared by `workers`
    processes, each holding up to `buffer` finished batches. (A grain `DatasetIterator`, so
    grain's orbax handler checkpoints it as JSON like the thread iterator.)"""

    def __init__(self, ds: grain.MapDataset, workers: int, buffer: int = 1):
        super().__init__()
        self._running = None  # the grain iterator of the worker pool, started on first use
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1 (0: use pipeline.iterate's threads)")
        self._ds = ds
        self._options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=buffer
        )
        self._next_index = 0

    def __next__(self) -> dict:
        if self._running is None:
            _grain_flags_readable()
            # Inside each worker: no threads of its own, it computes one batch at a time.
            per_worker = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            stream = self._ds[self._next_index :].to_iter_dataset(per_worker)
            self._running = iter(stream.mp_prefetch(self._options))
        batch = next(self._running)
        self._next_index += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self._stop_workers()
        self._next_index = int(state["next_index"])

    def _stop_workers(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None

    def close(self) -> None:
        """Stops the worker processes (also done when the iterator is collected)."""
        if not self._closed:
            self._closed = True
            self._stop_workers()
