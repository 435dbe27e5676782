"""Telling a damaged checkpoint from a failing disk, and keeping orbax's failure noise short.

A checkpoint may be set aside only when its files are provably damaged: a checksum that does not
match, a file shorter than its index says, a file that is missing, metadata that does not parse.
Anything else that interrupts a restore (out of memory, an I/O error, a network filesystem
hiccup, an error nobody anticipated) says nothing about the checkpoint, so the run stops and
discards nothing (`CheckpointStorageError`).
"""

from __future__ import annotations

import json
import logging
import sys

from mmjax.errors import ConfigError

# tensorstore raises ValueError("<STATUS>: ...") with an absl status code first. These three
# are what damaged files produce: a failed CRC-32C (DATA_LOSS), a byte range past the end of a
# truncated file (OUT_OF_RANGE), a missing file or manifest (NOT_FOUND). RESOURCE_EXHAUSTED
# (memory, disk), UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN... are conditions of the machine.
_DAMAGE_STATUSES = ("DATA_LOSS:", "OUT_OF_RANGE:", "NOT_FOUND:")


class CheckpointStorageError(RuntimeError):
    """Checkpoints could not be read or written for a reason of the machine (disk full, I/O
    error, out of memory); nothing was discarded. The message names the last good checkpoint."""


class CheckpointDamagedError(ConfigError):
    """Every checkpoint left is damaged; the last one stays in place and nothing trains."""


def is_damage(error: BaseException) -> bool:
    """Whether `error`, raised while restoring a checkpoint, proves its files damaged."""
    if isinstance(error, (json.JSONDecodeError, FileNotFoundError, UnicodeDecodeError)):
        return True
    message = str(error).lstrip()
    return isinstance(error, ValueError) and message.startswith(_DAMAGE_STATUSES)


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of `error` on one line, cut to about `limit` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(error).__name__}: {text}"


# --- noise ---------------------------------------------------------------------------------
#
# When a restore or save fails, orbax closes its asyncio loop while tensorstore still completes
# the reads and writes in flight; each completion then fails to call back into the closed loop,
# and tensorstore reports that "RuntimeError: Event loop is closed" as an unraisable exception
# (a traceback on stderr), from its own threads, during the restore and up to seconds after it:
# hundreds for a missing manifest. They say nothing beyond the one warning or error we print,
# so they are dropped; so are orbax's ERROR log records with tracebacks, whose content the one
# line repeats.


def _is_closed_loop(unraisable) -> bool:
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _ClosedLoopFilter:
    """A sys.unraisablehook that drops the closed-event-loop reports and passes on the rest."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        if not _is_closed_loop(unraisable):
            self.hook(unraisable)


class _OrbaxTracebackFilter(logging.Filter):
    """Drops orbax's ERROR records that carry a traceback (the failure reaches us as an
    exception, reported in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname.replace("\\", "/").split("/")
        return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)


_ORBAX_FILTER = _OrbaxTracebackFilter()


def quiet_failure_noise() -> None:
    """Installs both filters (once per process; the hook again if something replaced it since,
    as pytest does for each test)."""
    if not isinstance(sys.unraisablehook, _ClosedLoopFilter):
        sys.unraisablehook = _ClosedLoopFilter(sys.unraisablehook)
    absl_logger = logging.getLogger("absl")
    if _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


def silence_shutdown_noise() -> None:
    """Before exiting after a storage failure: orbax's abandoned write coroutines are collected
    at interpreter shutdown and each would print an "Exception ignored" traceback."""
    sys.unraisablehook = lambda _unraisable: None
