"""orbax checkpoints of the train state together with the data iterator.

Saving the iterator with the state is what makes a resumed run continue the same sample stream:
after restore, batch k+1 is the batch an uninterrupted run would have drawn at step k+1.
Saves are asynchronous: training continues while the previous checkpoint is written, and a
checkpoint becomes visible (`latest_step`) only once it is completely on disk.
"""

import os
import time
from typing import TypeVar

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax import metrics

State = TypeVar("State")  # a pytree of arrays: the train state, or parameters alone


class Checkpointer:
    """Keeps the newest `keep` checkpoints under `directory`, each holding `state` and `data`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: State, data_iterator) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
        )

    def restore(self, target: State, data_iterator) -> tuple[int, State] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings (and the
        iterator in place). Returns (step, state), or None if there is none.

        A checkpoint that fails to load (truncated or corrupted files) is reported, moved
        aside to `<directory>/corrupt/` (kept for inspection, out of the rotation, so it can
        never push a good checkpoint out of `keep`), and the next older one is tried.
        Half-written saves never show up here: orbax writes into a temporary directory and
        renames it only when complete.
        """
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except Exception as e:
                self._quarantine(step, e)
                continue
            return step, restored["state"]
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        path = os.path.join(self.directory, str(step))
        moved = os.path.join(self.directory, "corrupt", f"{step}.{int(time.time())}")
        summary = " ".join(str(error).split())[:300]
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(moved), exist_ok=True)
            os.rename(path, moved)
        if jax.process_count() > 1:  # every process must see the same checkpoints next
            multihost_utils.sync_global_devices(f"mmjax_quarantine_{step}")
        self._manager.reload()
        metrics.note(
            f"warning: checkpoint {path} is unreadable ({type(error).__name__}: {summary}); "
            f"moved it to {moved} and trying the previous one",
            err=True,
        )

    def restore_state(self, target: State, step: int | None = None) -> tuple[int, State]:
        """The train state of checkpoint `step` (None: the newest) into `target`'s shapes and
        shardings, without the data iterator (for evaluation, which draws no training batch).
        Raises FileNotFoundError when there is no such checkpoint."""
        steps = self.all_steps()
        if step is None and steps:
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self._manager.directory} "
                f"(steps: {', '.join(map(str, steps)) or 'none'})"
            )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return step, restored["state"]

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(directory: str, params) -> None:
    """Writes a parameters-only checkpoint (e.g. converted open_clip weights) to `directory`."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()


def shapes_of(tree) -> dict[str, tuple]:
    """path -> shape of every leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def mismatches(saved: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
    """Every parameter missing, unexpected or mis-shaped in `saved` (path -> shape) against
    `wanted`, one phrase each."""
    problems = [f"missing {k}" for k in sorted(set(wanted) - set(saved))]
    problems += [f"unexpected {k}" for k in sorted(set(saved) - set(wanted))]
    problems += [
        f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ]
    return problems


def saved_shapes(directory: str) -> dict[str, tuple]:
    """path -> shape of every parameter of a parameters-only checkpoint, read from its metadata
    (no array is read). ValueError if `directory` is not such a checkpoint."""
    try:
        return shapes_of(ocp.StandardCheckpointer().metadata(directory).item_metadata)
    except Exception as e:  # not a checkpoint at all: say which path
        raise ValueError(f"{directory} is not a readable parameters checkpoint ({e})") from e


def restore_params(directory: str, target):
    """Restores a parameters-only checkpoint into `target`'s shapes, dtypes and shardings
    (ShapeDtypeStructs). Raises ValueError listing every missing, unexpected or mis-shaped
    parameter before reading any array."""
    problems = mismatches(saved_shapes(directory), shapes_of(target))
    if problems:
        raise ValueError(f"parameters in {directory} do not fit the model: " + "; ".join(problems))
    return ocp.StandardCheckpointer().restore(directory, target)
