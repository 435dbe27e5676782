"""What the one trainer needs from a task: the `Task` contract and the `Objective` protocol.

A `Task` (one per file in `mmjax/tasks/`, or a user's own subclass) is passed to
`mmjax.train.loop.run(task, config, workdir)`. The trainer (`trainer.py`), the loop, checkpointing,
sharding, the bad-step guard and preemption are shared by all tasks; a task only says what is
specific to it:

  - `tokenizer(config)`: turns text into ids (see `mmjax.data.tokenizers.Tokenizer`);
  - `build_model(config, vocab_size)` and `example_batch(config)`: a batch of zeros (numpy,
    batch size 1) with the keys and shapes the objective reads: it initialises the model;
  - `objective(model, config, mesh, rules)`: an `Objective`, `(params, batch, step) -> (loss,
    logs)`, pure and jittable; a `SplitObjective` (`embed` + `loss`) also supports GradCache
    microbatches; a `StatefulObjective` also trains a model with state (BatchNorm statistics,
    see `mmjax.model_state`), which the trainer refuses for any other objective;
  - `train_iterator(config, process_index, process_count)`: a checkpointable iterator of
    host-local batches (build it with `pipeline.batched_stream`);
  - `evaluator(config, model, batch_sharding)`: `params -> {metric: float}`; task runs report
    their headline as `task/score` and the score of guessing as `task/chance`, named by
    `metric_name` (written as `task/metric_name` into summary.json);
  - `pretrained(config, abstract_params)`: the saved parameters a fresh run starts from (a list
    of `mmjax.train.pretrained.Pretrained`; by default `init_towers_from` and `init_from`).

A setting a task does not use is an error before compiling, not a silent no-op: a task without a
contrastive term (`has_contrastive_term = False`, the default) refuses a run that changes any of
`CONTRASTIVE_SETTINGS` from the package defaults (`mmjax.train.validate`).

Two hooks serve the entry points rather than the trainer: `image_text_embeddings` says that
`python -m mmjax.evaluate` can embed images and texts with the task's model (`encode_image`,
`encode_text`), and `visualizer` what `python -m mmjax.visualize` draws (None: nothing).

This module imports no task and no model: dependencies point from tasks to the trainer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mmjax import parallel
from mmjax.data import pipeline, tokenizers
from mmjax.train import pretrained

# The config fields only an objective with a contrastive term reads (`Task.has_contrastive_term`).
CONTRASTIVE_SETTINGS = ("loss", "loss_impl", "objective", "distill")


class Objective(Protocol):
    """`(params, batch, step) -> (scalar float32 loss, {metric name: scalar})`, pure and
    jittable. `step` (an int32 scalar: steps done so far) feeds schedules inside the loss (DANN's
    λ); objectives without one ignore it. Log names are `train/...` (see the README table)."""

    def __call__(self, params: dict, batch: dict, step: jax.Array) -> tuple[jax.Array, dict]: ...


@runtime_checkable
class SplitObjective(Objective, Protocol):
    """An objective in two parts, so GradCache can run the towers per microbatch while the loss
    sees the whole global batch: `embed(params, batch, step) -> (img_BE, txt_BE, aux)` per
    example (arrays of shape [B, ...] under `aux[gradcache.PER_EXAMPLE]`, scalars elsewhere) and
    `loss(img_BE, txt_BE, aux) -> (loss, logs)` over the global batch."""

    def embed(self, params: dict, batch: dict, step: jax.Array) -> tuple: ...

    def loss(self, img_BE: jax.Array, txt_BE: jax.Array, aux: dict) -> tuple[jax.Array, dict]: ...


@runtime_checkable
class StatefulObjective(Objective, Protocol):
    """An objective that also trains a model with state (`mmjax.model_state`: the collections
    `model.init` creates besides `params`, e.g. BatchNorm's `batch_stats`):
    `with_state(params, model_state, batch, step) -> (loss, logs, new_model_state)`, applying
    the model with `model_state.apply_training`. The step keeps `new_model_state` only when it
    applies the update; evaluators get the state frozen (`model_state.variables`)."""

    def with_state(
        self, params: dict, model_state: dict, batch: dict, step: jax.Array
    ) -> tuple[jax.Array, dict, dict]: ...


class Task(abc.ABC):
    name: str = ""
    metric_name: str | None = None  # the headline metric (None: no task/* entries)
    supports_microbatches = False  # GradCache needs a `SplitObjective`
    # The model has `encode_image(images [B, S, S, 3])` and `encode_text(tokens)`: the zero-shot,
    # retrieval and linear-probe evaluators of `mmjax.evaluate` can run on it.
    image_text_embeddings = False
    # None, or a method `visualizer(config)` returning a `mmjax.eval.maps` visualizer (or raising
    # `ConfigError` for settings with nothing to draw): what `python -m mmjax.visualize` draws.
    visualizer: Callable[[ml_collections.ConfigDict], Callable] | None = None
    has_contrastive_term = False  # True: the objective reads CONTRASTIVE_SETTINGS
    # True: training pairs images with captions drawn by `pipeline.DecodeAndPickCaption`, so
    # `data.colourless_permute_prob` applies (other tasks refuse it).
    draws_captions = False
    # The `model.*` fields (dotted: "model" is all of them) the task's model never reads, as
    # for a task with a network configured elsewhere: its `validate` refuses changes to them,
    # and helpers that resize the towers (tests' `tiny`) leave them alone.
    unread_model_settings: tuple[str, ...] = ()

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises `mmjax.errors.ConfigError` for settings this task cannot run with (the
        default accepts every setting the shared validation accepted)."""
        return None

    def tokenizer(self, config: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
        return pipeline.tokenizer_for(config.data)

    @abc.abstractmethod
    def build_model(self, config: ml_collections.ConfigDict, vocab_size: int) -> nn.Module:
        """The model of `config` for a tokenizer of `vocab_size` ids."""

    @abc.abstractmethod
    def example_batch(self, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        """A batch of one example of zeros: the keys, shapes and dtypes of training batches."""

    def init_variables(
        self, model: nn.Module, config: ml_collections.ConfigDict, key: jax.Array
    ) -> dict:
        """The model's variables for `key` (default: `model.init` on the example batch's model
        inputs, `model_inputs(example_batch)`)."""
        return model.init(key, *self.model_inputs(self.example_batch(config)))

    @abc.abstractmethod
    def model_inputs(self, batch: dict) -> tuple:
        """The positional arguments of `model.__call__` taken from a batch."""

    def frozen_prefixes(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Parameter path prefixes (e.g. "teacher/") that are never updated besides
        `optim.frozen_prefixes`: parts of the model the objective only reads."""
        return ()

    def pretrained(
        self, config: ml_collections.ConfigDict, abstract_params: dict
    ) -> list[pretrained.Pretrained]:
        """The saved parameters a fresh run starts from, read here (outside any mesh context)
        and checked against `abstract_params` before anything trains: by default what
        `init_towers_from` and `init_from` ask for."""
        return pretrained.from_settings(config)

    @abc.abstractmethod
    def objective(
        self,
        model: nn.Module,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        rules: parallel.Rules,
    ) -> Objective:
        """The training loss of `model` under `config`."""

    @abc.abstractmethod
    def train_iterator(
        self, config: ml_collections.ConfigDict, process_index: int, process_count: int
    ):
        """A checkpointable iterator of this process's rows of every global batch."""

    @abc.abstractmethod
    def evaluator(
        self, config: ml_collections.ConfigDict, model: nn.Module, batch_sharding: NamedSharding
    ) -> Callable[[dict], dict]:
        """`params -> {metric: float}` on the validation data, on the training mesh."""


def headline(score: float, chance: float) -> dict[str, float]:
    """The `task/*` entries of an evaluation (the name is added to the summary by the loop)."""
    return {"task/score": float(score), "task/chance": float(chance)}
