"""The one metrics writer: progress bar, TensorBoard, ``metrics.jsonl``, plots and summary; and
``note``, the one way the library prints a line.

Only process 0 (``is_main=True``) writes or prints; elsewhere every method returns at once.

In the workdir: ``metrics.jsonl`` holds one strict-JSON object per ``write``
(``{"step": 100, "train/loss": 2.3, ...}``), ``tb/`` the same scalars as TensorBoard events,
``plots/`` ``loss.png`` and ``eval.png``, and ``summary.json`` the final metrics.

Non-finite floats are stored as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (``json``'s default
``NaN`` is not JSON and breaks strict readers); ``read_metrics`` turns them back into floats.

On resume (``start_step > 0``), rows after ``start_step`` are dropped from ``metrics.jsonl`` and
purged from TensorBoard: the run executes those steps again and logs them again.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_PREFIXES = ("eval/", "zeroshot/", "retrieval/")

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def note(message: str, *, err: bool = False) -> None:
    """Prints one line of progress (with `err`, a warning, to stderr) on process 0 only, so a run
    on many processes says each thing once. The library prints through here, never `print`."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr if err else sys.stdout, flush=True)


def _scalar(name: str, value: Any) -> int | float:
    """A plain Python int or float from a Python, numpy or jax scalar (or a size-1 array)."""
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        return float(value)  # Also turns np.float64 (a float subclass) into a plain float.
    arr = np.asarray(value)  # Pulls jax arrays to the host.
    if arr.size != 1 or arr.dtype.kind in "cOSU":
        raise ValueError(
            f"metric {name!r} must be a real scalar, got dtype {arr.dtype} and shape {arr.shape}; "
            "reduce it (e.g. .mean()) before writing"
        )
    arr = arr.reshape(())
    return int(arr) if arr.dtype.kind in "biu" else float(arr)


def _encode(value: Any) -> Any:
    """JSON-ready copy of ``value``: scalars made plain, non-finite floats as strings."""
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    x = _scalar("value", value)
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def _atomic_write(path: str, data: bytes) -> None:
    """Writes ``path`` so that readers see either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _dumps(row: Mapping[str, Any]) -> str:
    return json.dumps(row, allow_nan=False)  # allow_nan=False: a stray NaN fails here, not later.


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Rows of ``workdir/metrics.jsonl``, non-finite strings decoded back to floats.

    A final line that does not parse (the process was killed mid-write) is skipped; a bad line
    anywhere else raises, since that is corruption rather than an interrupted write.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(_decode(json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e}); fix or remove it") from e
    return rows


def _repair(workdir: str, start_step: int) -> None:
    """Drops rows after ``start_step`` (if > 0) and an unterminated last line, atomically."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    if start_step <= 0 and (not data or data.endswith(b"\n")):
        return  # Nothing to drop: appends will start on a line of their own.
    rows = read_metrics(workdir)
    if start_step > 0:
        rows = [r for r in rows if r.get("step", math.inf) <= start_step]
    _atomic_write(path, "".join(_dumps(_encode(r)) + "\n" for r in rows).encode())


class MetricWriter:
    """Writes metrics to ``metrics.jsonl`` and TensorBoard and drives the progress bar.

    Args:
      workdir: run directory; created if missing (process 0 only).
      total_steps: length of the progress bar.
      start_step: last completed step when resuming; later rows in ``metrics.jsonl`` are dropped.
      batch_size: global batch size, for samples/s on the bar (0: not shown).
      is_main: whether this is process 0; otherwise nothing is written or printed.
      progress: show a tqdm bar on stderr.
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        batch_size: int = 0,
        is_main: bool = True,
        progress: bool = True,
    ):
        self.workdir = workdir
        self._main = is_main
        self._batch_size = batch_size
        self._jsonl = self._tb = self._bar = None
        self._last_time: float | None = None
        self._last_step = start_step
        self._rate: float | None = None  # Smoothed samples/s.
        if not is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        _repair(workdir, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # Closed in close().

        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            os.path.join(workdir, "tb"),
            purge_step=start_step + 1 if start_step > 0 else None,
            flush_secs=10,
        )
        if progress:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=tty,
                mininterval=0.2 if tty else 5.0,
                maxinterval=10.0 if tty else 60.0,
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **metrics}`` to metrics.jsonl and TensorBoard."""
        if not self._main:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricWriter.write() after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved; pass it as the step argument")
        step = int(step)
        values = {str(k): _scalar(str(k), v) for k, v in metrics.items()}
        self._jsonl.write(_dumps({"step": step, **_encode(values)}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)

    def write_once(self, step: int, metrics: Mapping[str, Any]) -> None:
        """`write`, replacing an earlier row at `step` with the same metric names: a run killed
        after its final evaluation was logged evaluates again when rerun, and must not log it
        twice."""
        if not self._main:
            return
        names = {"step", *map(str, metrics)}
        rows = read_metrics(self.workdir)
        kept = [r for r in rows if not (r.get("step") == int(step) and set(r) == names)]
        if len(kept) != len(rows):
            self._jsonl.close()
            path = os.path.join(self.workdir, METRICS_FILE)
            _atomic_write(path, "".join(_dumps(_encode(r)) + "\n" for r in kept).encode())
            self._jsonl = open(path, "a", encoding="utf-8")  # Closed in close().
        self.write(step, metrics)

    def progress(self, step: int, loss: float | None = None, mfu: float | None = None) -> None:
        """Moves the bar to ``step``; shows ``loss``, smoothed samples/s and ``mfu`` (a
        fraction, shown in %) when given."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if self._last_time is not None and step > self._last_step and self._batch_size:
            rate = (step - self._last_step) * self._batch_size / max(now - self._last_time, 1e-9)
            self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
        self._last_time, self._last_step = now, step
        postfix = []
        if loss is not None:
            postfix.append(f"loss={float(loss):.4g}")
        if self._rate is not None:
            postfix.append(f"samples/s={self._rate:.4g}")
        if mfu is not None:
            postfix.append(f"mfu={100 * mfu:.3g}%")
        self._bar.set_postfix_str(", ".join(postfix), refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Writes ``workdir/summary.json`` (indent 2, sorted keys, plain numbers) atomically."""
        if not self._main:
            return
        text = json.dumps(_encode(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"
        _atomic_write(os.path.join(self.workdir, SUMMARY_FILE), text.encode())

    def plot(self) -> None:
        """Draws ``plots/loss.png`` and, when eval-like metrics exist, ``plots/eval.png``."""
        if not self._main:
            return
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for row in read_metrics(self.workdir):
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    xs, ys = curves.setdefault(name, ([], []))
                    xs.append(row["step"])
                    ys.append(value if math.isfinite(value) else math.nan)
        out = os.path.join(self.workdir, "plots")
        os.makedirs(out, exist_ok=True)
        if "train/loss" in curves:
            loss = {"train/loss": {"train/loss": curves["train/loss"]}}
            _plot_groups(loss, f"{out}/loss.png", log_y=True)
        groups = {
            p.rstrip("/"): {k: v for k, v in curves.items() if k.startswith(p)}
            for p in EVAL_PREFIXES
        }
        groups = {p: g for p, g in groups.items() if g}
        if groups:
            _plot_groups(groups, f"{out}/eval.png", log_y=False)

    def close(self) -> None:
        """Flushes and closes everything; safe to call more than once."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plot_groups(groups: Mapping[str, Mapping[str, tuple]], path: str, *, log_y: bool) -> None:
    """One panel per group, one line per metric; with ``log_y``, log y if all values are > 0."""
    from matplotlib.figure import Figure  # No pyplot: no global backend or figure state.

    fig = Figure(figsize=(7, 3 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, curves) in zip(axes, groups.items(), strict=True):
        finite = [y for _, ys in curves.values() for y in ys if math.isfinite(y)]
        for name, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None, linewidth=1)
        if log_y and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(curves) > 1 or title not in curves:
            ax.legend(fontsize="small", ncol=2 if len(curves) > 6 else 1)
    axes[-1].set_xlabel("step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(path, buf.getvalue())
