"""Two-tower contrastive pretraining (CLIP softmax / SigLIP sigmoid / LiT) on image–caption data,
with optional triplet, adversarial-alignment and distillation terms weighted by
`config.objective` (see `mmjax.tasks.contrastive_objective`).

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
from mmjax.eval.evaluators import build_evaluator
from mmjax.losses.distill import EMBEDDING_KINDS
from mmjax.models.discriminator import ModalityDiscriminator
from mmjax.models.two_tower import TRAINING_PARTS, build_two_tower
from mmjax.tasks.contrastive_objective import DISTILL_TERMS, TERMS, ContrastiveObjective
from mmjax.tasks.weights import hf_text_tower
from mmjax.train import pretrained
from mmjax.train.task import Task


def enabled_terms(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The objective's terms with weight > 0 (name → weight)."""
    o = config.get("objective")
    if o is None:  # a config saved before `objective` existed (evaluating an old workdir)
        return {"contrastive": 1.0}
    return {t: float(o[t]) for t in TERMS if float(o[t]) > 0}


def distills(config: ml_collections.ConfigDict) -> bool:
    return any(t in enabled_terms(config) for t in DISTILL_TERMS)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the teacher's architecture as `model`: `distill.teacher_model`, or the
    student's own when that is empty. Data, dtype and tokenizer are the student's."""
    teacher = config.copy_and_resolve_references()
    if config.distill.teacher_model:
        teacher.model = config.distill.teacher_model
    return teacher


def validate_objective(config: ml_collections.ConfigDict) -> None:
    """ConfigError for contrastive settings (`loss`, `loss_impl`, `objective`, `distill`) that
    cannot run, for every task with a contrastive term."""
    if config.loss not in losses.KINDS:
        raise ConfigError(f"loss={config.loss!r} is unknown; use one of {', '.join(losses.KINDS)}")
    if config.loss_impl not in losses.IMPLS:
        raise ConfigError(
            f"loss_impl={config.loss_impl!r} is unknown; use one of {', '.join(losses.IMPLS)}"
        )
    o = config.objective
    weights = {t: o[t] for t in TERMS}
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
    teacher_dim = teacher_config(config).model.embed_dim
    if o.distill_embed > 0 and teacher_dim != config.model.embed_dim:
        raise ConfigError(
            f"objective.distill_embed compares embeddings, but the teacher's embed_dim is "
            f"{teacher_dim} and model.embed_dim {config.model.embed_dim}; make them equal or "
            "set objective.distill_embed=0 (distill_logits works across widths)"
        )


class ContrastiveTask(Task):
    name = "contrastive"
    supports_microbatches = True

    def validate(self, config):
        validate_objective(config)

    def build_model(self, config, vocab_size):
        model = build_two_tower(config, vocab_size)
        terms, parts = enabled_terms(config), {}
        if "adversarial" in terms:
            parts["discriminator"] = ModalityDiscriminator(
                hidden=config.model.embed_dim, dtype=jnp.dtype(config.dtype)
            )
        if distills(config):
            parts["teacher"] = build_two_tower(teacher_config(config), vocab_size)
        return model.clone(**parts) if parts else model

    def frozen_prefixes(self, config):
        return ("teacher/",) if distills(config) else ()

    def pretrained(self, config, abstract_params):
        # `init_from` holds a model's own parameters: the objective's parts keep theirs.
        parts = tuple(p for p in TRAINING_PARTS if p in abstract_params)
        sources = pretrained.from_settings(config, keep=parts) + hf_text_tower(config)
        if "teacher" in abstract_params:
            path, params = pretrained.read_params(config.distill.teacher, "distill.teacher")
            sources.append(
                pretrained.Pretrained(
                    path=("teacher",),
                    params=params,
                    misfit=f"distill.teacher={os.path.abspath(config.distill.teacher)!r} "
                    "does not fit distill.teacher_model (empty: model)",
                    loaded=f"Distillation teacher loaded from {path}",
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
        terms = enabled_terms(config)
        # Subclasses with their own `build_model` (video) may not add the parts.
        if ("adversarial" in terms and model.discriminator is None) or (
            distills(config) and model.teacher is None
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
            model,
            config.loss,
            config.loss_impl,
            mesh,
            parallel.batch_axes(rules),
            weights=terms,
            **settings,
        )

    def train_iterator(self, config, process_index, process_count):
        return pipeline.train_iterator(
            config.data,
            seed=config.seed,
            global_batch_size=config.batch_size,
            process_index=process_index,
            process_count=process_count,
        )

    def evaluator(self, config, model, batch_sharding):
        return build_evaluator(config, model, batch_sharding, config.eval.tasks)


TASK = ContrastiveTask()
