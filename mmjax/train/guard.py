"""What the loop does about bad steps: non-finite values and loss spikes.

The jitted step never applies an update whose loss, gradient norm or new parameters are
non-finite, nor one whose loss exceeds the ceiling it is given; it counts such steps in the
state (`skipped`, `last_skipped`, `skip_streak`). This module decides, on the host, what
happens next (`config.guard`):

- `policy="skip"`: training goes on; skipped steps are counted in the logged metrics
  (`train/skipped_steps`) and in `summary.json`, and a warning names the newest one. More than
  `max_consecutive_skips` in a row means the run has diverged, and it stops as under "stop".
- `policy="stop"`: the first skipped step stops the run with `BadStepsError` naming the step
  range; no checkpoint is written after it, so the newest checkpoint is the last good state.
- `spike_zscore > 0`: a loss more than that many robust standard deviations (1.4826 × median
  absolute deviation) above the median of the last `spike_window` applied steps' losses counts
  as a bad step too. This needs each step's loss on the host, one small device-to-host copy
  per step; with `spike_zscore = 0` (default) the loop reads metrics only when it logs.

The host checks the counters when it logs and before every checkpoint, so under "stop" the
run ends at most `log_every` steps after the bad one, before saving anything newer.
"""

from __future__ import annotations

import collections

import numpy as np

POLICIES = ("skip", "stop")
_MAD_TO_STD = 1.4826  # MAD of a normal distribution × this = its standard deviation


class BadStepsError(RuntimeError):
    """The run stopped because of non-finite or spiking steps; the message names them."""


class SpikeDetector:
    """Robust z-score of the loss against a window of recent applied steps."""

    def __init__(self, zscore: float, window: int):
        if zscore < 0 or window < 3:
            raise ValueError(f"need zscore >= 0 and window >= 3, got {zscore=} {window=}")
        self.zscore = zscore
        self._losses: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.zscore > 0

    def ceiling(self) -> float:
        """The largest loss the next step may have; +inf until the window is full."""
        if not self.enabled or len(self._losses) < self._losses.maxlen:
            return float("inf")
        losses = np.asarray(self._losses)
        median = float(np.median(losses))
        mad = float(np.median(np.abs(losses - median)))
        # A perfectly flat window (MAD 0) would make any noise a spike; floor the spread at a
        # tiny fraction of the loss.
        spread = max(_MAD_TO_STD * mad, 1e-6 * abs(median), 1e-12)
        return median + self.zscore * spread

    def observe(self, loss: float, applied: bool) -> None:
        """Adds an applied step's loss to the window (skipped steps' losses are not data)."""
        if applied and np.isfinite(loss):
            self._losses.append(float(loss))


class StepGuard:
    """Applies the policy to the state's skip counters (see the module doc)."""

    def __init__(self, policy: str, max_consecutive_skips: int):
        if policy not in POLICIES:
            raise ValueError(f"guard.policy={policy!r} is unknown; use one of {POLICIES}")
        self.policy = policy
        self.max_streak = max_consecutive_skips
        self._seen = 0
        self._checked_step = 0

    def start(self, step: int, skipped: int) -> None:
        """Counters of a fresh or resumed run: only skips after this point are news."""
        self._seen, self._checked_step = skipped, step

    def check(self, step: int, skipped: int, last_skipped: int, streak: int) -> str | None:
        """Raises BadStepsError if the run must stop; returns a warning line for new skips
        under "skip", else None."""
        new = skipped - self._seen
        since = self._checked_step
        self._seen, self._checked_step = skipped, step
        if new <= 0:
            return None
        where = (
            f"{new} step(s) between steps {since + 1} and {step}, the last at step {last_skipped}"
        )
        reason = "non-finite loss, gradient or parameters, or a loss spike"
        if self.policy == "stop":
            raise BadStepsError(
                f"{where}: {reason}; guard.policy='stop' ends the run without saving a newer "
                "checkpoint (the newest checkpoint is the last good state). Lower the learning "
                "rate, check the data, or rerun with --config.guard.policy=skip"
            )
        if streak > self.max_streak:
            raise BadStepsError(
                f"the last {streak} steps were all skipped ({reason}), more than "
                f"guard.max_consecutive_skips={self.max_streak}: the run has diverged. {where}"
            )
        return f"warning: skipped {where} ({reason}); update not applied"
