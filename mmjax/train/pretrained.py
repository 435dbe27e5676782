"""Saved parameters a fresh run starts from (no checkpoint in its workdir yet).

The task says what to load (`Task.pretrained`: a list of `Pretrained`, each a subtree of the
model's parameters and where its values come from); `check` compares every one with the model
before anything trains, and `merge` places them into the initialised parameters, in list order
(a later one overrides an earlier one). Both fail with one ConfigError naming every missing,
unexpected or mis-shaped parameter (`checkpoint.mismatches`). This module knows no task and no
model: which subtrees exist (towers, a pretrained text encoder, a distillation teacher) is the
task's business; the settings every task shares (`init_towers_from`, `init_from`) are read by
`from_settings`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from mmjax import checkpoint, metrics
from mmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Saved values for the subtree at `path` of the model's parameters.

    Exactly one of `params` (host arrays, read outside any mesh context) and `directory` (a
    parameters-only checkpoint, restored straight into the parameters' shardings: no host copy
    of a large model) holds them. `keep` names keys of the subtree the saved values do not
    hold: they keep their initial values (e.g. a teacher next to a model loaded with
    `init_from`). `misfit` starts the error when they do not fit the model, saying what was
    set and what to change.
    """

    path: tuple[str, ...]  # () = every parameter
    misfit: str
    params: dict | None = None
    directory: str = ""
    keep: tuple[str, ...] = ()
    loaded: str = ""  # printed once placed, e.g. "Towers image, text initialised from <path>"
    # The saved model state of the subtree (`{"batch_stats": {...}}`: a BatchNorm tower's running
    # statistics), placed by `merge_state`: a tower is its parameters and its statistics.
    state: dict = dataclasses.field(default_factory=dict)
    # True: `state` is all of the subtree's saved state (a run's), so state the model has there
    # and `state` lacks is a misfit too (a distillation teacher whose run had no BatchNorm would
    # otherwise normalise with fresh statistics: GroupNorm has BatchNorm's parameter shapes).
    state_complete: bool = False

    def __post_init__(self):
        if (self.params is None) == (not self.directory):
            raise ValueError("Pretrained needs exactly one of params and directory")


def read_params(source: str, setting: str) -> tuple[str, dict]:
    """(checkpoint path, host parameters) of `source`: a run directory (its newest checkpoint)
    or a parameters-only checkpoint. `setting` names the config field in errors."""
    path, params, _ = read_params_and_state(source, setting)
    return path, params


def read_params_and_state(source: str, setting: str) -> tuple[str, dict, dict]:
    """`read_params` plus the saved model state (BatchNorm statistics; {} when none)."""
    source = os.path.abspath(source)
    run_checkpoints = os.path.join(source, "checkpoints")
    path = source
    if os.path.isdir(run_checkpoints):
        steps = sorted(int(d) for d in os.listdir(run_checkpoints) if d.isdigit())
        if not steps:
            raise ConfigError(f"{setting}={source!r}: the run has no checkpoint yet")
        path = os.path.join(run_checkpoints, str(steps[-1]), "state")
    if not os.path.isdir(path):
        raise ConfigError(
            f"{setting}={source!r} is neither a run directory with checkpoints nor a "
            "parameters checkpoint"
        )
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(path)
    if "params" not in tree:  # a parameters-only checkpoint
        return path, jax.device_get(tree), {}
    return path, jax.device_get(tree["params"]), jax.device_get(tree.get("model_state") or {})


def from_settings(
    config: ml_collections.ConfigDict, keep: tuple[str, ...] = ()
) -> list[Pretrained]:
    """What the settings every task shares ask for: the `init_towers` subtrees of another run
    (`init_towers_from`, e.g. fine-tuning a fusion task on contrastively pretrained towers),
    then every parameter but `keep` from a parameters checkpoint (`init_from`, e.g. imported
    open_clip weights)."""
    out = []
    source = config.get("init_towers_from", "")
    if source:
        source = os.path.abspath(source)
        path, params, saved_state = read_params_and_state(source, "init_towers_from")
        missing = [t for t in config.init_towers if t not in params]
        if missing:
            raise ConfigError(
                f"init_towers_from={source!r} has no {', '.join(missing)} tower "
                f"(it has: {', '.join(sorted(params))})"
            )
        for tower in config.init_towers:
            out.append(
                Pretrained(
                    path=(tower,),
                    params=params[tower],
                    misfit=f"init_towers_from: the saved {tower} tower does not fit "
                    f"model.{tower} (make the tower configs equal)",
                    loaded=f"Tower {tower} initialised from {path}",
                    state={c: tree[tower] for c, tree in saved_state.items() if tower in tree},
                )
            )
    if config.init_from:
        out.append(
            Pretrained(
                path=(),
                directory=os.path.abspath(config.init_from),
                keep=keep,
                misfit=f"init_from={config.init_from!r}: its parameters do not fit the model",
                loaded=f"Initialised parameters from {config.init_from}",
            )
        )
    return out


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    try:
        return bool(_subtree(tree, path))
    except (KeyError, TypeError):
        return False


def _replaced(tree: dict, path: tuple[str, ...], values: dict) -> dict:
    """`tree` with the subtree at `path` updated by `values` (keys it lacks stay as they are)."""
    if not path:
        return {**tree, **values}
    head, *rest = path
    return {**tree, head: _replaced(tree[head], tuple(rest), values)}


def _target(abstract_params: dict, source: Pretrained):
    """The part of the model's (abstract) parameters that `source` fills."""
    try:
        subtree = _subtree(abstract_params, source.path)
    except (KeyError, TypeError):
        raise ConfigError(
            f"{source.misfit}: the model has no parameters {'/'.join(source.path)}"
        ) from None
    return {k: v for k, v in subtree.items() if k not in source.keep}


def check(sources: list[Pretrained], abstract_params: dict) -> None:
    """ConfigError, before anything is placed, if any source does not fit the model."""
    for source in sources:
        if source.params is not None:
            saved = checkpoint.shapes_of(source.params)
        else:
            try:
                saved = checkpoint.saved_shapes(source.directory)
            except ValueError as e:
                raise ConfigError(f"{source.misfit}: {e}") from e
        problems = checkpoint.mismatches(
            saved, checkpoint.shapes_of(_target(abstract_params, source))
        )
        if problems:
            raise ConfigError(f"{source.misfit}: {'; '.join(problems[:6])}")


def merge(params: dict, abstract_params: dict, sources: list[Pretrained]) -> dict:
    """`params` with every source placed, in order, into the shardings and dtypes of
    `abstract_params` (ShapeDtypeStructs with shardings). Checks first (see `check`)."""
    check(sources, abstract_params)
    for source in sources:
        target = _target(abstract_params, source)
        if source.params is not None:
            place = lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding)
            values = jax.tree.map(place, source.params, target)
        else:
            values = checkpoint.restore_params(source.directory, target)
        params = _replaced(params, source.path, values)
        if source.loaded:
            metrics.note(source.loaded)
    return params


def merge_state(model_state: dict, sources: list[Pretrained]) -> dict:
    """`model_state` (the initialised collections, e.g. BatchNorm statistics) with the saved
    state of every source placed at its path, in the shardings and dtypes of the initial
    values. ConfigError when the model has no such state or it does not fit (a BatchNorm tower
    loaded into a tower normalised otherwise would silently drop its statistics)."""
    for source in sources:
        where = "/".join(source.path)
        if source.state_complete:
            for collection, tree in model_state.items():
                if collection not in source.state and _has(tree, source.path):
                    raise ConfigError(
                        f"{source.misfit}: the model's {where} has {collection} (BatchNorm "
                        "running statistics) and the saved one has none (use the saved run's "
                        "norm)"
                    )
        for collection, values in source.state.items():
            try:
                target = _subtree(model_state[collection], source.path)
            except (KeyError, TypeError):
                raise ConfigError(
                    f"{source.misfit}: the saved {where} has {collection} (BatchNorm running "
                    "statistics) and the model's has none (use the saved run's norm)"
                ) from None
            problems = checkpoint.mismatches(
                checkpoint.shapes_of(values), checkpoint.shapes_of(target)
            )
            if problems:
                raise ConfigError(f"{source.misfit} ({collection}): {'; '.join(problems[:6])}")
            place = lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding)
            placed = jax.tree.map(place, values, target)
            model_state = {
                **model_state,
                collection: _replaced(model_state[collection], source.path, placed),
            }
    return model_state
