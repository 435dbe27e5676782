"""Pretrained weights for a fresh run (no checkpoint in the workdir yet)."""

import os

import jax
import ml_collections

from mmjax import checkpoint
from mmjax.errors import ConfigError
from mmjax.models.two_tower import TRAINING_PARTS
from mmjax.train.state import TrainState


def read_text_tower(config: ml_collections.ConfigDict) -> dict | None:
    """Host (numpy) parameters of a pretrained Hugging Face text tower, if the config uses one
    and does not start from a whole-model checkpoint. Call outside any mesh context."""
    if config.model.text.kind != "hf_bert" or config.init_from:
        return None
    from mmjax.interop import hf

    model_dir = config.model.text.hf_dir or hf.minilm_dir()
    _, variables = hf.load_bert_model(model_dir)
    print(f"Text tower initialised from {model_dir}")
    return variables["params"]


def _read_params(source: str, setting: str) -> tuple[str, dict]:
    """(checkpoint path, host parameters) of `source`: a run directory (its newest checkpoint)
    or a parameters-only checkpoint. `setting` names the config field in errors."""
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
    return path, tree.get("params", tree)


def read_teacher(config: ml_collections.ConfigDict, abstract_params: dict) -> dict | None:
    """Host parameters of the distillation teacher (`distill.teacher`), if the model has one,
    checked against its `teacher` parameters so that a mismatch fails before anything
    compiles. Call outside any mesh context."""
    if "teacher" not in abstract_params:
        return None
    source = os.path.abspath(config.distill.teacher)
    path, params = _read_params(source, "distill.teacher")
    wanted = checkpoint.shapes_of(abstract_params["teacher"])
    problems = checkpoint.mismatches(checkpoint.shapes_of(params), wanted)
    if problems:
        raise ConfigError(
            f"distill.teacher={source!r} does not fit distill.teacher_model (empty: model): "
            f"{'; '.join(problems[:6])}"
        )
    print(f"Distillation teacher loaded from {path}")
    return jax.device_get(params)


def read_towers(config: ml_collections.ConfigDict) -> dict | None:
    """Host parameters of the towers named by `init_towers` from `init_towers_from`: a run
    directory (its newest checkpoint) or a parameters-only checkpoint. For fine-tuning a fusion
    task on contrastively pretrained towers. Call outside any mesh context."""
    source = config.get("init_towers_from", "")
    if not source:
        return None
    source = os.path.abspath(source)
    path, params = _read_params(source, "init_towers_from")
    missing = [t for t in config.init_towers if t not in params]
    if missing:
        raise ConfigError(
            f"init_towers_from={source!r} has no {', '.join(missing)} tower "
            f"(it has: {', '.join(sorted(params))})"
        )
    print(f"Towers {', '.join(config.init_towers)} initialised from {path}")
    return {t: jax.device_get(params[t]) for t in config.init_towers}


def _fit_tower(name: str, saved: dict, target: dict) -> dict:
    """`saved` placed into `target`'s shardings; a ConfigError names every mismatch."""
    problems = checkpoint.mismatches(checkpoint.shapes_of(saved), checkpoint.shapes_of(target))
    if problems:
        raise ConfigError(
            f"init_towers_from: the saved {name} tower does not fit model.{name} "
            f"(make the tower configs equal): {'; '.join(problems[:6])}"
        )
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), saved, target)


def with_pretrained(
    config: ml_collections.ConfigDict,
    state: TrainState,
    abstract: TrainState,
    text_tower: dict | None = None,
    towers: dict | None = None,
    teacher: dict | None = None,
) -> TrainState:
    """`state` with the parameters the config asks to start from: a whole-model parameters
    checkpoint (`init_from`, e.g. imported open_clip weights) and/or a pretrained text tower
    (from `read_text_tower`). Optimizer state stays fresh. Arrays go straight into the state's
    shardings. `towers` (from `read_towers`) replaces whole towers, `teacher` (from
    `read_teacher`) the distillation teacher. `init_from` holds the model's own parameters: the
    objective's parts (`TRAINING_PARTS`: teacher, discriminator) keep theirs."""
    params = state.params
    for name, saved in (towers or {}).items():
        params = {**params, name: _fit_tower(name, saved, abstract.params[name])}
    if config.init_from:
        try:
            own = {k: v for k, v in abstract.params.items() if k not in TRAINING_PARTS}
            own = checkpoint.restore_params(os.path.abspath(config.init_from), own)
            params = {**params, **own}
        except ValueError as e:
            raise ConfigError(f"init_from={config.init_from!r}: {e}") from e
        print(f"Initialised parameters from {config.init_from}")
    if text_tower is not None:
        target = abstract.params["text"]["bert"]
        if jax.tree.structure(text_tower) != jax.tree.structure(target):
            raise ConfigError("the pretrained text-tower weights do not fit model.text")
        bert = jax.tree.map(
            lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), text_tower, target
        )
        params = {**params, "text": {**params["text"], "bert": bert}}
    if teacher is not None:
        place = lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding)
        params = {**params, "teacher": jax.tree.map(place, teacher, abstract.params["teacher"])}
    return state.replace(params=params)
