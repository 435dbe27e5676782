"""Pretrained weights for a fresh run (no checkpoint in the workdir yet)."""

import os

import jax
import ml_collections

from mmjax import checkpoint
from mmjax.train.state import TrainState
from mmjax.train.validate import ConfigError


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


def with_pretrained(
    config: ml_collections.ConfigDict,
    state: TrainState,
    abstract: TrainState,
    text_tower: dict | None = None,
) -> TrainState:
    """`state` with the parameters the config asks to start from: a whole-model parameters
    checkpoint (`init_from`, e.g. imported open_clip weights) and/or a pretrained text tower
    (from `read_text_tower`). Optimizer state stays fresh. Arrays go straight into the state's
    shardings."""
    params = state.params
    if config.init_from:
        try:
            params = checkpoint.restore_params(os.path.abspath(config.init_from), abstract.params)
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
    return state.replace(params=params)
