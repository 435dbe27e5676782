"""Captioning, CoCa-style: the two-tower contrastive objective (every setting of it: `loss`,
`loss_impl`, `microbatches`, `objective.*`, `distill`) plus the next-token cross-entropy of a
causal decoder that cross-attends to the image tokens, one weighted sum (contrastive term:
`captioning.contrastive_weight`, caption term: `captioning.caption_weight`, logged as
`train/loss/caption`); greedy and beam-search decoding at evaluation.

Reported on the first `captioning.eval_examples` validation images: `captioning/bleu4_greedy`,
`captioning/bleu4_beam` (corpus BLEU-4 against every English caption of the image), and for
attribute-labelled data (shapes) `captioning/attr_<color|shape|size|position>`: the fraction of
beam captions that name the image's attribute correctly. `task/score` is beam BLEU-4;
`task/chance` the BLEU-4 of a blind captioner that writes the most frequent canonical training
caption for every image.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from mmjax import losses
from mmjax.data import pipeline, sources
from mmjax.data.builtin import shapes
from mmjax.eval.bleu import corpus_bleu
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.coca import CoCa, build_coca, caption
from mmjax.tasks.contrastive import EVAL_SETTINGS, ContrastiveTask
from mmjax.tasks.contrastive_objective import ContrastiveObjective, weigh
from mmjax.train.gradcache import PER_EXAMPLE
from mmjax.train.task import headline
from mmjax.train.validate import refuse_overrides

_ATTRIBUTE_WORDS = {
    "color": shapes.COLORS,
    "shape": shapes.SHAPES,
    "size": shapes.SIZES,
    "position": shapes.POSITION_PHRASES,
}


@dataclasses.dataclass(frozen=True)
class CaptioningObjective:
    """The contrastive objective's terms on the CoCa model's two towers plus the caption loss.

    A `SplitObjective`: `embed` runs the towers once (the decoder reads the image tokens of the
    same pass) and sums each example's caption loss and token count into `aux[PER_EXAMPLE]`,
    so with GradCache microbatches the caption term is still the mean over the global batch's
    tokens. A caption weight of 0 runs no decoder. Also a `StatefulObjective` (`with_state`), so
    a BatchNorm image tower trains with batch statistics.
    """

    contrastive: ContrastiveObjective
    model: CoCa
    caption_weight: float
    pad_id: int

    @property
    def weights(self) -> dict[str, float]:
        caption = {"caption": self.caption_weight} if self.caption_weight > 0 else {}
        return {**self.contrastive.weights, **caption}

    def embed(self, params, batch, step=None):
        return self._embed(params, {}, batch, step)[:3]

    def with_state(self, params, state, batch, step=None):
        """(loss, logs, the state after this batch) of a model with state (a BatchNorm image
        tower, `mmjax.model_state`): the towers run in training mode once; the decoder reads
        their image tokens and has no state of its own."""
        img_BE, txt_BE, aux, state = self._embed(params, state, batch, step)
        return *self.loss(img_BE, txt_BE, aux), state

    def _embed(self, params, state, batch, step):
        embedded = self.contrastive.embed_with_tokens(params, batch, step, state)
        img_BE, txt_BE, aux, img_BND, _, state = embedded
        if self.caption_weight > 0:
            tokens_BL = batch["tokens"]
            logits_BLV = self.model.apply(
                {"params": params}, img_BND, tokens_BL, method=CoCa.decoder_logits
            )
            nll_B, count_B = losses.caption_nll(logits_BLV, tokens_BL, self.pad_id)
            per_example = {**aux.get(PER_EXAMPLE, {}), "caption_nll": nll_B}
            aux = {**aux, PER_EXAMPLE: {**per_example, "caption_tokens": count_B}}
        return img_BE, txt_BE, aux, state

    def loss(self, img_BE, txt_BE, aux):
        terms, logs = self.contrastive.terms(img_BE, txt_BE, aux)
        if self.caption_weight > 0:
            per_example = aux[PER_EXAMPLE]
            nll_B, count_B = per_example["caption_nll"], per_example["caption_tokens"]
            terms["caption"] = losses.mean_caption_loss(nll_B, count_B)
        return weigh(terms, self.weights, logs)

    def __call__(self, params, batch, step=None):
        return self.loss(*self.embed(params, batch, step))


class CaptioningTask(ContrastiveTask):
    name = "captioning"
    metric_name = "bleu4"
    contrastive_weight_setting = "captioning.contrastive_weight"
    image_text_embeddings = True  # CoCa.encode_image / encode_text (its TwoTower)
    visualizer = None

    def validate(self, config):
        refuse_overrides(config, EVAL_SETTINGS, f"task={self.name} evaluates by captioning")
        super().validate(config)

    def own_terms(self, config):
        return {"caption": float(config.captioning.caption_weight)}

    def build_model(self, config, vocab_size):
        return build_coca(config, vocab_size, two_tower=super().build_model(config, vocab_size))

    def objective(self, model, config, mesh, rules):
        return CaptioningObjective(
            self.contrastive_objective(model.two_tower, config, mesh, rules),
            model,
            self.own_terms(config)["caption"],
            config.model.text.pad_id,
        )

    def evaluator(self, config, model, batch_sharding):
        return CaptionEvaluator(config, model, batch_sharding, self.tokenizer(config))


def _english(name: str, captions: list[str]) -> list[str]:
    return captions[: shapes.NUM_EN_CAPTIONS] if name == "shapes" else captions


class CaptionEvaluator:
    def __init__(self, config, model, sharding, tokenizer):
        d, cap = config.data, config.captioning
        val = pipeline.eval_arrays(d)
        n = min(cap.eval_examples, len(val["image"]))
        self.images = val["image"][:n]
        source = sources.open_source(d, d.name, "validation")
        examples = source.__getitems__(range(n))
        self.references = [_english(d.name, ex["captions"]) for ex in examples]
        self.attributes = {a: val[a][:n] for a in _ATTRIBUTE_WORDS if a in val}
        train = sources.open_source(d, d.name, "train")
        first = [ex["captions"][0] for ex in train.__getitems__(range(min(len(train), 2000)))]
        blind = collections.Counter(first).most_common(1)[0][0]
        self.chance = corpus_bleu([blind] * n, self.references)
        self.tokenizer, self.sharding, self.config = tokenizer, sharding, config
        length = d.text_length
        bos, eot, pad = tokenizer.bos_id, tokenizer.eot_id, tokenizer.pad_id

        def decoder(beam):
            # Key/value-cached decoding: the same captions as rerunning the prefix, faster.
            def decode(params, images):
                return caption(model, params, images, length, beam, bos, eot, pad)[0]

            return jit_encoder(decode, sharding)

        self._greedy, self._beam = decoder(1), decoder(cap.beam_size)

    def captions(self, params, beam: bool = True) -> list[str]:
        fn = self._beam if beam else self._greedy
        ids = predict_all(fn, params, self.images, self.config.eval.batch_size, self.sharding)
        return [self.tokenizer.decode(row) for row in ids]

    def __call__(self, params) -> dict:
        greedy = self.captions(params, beam=False)
        beam = self.captions(params, beam=True)
        out = {
            "captioning/bleu4_greedy": corpus_bleu(greedy, self.references),
            "captioning/bleu4_beam": corpus_bleu(beam, self.references),
        }
        for attr, labels in self.attributes.items():
            words = _ATTRIBUTE_WORDS[attr]
            hits = [f" {words[k]} " in f" {c} " for c, k in zip(beam, labels, strict=True)]
            out[f"captioning/attr_{attr}"] = float(np.mean(hits))
        return {**out, **headline(out["captioning/bleu4_beam"], self.chance)}


TASK = CaptioningTask()
