"""Does this run fit the checkpoints already in its workdir? And `config.json`, written only
once it does.

A resumed run may change settings that leave the train state's arrays alone (`total_steps`, the
learning rate, the batch size, evaluation); a change that alters them (the model's shape, the
optimizer, the parameter dtype) or the task cannot resume, and must not be mistaken for damaged
checkpoints (which would be set aside). Such a run stops before training with one line naming
what differs between the workdir's `config.json` and the new config, and leaves both the
checkpoints and `config.json` as they were, so `python -m mmjax.evaluate` still reads them.
"""

from __future__ import annotations

import json
import os

import ml_collections

from mmjax import checkpoint
from mmjax.errors import ConfigError

CONFIG_FILE = "config.json"
_SHOWN = 6  # differences named in the one-line error; the rest are counted


def check_checkpoints_fit(
    ckpt: checkpoint.Checkpointer, abstract_state, config: ml_collections.ConfigDict, workdir: str
) -> None:
    """ConfigError if a checkpoint in `ckpt` was written by another task or holds a train state
    of other arrays (structure, shapes, dtypes) than `abstract_state`. Checkpoints whose metadata
    cannot be read are left to `Checkpointer.restore` (damaged files are its business)."""
    steps = ckpt.all_steps()
    if not steps:
        return
    saved = _saved_config(workdir)
    if saved is not None and saved.get("task", config.task) != config.task:
        raise ConfigError(_mismatch(workdir, saved, config, f"task {saved['task']!r}"))
    wanted = checkpoint.leaf_specs(abstract_state)
    for step in reversed(steps):
        specs = ckpt.saved_specs(step)
        problems = [] if specs is None else _state_differences(specs, wanted)
        if problems:
            what = f"train state ({'; '.join(problems[:3])})"
            raise ConfigError(_mismatch(workdir, saved, config, what, step))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `config.json` atomically (process 0 calls it, after every check passed)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """ "field: saved -> new" for every leaf that differs, model fields first."""
    old, new = _leaves(saved), _leaves(json.loads(config.to_json()))
    keys = sorted(set(old) | set(new), key=lambda k: (not k.startswith(("model.", "task")), k))
    missing = "(absent)"
    return [
        f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}"
        for k in keys
        if old.get(k, missing) != new.get(k, missing)
    ]


def _mismatch(workdir, saved, config, what: str, step: int | None = None) -> str:
    where = os.path.join(workdir, "checkpoints", "" if step is None else str(step))
    if saved is None:
        diff = f"{workdir}/{CONFIG_FILE} is missing, so the settings cannot be compared"
    else:
        changes = config_differences(saved, config)
        more = f" and {len(changes) - _SHOWN} more" if len(changes) > _SHOWN else ""
        diff = (
            f"{CONFIG_FILE} -> this run: {', '.join(changes[:_SHOWN])}{more}"
            if changes
            else f"the settings equal {CONFIG_FILE}'s, so the model code must have changed"
        )
    return (
        f"checkpoint {where.rstrip('/')} does not fit this run: its {what} differs "
        f"({diff}). Nothing was changed; rerun with the saved settings to resume, or pass a "
        "new --workdir to train this configuration"
    )


def _state_differences(saved: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
    def params_first(key: str) -> tuple:
        return (not key.startswith("params/"), key)

    missing = sorted(set(wanted) - set(saved), key=params_first)
    unexpected = sorted(set(saved) - set(wanted), key=params_first)
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    out = []
    if missing:
        out.append(f"{len(missing)} arrays not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        out.append(f"{len(unexpected)} arrays only in the checkpoint, e.g. {unexpected[0]}")
    for key in changed[:2]:
        (s_shape, s_dtype), (w_shape, w_dtype) = saved[key], wanted[key]
        out.append(f"{key} is {s_dtype}{list(s_shape)} there, {w_dtype}{list(w_shape)} here")
    return out


def _saved_config(workdir: str) -> dict | None:
    try:
        with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _leaves(tree, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree)}
