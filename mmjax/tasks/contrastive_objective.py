"""The two-tower training objective: contrastive loss plus optional metric, adversarial and
distillation terms, combined by `losses.weighted_sum`.

Terms (weights from `config.objective`, see `mmjax.tasks.contrastive`; a term with weight 0 is
not built, not computed and not logged):

  contrastive     CLIP softmax / SigLIP sigmoid over the global batch (`config.loss`);
  triplet         VSE++ hinge with the hardest in-batch negative, both directions;
  adversarial     BCE of a modality discriminator on the embeddings behind a gradient reversal
                  layer with DANN's ramp λ(step / total_steps): the discriminator learns to tell
                  images from texts, the towers learn to make them indistinguishable;
  distill_logits  temperature-scaled KL between the teacher's and the student's in-batch
                  retrieval distributions (softmax over the scaled similarity logits);
  distill_embed   per-example distance between student and teacher embeddings.

The teacher is frozen: its parameters get no gradient, and a BatchNorm teacher normalises with
the running statistics it was loaded with (in the model state), which stay as they are.

The towers (`embed`) and the loss over the whole batch (`loss`) are separate so that GradCache
can run `embed` per microbatch. So everything computed from parameters, teacher embeddings and
discriminator logits included, is produced in `embed`, per example, under `aux[PER_EXAMPLE]`.

Tasks whose model holds a `TwoTower` (captioning, matching) compose this objective rather than
copy it: they run `embed_with_tokens` (the towers once, their token streams kept for a decoder or
fusion), add their own terms to those of `terms`, and weigh everything with `weigh`. So every
setting here (loss kind, `loss_impl`, GradCache, objective terms, distillation) applies to them.
Each term is logged as `train/loss/<term>`, unweighted.
"""

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import losses, model_state
from mmjax.train.gradcache import PER_EXAMPLE

TERMS = ("contrastive", "triplet", "adversarial", "distill_logits", "distill_embed")
DISTILL_TERMS = ("distill_logits", "distill_embed")


@dataclasses.dataclass(frozen=True)
class ContrastiveObjective:
    """Two-tower objective over the global batch: `(params, batch, step) -> (loss, logs)`.

    `model` is a `TwoTower`, applied to the task's whole parameters (a model that holds one
    shares its scope, so the two-tower parameters are at the top level there too). `weights`
    holds the enabled terms only (name → weight > 0, names from `TERMS`; empty when a composed
    objective uses only the towers). The model must carry the parts its terms read:
    `model.discriminator` for "adversarial", `model.teacher` for the distillation terms (see
    `TwoTower`). `loss_impl` picks how the contrastive loss is distributed over the batch axes
    of `mesh` (see `losses.contrastive_sharded`); every choice gives the same values and
    gradients.
    """

    model: nn.Module
    loss_kind: str
    loss_impl: str = "naive"
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ("data", "fsdp")
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"contrastive": 1.0})
    triplet_margin: float = 0.2
    adversarial_gamma: float = 10.0
    total_steps: int = 1
    distill_temperature: float = 2.0
    distill_embed_kind: str = "cosine"

    def __post_init__(self):
        if self.loss_kind not in losses.KINDS:
            raise ValueError(f"unknown loss {self.loss_kind!r}; choose one of {losses.KINDS}")
        if self.loss_impl not in losses.IMPLS:
            raise ValueError(f"unknown loss_impl {self.loss_impl!r}; choose one of {losses.IMPLS}")
        unknown = sorted(set(self.weights) - set(TERMS))
        if unknown:
            raise ValueError(f"weights {dict(self.weights)}: name only terms of {TERMS}")
        if self.adversarial and self.model.discriminator is None:
            raise ValueError("the adversarial term needs a model with a discriminator")
        if self.distills and self.model.teacher is None:
            raise ValueError("the distillation terms need a model with a teacher")

    @property
    def adversarial(self) -> bool:
        return "adversarial" in self.weights

    @property
    def distills(self) -> bool:
        return any(t in self.weights for t in DISTILL_TERMS)

    def embed(
        self, params: dict, batch: dict, step: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, dict]:
        """Embeddings `[B, E]` and aux: per-batch scalars, and per-example arrays under
        `aux[PER_EXAMPLE]` for the terms that need more than the student's embeddings."""
        return self._embed(params, batch, step, return_tokens=False)[:3]

    def with_state(
        self, params: dict, state: dict, batch: dict, step: jax.Array | None = None
    ) -> tuple[jax.Array, dict, dict]:
        """`__call__` for a model with state (BatchNorm statistics, see `mmjax.model_state`):
        (loss, logs, the state after this batch)."""
        img_BE, txt_BE, aux, _, _, new_state = self._embed(params, batch, step, False, state)
        return *self.loss(img_BE, txt_BE, aux), new_state

    def embed_with_tokens(
        self,
        params: dict,
        batch: dict,
        step: jax.Array | None = None,
        state: dict | None = None,
    ) -> tuple[jax.Array, jax.Array, dict, jax.Array, jax.Array, dict]:
        """`embed`, the towers' token streams `img_BND`, `txt_BLD` (from the same pass) for the
        terms of a composed objective, and the model state after this batch (`state` given: a
        model with state, see `with_state`; `{}` otherwise). The streams are not part of
        `aux`: GradCache averages aux entries other than `aux[PER_EXAMPLE]` over microbatches."""
        return self._embed(params, batch, step, True, state)

    def _embed(
        self,
        params: dict,
        batch: dict,
        step: jax.Array | None,
        return_tokens: bool,
        state: dict | None = None,
    ):
        images, tokens = batch["image"], batch["tokens"]
        # A teacher with BatchNorm (the default run's ResNet) has its running statistics in the
        # state, under "teacher" as its parameters are. So the objective is a stateful one
        # whenever the teacher is, even for a stateless student (`with_state`; the step keeps
        # the state it returns). The student runs without them (a stateless student exactly as
        # with a stateless teacher), the teacher reads them immutably (running averages, as its
        # run's evaluation did), and they are returned as given: never updated.
        state = state or {}
        teacher_state = {c: tree["teacher"] for c, tree in state.items() if "teacher" in tree}
        own_state = {c: _without(tree, "teacher") for c, tree in state.items()}
        own_state = {c: tree for c, tree in own_state.items() if tree}
        # Flax ignores the parameters of parts a method does not run (teacher, discriminator,
        # and the decoder or fusion of a model that holds this two-tower one).
        (img_BE, txt_BE, aux), own_state = model_state.apply_training(
            self.model.apply, params, own_state, images, tokens, return_tokens=return_tokens
        )
        state = {c: {**own_state.get(c, {})} for c in state}
        for c, tree in teacher_state.items():
            state[c]["teacher"] = tree
        img_BND = aux.pop("image_tokens_BND", None)
        txt_BLD = aux.pop("text_tokens_BLD", None)
        per_example = {}
        if self.distills:
            # Frozen twice over: no gradient reaches the teacher's parameters (so autodiff does
            # no backward pass through it) and its outputs are constants of the loss.
            frozen = {"params": jax.lax.stop_gradient(params["teacher"]), **teacher_state}
            t_img_BE, t_txt_BE, t_aux = self.model.teacher.apply(frozen, images, tokens)
            per_example["teacher_image"] = t_img_BE
            per_example["teacher_text"] = t_txt_BE
            aux = {**aux, "teacher_logit_scale": t_aux["logit_scale"]}
        if self.adversarial:
            if step is None:
                raise ValueError("the adversarial term needs the step (its λ schedule)")
            lam = losses.dann_lambda(step / self.total_steps, self.adversarial_gamma)
            # Identity forward; backward the towers get -λ times the discriminator's gradient.
            rev_img_BE, rev_txt_BE = losses.gradient_reversal((img_BE, txt_BE), lam)
            discriminate = lambda x: self.model.discriminator.apply(
                {"params": params["discriminator"]}, x
            )
            per_example["modality_logits_image"] = discriminate(rev_img_BE)
            per_example["modality_logits_text"] = discriminate(rev_txt_BE)
            aux = {**aux, "adversarial_lambda": lam}
        if per_example:
            aux = {**aux, PER_EXAMPLE: per_example}
        return img_BE, txt_BE, aux, img_BND, txt_BLD, state

    def loss(self, img_BE: jax.Array, txt_BE: jax.Array, aux: dict) -> tuple[jax.Array, dict]:
        terms, logs = self.terms(img_BE, txt_BE, aux)
        return weigh(terms, self.weights, logs)

    def terms(
        self, img_BE: jax.Array, txt_BE: jax.Array, aux: dict
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(the enabled terms' scalar losses over the global batch, the logs besides them)."""
        terms = {}
        per_example = aux.get(PER_EXAMPLE, {})
        logs = {
            "train/logit_scale": aux["logit_scale"],
            "train/logit_bias": aux["logit_bias"],
            "train/image_norm": aux["image_norm"],
            "train/text_norm": aux["text_norm"],
        }
        if "contrastive" in self.weights:
            per_example_B = losses.contrastive_loss_sharded(
                self.loss_kind,
                self.loss_impl,
                img_BE,
                txt_BE,
                aux["logit_scale"],
                aux["logit_bias"],
                mesh=self.mesh,
                batch_axes=self.batch_axes,
            )
            terms["contrastive"] = jnp.mean(per_example_B)
        if "triplet" in self.weights:
            triplet_B = losses.bidirectional_triplet(img_BE, txt_BE, self.triplet_margin)
            terms["triplet"] = jnp.mean(triplet_B)
        if self.adversarial:
            z_img_B = per_example["modality_logits_image"]
            z_txt_B = per_example["modality_logits_text"]
            bce_B = losses.modality_discriminator_loss(z_img_B, z_txt_B)
            terms["adversarial"] = jnp.mean(bce_B)
            # 0.5 = the towers won: the discriminator cannot tell the modalities apart.
            correct_B = 0.5 * ((z_img_B > 0).astype(jnp.float32) + (z_txt_B < 0))
            logs["train/modality_accuracy"] = jnp.mean(correct_B)
            logs["train/adversarial_lambda"] = aux["adversarial_lambda"]
        if self.distills:
            t_img_BE, t_txt_BE = per_example["teacher_image"], per_example["teacher_text"]
        if "distill_logits" in self.weights:
            # Temperature and bias are the models' own; a bias shifts every logit of a row
            # alike and leaves the softmax unchanged, so only the scales enter.
            student_BB = losses.pairwise_logits(img_BE, txt_BE, aux["logit_scale"])
            teacher_BB = losses.pairwise_logits(t_img_BE, t_txt_BE, aux["teacher_logit_scale"])
            kd_B = losses.similarity_kd_loss(student_BB, teacher_BB, self.distill_temperature)
            terms["distill_logits"] = jnp.mean(kd_B)
        if "distill_embed" in self.weights:
            kind = self.distill_embed_kind
            img_B = losses.embedding_distill_loss(img_BE, t_img_BE, kind)
            txt_B = losses.embedding_distill_loss(txt_BE, t_txt_BE, kind)
            terms["distill_embed"] = jnp.mean(0.5 * (img_B + txt_B))
        return terms, logs

    def __call__(
        self, params: dict, batch: dict, step: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        return self.loss(*self.embed(params, batch, step))


def _without(tree: dict, key: str) -> dict:
    return {k: v for k, v in tree.items() if k != key}


def weigh(
    terms: Mapping[str, jax.Array], weights: Mapping[str, float], logs: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Σ weight · term, `logs` with each term as `train/loss/<name>`): the one way every task
    with several terms combines them (`losses.weighted_sum`, which refuses a term without a
    weight and a weight without a term)."""
    total, term_logs = losses.weighted_sum(terms, weights)
    return total, {**logs, **{f"train/{name}": v for name, v in term_logs.items()}}
