"""Two-tower contrastive pretraining (CLIP softmax / SigLIP sigmoid / LiT) on image–caption data,
with optional triplet, adversarial-alignment and distillation terms weighted by
`config.objective` (see `mmjax.tasks.contrastive_objective`); and `ContrastiveTask`, the base of
every task with a contrastive term (video_contrastive, captioning, matching).

The parts those terms need are added to the model only when their weight is > 0: a modality
discriminator (trained with everything else) and a distillation teacher (`config.distill`: its
parameters are loaded from `distill.teacher` at the start of a run and never updated).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import losses, parallel
from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.eval import maps
from mmjax.eval.evaluators import build_evaluator
from mmjax.losses.distill import EMBEDDING_KINDS
from mmjax.models.discriminator import ModalityDiscriminator
from mmjax.models.two_tower import TRAINING_PARTS, TwoTower, build_two_tower, validate_towers
from mmjax.tasks.contrastive_objective import DISTILL_TERMS, TERMS, ContrastiveObjective
from mmjax.tasks.weights import hf_text_tower
from mmjax.train import pretrained
from mmjax.train.task import Task
from mmjax.train.validate import refuse_overrides

# The settings of the contrastive evaluator (`build_evaluator`): a task with its own evaluator
# refuses them (they would do nothing).
EVAL_SETTINGS = ("eval.tasks", "eval.probe_shots")


def objective_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Every two-tower objective term's weight from `config.objective`, 0 included."""
    o = config.get("objective")
    if o is None:  # a config saved before `objective` existed (evaluating an old workdir)
        return {t: float(t == "contrastive") for t in TERMS}
    return {t: float(o[t]) for t in TERMS}


def enabled_terms(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The objective's terms with weight > 0 (name → weight)."""
    return {t: w for t, w in objective_weights(config).items() if w > 0}


def distills(config: ml_collections.ConfigDict) -> bool:
    return any(t in enabled_terms(config) for t in DISTILL_TERMS)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the teacher's architecture as `model`: `distill.teacher_model`, or the
    student's own when that is empty. Data, dtype and tokenizer are the student's."""
    teacher = config.copy_and_resolve_references()
    if config.distill.teacher_model:
        teacher.model = config.distill.teacher_model
    return teacher


def validate_objective(
    config: ml_collections.ConfigDict, weights: dict[str, float] | None = None
) -> None:
    """ConfigError for contrastive settings (`loss`, `loss_impl`, `objective`, `distill`) that
    cannot run, for every task with a contrastive term. `weights`: every term's weight, the
    task's own terms included (default: `objective_weights`)."""
    if config.loss not in losses.KINDS:
        raise ConfigError(f"loss={config.loss!r} is unknown; use one of {', '.join(losses.KINDS)}")
    if config.loss_impl not in losses.IMPLS:
        raise ConfigError(
            f"loss_impl={config.loss_impl!r} is unknown; use one of {', '.join(losses.IMPLS)}"
        )
    o = config.objective
    weights = objective_weights(config) if weights is None else weights
    if not all(w >= 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ConfigError(
            f"objective weights {weights}: each must be >= 0 (0 = off) and one at least > 0"
        )
    if o.triplet_margin < 0 or o.adversarial_gamma <= 0 or o.distill_temperature <= 0:
        raise ConfigError(
            f"objective.triplet_margin={o.triplet_margin} must be >= 0, adversarial_gamma="
            f"{o.adversarial_gamma} and distill_temperature={o.distill_temperature} > 0"
        )
    if o.distill_embed_kind not in EMBEDDING_KINDS:
        raise ConfigError(
            f"objective.distill_embed_kind={o.distill_embed_kind!r} is unknown; use one of "
            f"{', '.join(EMBEDDING_KINDS)}"
        )
    if not distills(config):
        return
    teacher = config.distill.teacher
    if not teacher:
        raise ConfigError(
            "objective.distill_logits/distill_embed > 0 need a teacher: set distill.teacher to "
            "its run directory (e.g. workdirs/default) or a parameters checkpoint"
        )
    if not os.path.exists(teacher):
        raise ConfigError(
            f"distill.teacher={teacher!r} does not exist; train the teacher first (e.g. "
            f"python train.py --workdir {teacher}) or point distill.teacher at its run"
        )
    try:  # (e.g. a BatchNorm teacher cannot run per GradCache microbatch)
        validate_towers(teacher_config(config))
    except ConfigError as e:
        raise ConfigError(f"distill.teacher_model (empty: model): {e}") from None
    teacher_dim = teacher_config(config).model.embed_dim
    if o.distill_embed > 0 and teacher_dim != config.model.embed_dim:
        raise ConfigError(
            f"objective.distill_embed compares embeddings, but the teacher's embed_dim is "
            f"{teacher_dim} and model.embed_dim {config.model.embed_dim}; make them equal or "
            "set objective.distill_embed=0 (distill_logits works across widths)"
        )


class ContrastiveTask(Task):
    """A task whose objective is the two-tower `ContrastiveObjective`, alone (here) or composed
    with the task's own terms (`own_terms`, `objective`): every contrastive setting applies."""

    name = "contrastive"
    supports_microbatches = True
    has_contrastive_term = True
    # The config field weighing the contrastive term. A task that names its own (captioning,
    # matching) refuses a changed objective.contrastive: it would do nothing.
    contrastive_weight_setting = "objective.contrastive"
    image_text_embeddings = True  # TwoTower.encode_image and encode_text
    draws_captions = True  # pipeline.caption_batches (captioning and matching too)

    def visualizer(self, config):
        return maps.SimilarityMaps()

    def own_terms(self, config) -> dict[str, float]:
        """The weights (0 included) of the task's terms besides the two-tower objective's."""
        return {}

    def term_weights(self, config) -> dict[str, float]:
        """Every term's weight, 0 included: the two-tower objective's (the contrastive one
        from `contrastive_weight_setting`), then the task's own."""
        weights = objective_weights(config)
        section, field = self.contrastive_weight_setting.split(".")
        if section in config:  # (not in a config saved before `objective` existed)
            weights["contrastive"] = float(config[section][field])
        return {**weights, **self.own_terms(config)}

    def validate(self, config):
        validate_towers(config)
        if self.contrastive_weight_setting != "objective.contrastive":
            refuse_overrides(
                config,
                ("objective.contrastive",),
                f"task={self.name} weighs its contrastive term with "
                f"{self.contrastive_weight_setting}",
            )
        validate_objective(config, self.term_weights(config))

    def two_tower(self, config, vocab_size) -> TwoTower:
        """The plain two-tower model of `config` (the student; the teacher's architecture with
        the teacher's config). A task with other towers (video) replaces one here."""
        return build_two_tower(config, vocab_size)

    def build_model(self, config, vocab_size):
        """The two-tower model with the parts its objective terms need (tasks that add a
        decoder or fusion hold this model: see `CaptioningTask`, `MatchingTask`)."""
        model = self.two_tower(config, vocab_size)
        terms, parts = enabled_terms(config), {}
        if "adversarial" in terms:
            parts["discriminator"] = ModalityDiscriminator(
                hidden=config.model.embed_dim, dtype=jnp.dtype(config.dtype)
            )
        if distills(config):
            parts["teacher"] = self.two_tower(teacher_config(config), vocab_size)
        return model.clone(**parts) if parts else model

    def frozen_prefixes(self, config):
        return ("teacher/",) if distills(config) else ()

    def pretrained(self, config, abstract_params):
        # `init_from` holds a model's own parameters: the objective's parts keep theirs.
        parts = tuple(p for p in TRAINING_PARTS if p in abstract_params)
        sources = pretrained.from_settings(config, keep=parts) + hf_text_tower(config)
        if "teacher" in abstract_params:
            # The teacher is its parameters and its BatchNorm running statistics (the default
            # run's ResNet), placed in the model state's "teacher" subtree and never updated.
            path, params, state = pretrained.read_params_and_state(
                config.distill.teacher, "distill.teacher"
            )
            sources.append(
                pretrained.Pretrained(
                    path=("teacher",),
                    params=params,
                    misfit=f"distill.teacher={os.path.abspath(config.distill.teacher)!r} "
                    "does not fit distill.teacher_model (empty: model)",
                    loaded=f"Distillation teacher loaded from {path}",
                    state=state,
                    state_complete=True,
                )
            )
        return sources

    def example_batch(self, config):
        size = config.data.image_size
        return {
            "image": np.zeros((1, size, size, 3), np.float32),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
        }

    def model_inputs(self, batch):
        return batch["image"], batch["tokens"]

    def objective(self, model, config, mesh, rules):
        return self.contrastive_objective(model, config, mesh, rules)

    def contrastive_objective(self, two_tower, config, mesh, rules) -> ContrastiveObjective:
        """The two-tower objective's terms on `two_tower` (the model, or the `TwoTower` a
        composed task's model holds) with their weights, settings and the loss distribution
        over `mesh`."""
        terms = {t: w for t, w in self.term_weights(config).items() if t in TERMS and w > 0}
        # A subclass with its own `build_model` may not add the parts.
        if ("adversarial" in terms and two_tower.discriminator is None) or (
            distills(config) and two_tower.teacher is None
        ):
            raise ConfigError(
                f"task={self.name} builds no modality discriminator / teacher for objective "
                f"{terms}; set objective.adversarial and objective.distill_* to 0"
            )
        o = config.get("objective")  # None: a config saved before `objective` existed
        settings = {}
        if o is not None:
            settings = dict(
                triplet_margin=o.triplet_margin,
                adversarial_gamma=o.adversarial_gamma,
                total_steps=config.total_steps,
                distill_temperature=o.distill_temperature,
                distill_embed_kind=o.distill_embed_kind,
            )
        return ContrastiveObjective(
            two_tower,
            config.loss,
            config.loss_impl,
            mesh,
            parallel.batch_axes(rules),
            weights=terms,
            **settings,
        )

    def train_iterator(self, config, process_index, process_count):
        return pipeline.caption_batches(config, process_index, process_count)

    def evaluator(self, config, model, batch_sharding):
        return build_evaluator(config, model, batch_sharding, config.eval.tasks)


TASK = ContrastiveTask()
