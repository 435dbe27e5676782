"""Graceful preemption: SIGTERM / SIGINT end the run at a step boundary with a checkpoint.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM and wait a grace period before
SIGKILL. The handler only records the request; the loop finishes the step in flight, saves, waits
for the asynchronous save to complete, and returns, so rerunning the same command loses no step.
With several processes every one must stop after the same step (the checkpoint is collective),
so the flags are combined across processes each step.
"""

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Context manager: `requested()` turns True (on every process) once any process got one of
    SIGNALS; the previous handlers are restored on exit."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict = {}
        self.signal_name: str | None = None

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.array([local], np.int32))
        return bool(np.any(flags))


class Interrupted(Exception):
    """A signal of SIGNALS arrived during work that saves nothing (see `interrupt_on_signal`)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def interrupt_on_signal():
    """Within it, SIGTERM / SIGINT raise `Interrupted` at once (between two Python operations,
    so after the device call in flight) instead of waiting for a step boundary: for work after
    the last checkpoint, such as the final evaluation, which a rerun simply does again."""

    def interrupt(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, interrupt) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
