"""The training iterator's position in the global sample stream, independent of how many
processes read it and resumable under a different batch size.

`pipeline.batched_stream` defines one global stream; process p of P reads rows of every global
batch, and its grain iterator's state `{"next_index": k}` counts global batches, so k is the
same on every process and for every process count. `PositionedIterator` adds the stream's
geometry to that state (global batch size, batches per epoch): a checkpoint stores it once for
the whole run, and a resume with another batch size continues at the same sample of the same
epoch instead of reading k batches of the new size (which would skip or repeat part of it).
"""

from __future__ import annotations

import grain

from mmjax import metrics

BATCH_KEY = "global_batch_size"
EPOCH_KEY = "steps_per_epoch"


def remap(next_index: int, old: tuple[int, int], new: tuple[int, int]) -> tuple[int, int]:
    """The batch index of the stream of geometry `new` = (global batch, batches per epoch) that
    starts where batch `next_index` of geometry `old` starts, and how many samples of that epoch
    it repeats (0 when the old position is a multiple of the new batch size).

    Rounds down, so no sample of the epoch is skipped; a position past the new epoch's last
    whole batch (its remainder is dropped anyway) moves to the next epoch."""
    (old_batch, old_steps), (new_batch, new_steps) = old, new
    epoch, step_in_epoch = divmod(next_index, old_steps)
    consumed = step_in_epoch * old_batch
    new_step = consumed // new_batch
    if new_step >= new_steps:
        return (epoch + 1) * new_steps, 0
    return epoch * new_steps + new_step, consumed - new_step * new_batch


class PositionedIterator(grain.DatasetIterator):
    """Wraps a grain iterator over a `batched_stream`; `get_state()` also records the geometry
    and `set_state()` maps a state of another geometry onto this one (with a note). (A grain
    `DatasetIterator`, so grain's own orbax handler still checkpoints it.)"""

    def __init__(self, iterator, global_batch_size: int, steps_per_epoch: int):
        super().__init__()
        self._iterator = iterator
        self.geometry = (global_batch_size, steps_per_epoch)

    def __iter__(self) -> PositionedIterator:
        return self

    def __next__(self):
        return next(self._iterator)

    def get_state(self) -> dict:
        batch, steps = self.geometry
        return {**self._iterator.get_state(), BATCH_KEY: batch, EPOCH_KEY: steps}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        # A state without geometry (an older checkpoint) was written with this run's geometry
        # as far as anyone can tell: restore it as it is.
        old = (state.pop(BATCH_KEY, self.geometry[0]), state.pop(EPOCH_KEY, self.geometry[1]))
        if old != self.geometry:
            state["next_index"], repeated = remap(state["next_index"], old, self.geometry)
            epoch, step_in_epoch = divmod(state["next_index"], self.geometry[1])
            metrics.note(
                f"warning: the global batch size changed from {old[0]} to {self.geometry[0]} "
                f"since the checkpoint; continuing at sample {step_in_epoch * self.geometry[0]} "
                f"of epoch {epoch}"
                + (f", {repeated} samples of this epoch are seen again" if repeated else ""),
                err=True,
            )
        self._iterator.set_state(state)
