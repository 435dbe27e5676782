"""One training run per workdir.

Two runs writing one workdir interleave `metrics.jsonl` and replace each other's checkpoints, so
process 0 holds `<workdir>/.lock` for the whole run (the other processes of a multi-process run
write no file of their own and learn the outcome from process 0). The file names its holder
(host, pid, start time) and carries a `flock`, which the kernel releases when the holder dies
however it dies (SIGKILL included). So a second run:

  - on the same host: gets the flock only if the holder is gone, and then takes the lock over;
  - on another host: trusts the flock when the filesystem shares it across hosts (NFSv4 does);
    otherwise it sees the holder's heartbeat (the file's modification time, renewed every
    minute) and takes over a lock left unrenewed for `STALE_AFTER_S`;

and otherwise stops with exit code 2 naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import metrics
from mmjax.errors import ConfigError

LOCK_FILE = ".lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 10 * 60.0


class WorkdirBusyError(ConfigError):
    """Another run holds the workdir."""


class WorkdirLock:
    """Context manager: holds `<workdir>/.lock` (process 0) or waits for process 0's verdict."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> WorkdirLock:
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except ConfigError as e:
                error = e
        if jax.process_count() > 1:  # all processes stop together, before any collective
            ok = np.array(error is None, np.int32)
            if not int(multihost_utils.broadcast_one_to_all(ok)) and error is None:
                error = WorkdirBusyError(f"the workdir lock {self.path} is held (see process 0)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _open_locked(self) -> tuple[int, dict | None]:
        """An fd of the lock file holding its flock, and the holder it names; WorkdirBusyError
        if the flock is held."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                message = f"cannot create {self.path} ({e}); pass a writable --workdir"
                raise ConfigError(message) from e
            holder = _read(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkdirBusyError(_busy_message(self.path, holder)) from None
            # A finishing run removes the file before letting go of its flock: if we locked
            # that removed file, someone may hold a new one; open again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, _read(fd)
            os.close(fd)

    def _acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            message = f"workdir {os.path.dirname(self.path)!r} cannot be created ({e})"
            raise ConfigError(f"{message}; pass a writable --workdir") from e
        fd, holder = self._open_locked()
        # We hold the flock: its holder is gone if it ran on this host (the kernel released
        # it). From another host the flock proves nothing on a filesystem that keeps locks
        # local, so its heartbeat must have stopped too.
        if holder and holder.get("host") != socket.gethostname():
            if _age_s(self.path) < STALE_AFTER_S:
                os.close(fd)
                raise WorkdirBusyError(_busy_message(self.path, holder))
        if holder:
            metrics.note(
                f"warning: taking over the lock {self.path} of a run that is gone "
                f"({_describe(holder)})",
                err=True,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a full or flaky disk: the lock itself still holds
                pass

    def release(self) -> None:
        """Removes the lock file and lets go of the flock (safe to call twice)."""
        self._stop.set()
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still holding the flock: no one else has taken it
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age_s(path: str) -> float:
    """Seconds since the lock's heartbeat, measured with the filesystem's clock (a file touched
    now), so clock skew between hosts does not count."""
    probe = f"{path}.probe.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(probe, "w"):
            pass
        now = os.stat(probe).st_mtime
        os.remove(probe)
        return now - os.stat(path).st_mtime
    except OSError:
        return 0.0  # cannot tell: treat the holder as alive


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


def _busy_message(path: str, holder: dict | None) -> str:
    workdir = os.path.dirname(path)
    if holder and holder.get("host") != socket.gethostname():
        how = (
            f"if that run is gone (its heartbeat stops; the lock is taken over "
            f"{STALE_AFTER_S / 60:.0f} minutes after), remove {path} to take over now"
        )
    else:
        how = "wait for it to finish, stop it, or pass another --workdir"
    return f"workdir {workdir} is in use by another run ({_describe(holder)}); {how}"
