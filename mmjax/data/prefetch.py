"""Host→device double buffering of training batches.

`DevicePrefetch` wraps a checkpointable iterator of host-local numpy batches. A background
thread takes the next batch from it and places it on the batch sharding
(`parallel.global_batch`) while the current step runs, so when the loop asks for batch n+1 it is
already on the devices and the step is dispatched at once: the transfer never sits between two
steps. At most one batch waits ahead (plus the one the running step reads), so device memory
holds two batches, not a queue of them.

Its checkpoint state is the wrapped iterator's state *after the last batch handed to the loop*
(recorded by the thread with each batch), never the state after the batch held ahead: saving
it and resuming continues with exactly the batch the loop would have taken next.
"""

from __future__ import annotations

import queue
import threading
import time

import grain
from jax.sharding import NamedSharding

from mmjax import parallel


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetch(grain.DatasetIterator):
    """Iterator of global, sharded batches, one placed ahead by a background thread. (A grain
    `DatasetIterator`, so grain's orbax handler checkpoints it like the iterator it wraps.)

    `last_wait` is the (start, end) `time.perf_counter()` interval the latest `next()` spent
    blocked waiting for its batch. The thread starts on the first `next()`; `close()` stops it
    and closes the wrapped iterator (worker processes) if it can be closed.
    """

    def __init__(self, host_iterator, sharding: NamedSharding, ahead: int = 1):
        super().__init__()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready: queue.Queue = queue.Queue()
        self._free = threading.Semaphore(ahead)
        self._source = host_iterator
        self._sharding = sharding
        self._ahead = ahead
        self._state = host_iterator.get_state()
        self.last_wait = (0.0, 0.0)

    @staticmethod
    def _fill(source, sharding, stop, free: threading.Semaphore, ready: queue.Queue) -> None:
        # (Not a method of the instance: a thread holding `self` would keep it from being
        # collected, and collecting it is what stops the thread when a run forgets `close`.)
        while True:
            free.acquire()  # a slot: the loop took a batch (or none was taken yet)
            if stop.is_set():
                return
            try:
                batch = parallel.global_batch(next(source), sharding)
                ready.put((batch, source.get_state()))
            except BaseException as e:  # StopIteration or a data error: raised in next()
                ready.put(_Raised(e))
                return

    def __next__(self) -> dict:
        if self._thread is None:
            args = (self._source, self._sharding, self._stop, self._free, self._ready)
            self._thread = threading.Thread(target=self._fill, args=args, daemon=True)
            self._thread.start()
        start = time.perf_counter()
        item = self._ready.get()
        self.last_wait = (start, time.perf_counter())
        if isinstance(item, _Raised):
            self._ready.put(item)  # every later next() raises it too
            raise item.error
        self._free.release()  # the thread may place the following batch now
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        """Moves the stream to `state` (drops a batch held ahead)."""
        self._halt()
        self._source.set_state(state)
        self._state = self._source.get_state()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._free.release()
            self._thread.join()
            self._thread = None
        self._stop, self._ready = threading.Event(), queue.Queue()
        self._free = threading.Semaphore(self._ahead)

    def close(self) -> None:
        """Stops the thread and closes the wrapped iterator (if it has `close`)."""
        if self._closed:
            return
        self._closed = True
        self._halt()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
