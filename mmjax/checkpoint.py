"""orbax checkpoints of the train state together with the data iterator.

Saving the iterator with the state is what makes a resumed run continue the same sample stream:
after restore, batch k+1 is the batch an uninterrupted run would have drawn at step k+1.
Saves are asynchronous: training continues while the previous checkpoint is written, and a
checkpoint becomes visible (`latest_step`) only once it is completely on disk.

The iterator's state is stored once, not per process (its position in the global stream is the
same on every process), so a run resumes on a different number of processes. How restore
failures are told apart (damaged files vs. a failing machine) is `checkpoint_errors`.
"""

import glob
import json
import os
import time
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax import checkpoint_errors, metrics

State = TypeVar("State")  # a pytree of arrays: the train state, or parameters alone

# The data iterator's state, one JSON for the run. Checkpoints written before it hold grain's
# per-process files under "data/" (process_<i>-of-<n>.json, all with the same global position).
DATA_ITEM = "data_position"


class Checkpointer:
    """Keeps the newest `keep` checkpoints under `directory`, each holding the train state
    (`state/`) and the data iterator's position (`data_position/`)."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step of the asynchronous save in flight
        checkpoint_errors.quiet_failure_noise()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: State, data_iterator) -> None:
        """Starts writing checkpoint `step` (asynchronously). CheckpointStorageError if this or
        the previous save failed (disk full, I/O error), naming the last good checkpoint."""
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    # One file for the whole run (written by process 0): the stream position is
                    # global, so any number of processes can resume from it.
                    **{DATA_ITEM: ocp.args.JsonSave(data_iterator.get_state())},
                ),
            )
        except Exception as e:
            raise self._storage_error("write", step, e) from e
        self._writing = step

    def restore(self, target: State, data_iterator) -> tuple[int, State] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings (and the
        iterator in place). Returns (step, state), or None if there is none.

        A checkpoint whose files are damaged (`checkpoint_errors.is_damage`: checksum, truncated
        or missing file, unparsable metadata) is reported, moved aside to `<directory>/corrupt/`
        (kept for inspection, out of the rotation, so it can never push a good checkpoint out of
        `keep`), and the next older one is tried; if it is the last one left, it stays in place
        and CheckpointDamagedError stops the run. Any other failure (out of memory, an I/O
        error) discards nothing: CheckpointStorageError. Half-written saves never show up here:
        orbax writes into a temporary directory and renames it only when complete.
        """
        checkpoint_errors.quiet_failure_noise()
        for step in reversed(self.all_steps()):
            try:
                state, position = self._restore_step(step, target)
                error = None
            except Exception as e:
                state, error = None, e
            verdict = _agree(0 if error is None else 1 if checkpoint_errors.is_damage(error) else 2)
            if verdict == 0:
                data_iterator.set_state(position)
                return step, state
            error = error or RuntimeError("another process could not read it")
            if verdict == 2:
                raise self._storage_error("read", step, error) from error
            if step == self.all_steps()[0]:
                reason = checkpoint_errors.one_line(error)
                raise checkpoint_errors.CheckpointDamagedError(
                    f"checkpoint {self._path(step)} is damaged ({reason}) and no older one is "
                    "left; nothing was moved or trained. Move "
                    f"{self.directory} aside to start from scratch (or restore it from a backup)"
                ) from error
            self._quarantine(step, error)
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        path = self._path(step)
        moved = os.path.join(self.directory, "corrupt", f"{step}.{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(moved), exist_ok=True)
            os.rename(path, moved)
        if jax.process_count() > 1:  # every process must see the same checkpoints next
            multihost_utils.sync_global_devices(f"mmjax_quarantine_{step}")
        self._manager.reload()
        metrics.note(
            f"warning: checkpoint {path} is unreadable ({checkpoint_errors.one_line(error)}); "
            f"moved it to {moved} and trying the previous one",
            err=True,
        )

    def _restore_step(self, step: int, target: State) -> tuple[State, dict]:
        """(state, data position) of checkpoint `step`; raises what reading them raised."""
        if not self._read_specs(step):  # without it orbax reports a "structure" error
            raise FileNotFoundError(f"{self._path(step)}/state/_METADATA is empty")
        items = {"state": ocp.args.StandardRestore(target)}
        legacy = not os.path.isdir(os.path.join(self._path(step), DATA_ITEM))
        if not legacy:
            items[DATA_ITEM] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        position = _legacy_position(self._path(step)) if legacy else restored[DATA_ITEM]
        return restored["state"], position

    def saved_specs(self, step: int) -> dict[str, tuple] | None:
        """path -> (shape, dtype) of every array of checkpoint `step`'s train state, read from
        its metadata (no array is read); None if the metadata is missing or unreadable."""
        try:
            return self._read_specs(step) or None
        except Exception:  # unreadable metadata: restore() classifies the error itself
            return None

    def _read_specs(self, step: int) -> dict[str, tuple]:
        handler = ocp.StandardCheckpointHandler()
        return leaf_specs(handler.metadata(epath.Path(self._path(step), "state")))

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _storage_error(self, action: str, step: int | None, error: Exception):
        """CheckpointStorageError for failing to `action` ("read", "write") checkpoint `step`."""
        if action == "write" and self._writing is not None:
            step = self._writing  # a failure surfaces at the next call: the save in flight
        self._writing = None
        try:
            self._manager.reload()
            good = [s for s in self.all_steps() if s != step or action == "read"]
        except Exception:  # the disk that failed may fail again: report what we know
            good = []
        last_good = (
            f"the last good checkpoint is {self._path(good[-1])}"
            if good
            else "there is no complete checkpoint yet"
        )
        return checkpoint_errors.CheckpointStorageError(
            f"could not {action} checkpoint {self._path(step)} "
            f"({checkpoint_errors.one_line(error)}); {last_good}, nothing was discarded: fix the "
            "cause (free disk space, memory) and rerun the same command to resume from it"
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
        """Blocks until the pending asynchronous save is on disk (CheckpointStorageError if it
        failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._storage_error("write", self._writing, e) from e
        self._writing = None

    def close(self) -> None:
        self.wait()
        self._manager.close()


def _agree(verdict: int) -> int:
    """The worst of every process's restore verdict (0 read, 1 damaged, 2 failed), so that all
    processes quarantine, retry or stop together."""
    if jax.process_count() == 1:
        return verdict
    return int(np.max(multihost_utils.process_allgather(np.array([verdict], np.int32))))


def _legacy_position(step_dir: str) -> dict:
    """The iterator state of a checkpoint written with grain's per-process files: any one of
    them (they hold the same global position), so the process count may have changed."""
    files = sorted(glob.glob(os.path.join(step_dir, "data", "process_*-of-*.json")))
    if not files:
        raise FileNotFoundError(f"{step_dir} has no {DATA_ITEM}/ and no data/process_*.json")
    mine = os.path.join(
        step_dir, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    )
    with open(mine if mine in files else files[0], encoding="utf-8") as f:
        return json.load(f)


def leaf_specs(tree) -> dict[str, tuple]:
    """Path "a/b/0/c" -> (shape, dtype name) of each array leaf of `tree`: a train state, its
    abstract shapes, or orbax's metadata of a saved one (whose dataclasses became dicts and
    named tuples lists, so only key names and indices are compared)."""
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        specs["/".join(map(str, keys))] = (tuple(leaf.shape), _dtype_name(leaf.dtype))
    return specs


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # an extended dtype (e.g. a PRNG key's) has no numpy equivalent
        return str(dtype)


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
