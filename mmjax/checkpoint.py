"""orbax checkpoints of the train state together with the data iterator.

Saving the iterator with the state is what makes a resumed run continue the same sample stream:
after restore, batch k+1 is the batch an uninterrupted run would have drawn at step k+1.
Saves are asynchronous: training continues while the previous checkpoint is written, and a
checkpoint becomes visible (`latest_step`) only once it is completely on disk.
"""

import logging

import grain
import jax
import orbax.checkpoint as ocp

from mmjax.train.state import TrainState


class Checkpointer:
    """Keeps the newest `keep` checkpoints under `directory`, each holding `state` and `data`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
        )

    def restore(self, target: TrainState, data_iterator) -> tuple[int, TrainState] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings (and the
        iterator in place). Returns (step, state), or None if there is none. A checkpoint that
        fails to load is reported and the next older one is tried."""
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
                logging.warning(
                    "checkpoint at step %d is unreadable (%s); trying an older one", step, e
                )
                continue
            return step, restored["state"]
        return None

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


def _shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def restore_params(directory: str, target):
    """Restores a parameters-only checkpoint into `target`'s shapes, dtypes and shardings
    (ShapeDtypeStructs). Raises ValueError listing every missing, unexpected or mis-shaped
    parameter before reading any array."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = _shapes(checkpointer.metadata(directory).item_metadata)
    except Exception as e:  # not a checkpoint at all: say which path
        raise ValueError(f"{directory} is not a readable parameters checkpoint ({e})") from e
    wanted = _shapes(target)
    problems = [f"missing {k}" for k in sorted(set(wanted) - set(saved))]
    problems += [f"unexpected {k}" for k in sorted(set(saved) - set(wanted))]
    problems += [
        f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ]
    if problems:
        raise ValueError(f"parameters in {directory} do not fit the model: " + "; ".join(problems))
    return checkpointer.restore(directory, target)
