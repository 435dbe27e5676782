"""Captioning, CoCa-style: contrastive loss + next-token cross-entropy of a causal decoder that
cross-attends to the image tokens, trained together on image–caption data; greedy and
beam-search decoding at evaluation.

Reported on the first `captioning.eval_examples` validation images: `captioning/bleu4_greedy`,
`captioning/bleu4_beam` (corpus BLEU-4 against every English caption of the image), and for
attribute-labelled data (shapes) `captioning/attr_<color|shape|size|position>`: the fraction of
beam captions that name the image's attribute correctly. `task/score` is beam BLEU-4;
`task/chance` the BLEU-4 of a blind captioner that writes the most frequent canonical training
caption for every image.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np
import optax

from mmjax import losses
from mmjax.data import pipeline, sources
from mmjax.data.builtin import shapes
from mmjax.eval.bleu import corpus_bleu
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.coca import beam_search, build_coca
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.train.task import headline

_ATTRIBUTE_WORDS = {
    "color": shapes.COLORS,
    "shape": shapes.SHAPES,
    "size": shapes.SIZES,
    "position": shapes.POSITION_PHRASES,
}


class CaptioningObjective:
    def __init__(self, model, contrastive_weight: float, caption_weight: float, pad_id: int):
        self.model = model
        self.weights = (contrastive_weight, caption_weight)
        self.pad_id = pad_id

    def __call__(self, params, batch, step=None):
        tokens_BL = batch["tokens"]
        img_BE, txt_BE, aux, logits_BLV = self.model.apply(
            {"params": params}, batch["image"], tokens_BL
        )
        contrastive = jnp.mean(losses.softmax_contrastive(img_BE, txt_BE, aux["logit_scale"]))
        # Position t predicts token t + 1; padding targets are ignored, EOT is learned (to stop).
        targets_BL = tokens_BL[:, 1:]
        weights_BL = (targets_BL != self.pad_id).astype(jnp.float32)
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1], targets_BL)
        caption = jnp.sum(nll_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)
        w_con, w_cap = self.weights
        total = w_con * contrastive + w_cap * caption
        logs = {
            "train/loss/contrastive": contrastive,
            "train/loss/caption": caption,
            "train/logit_scale": aux["logit_scale"],
        }
        return total, logs


class CaptioningTask(ContrastiveTask):
    name = "captioning"
    metric_name = "bleu4"
    supports_microbatches = False

    def build_model(self, config, vocab_size):
        return build_coca(config, vocab_size)

    def objective(self, model, config, mesh, rules):
        cap = config.captioning
        return CaptioningObjective(
            model, cap.contrastive_weight, cap.caption_weight, config.model.text.pad_id
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
            def decode(params, images):
                apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
                _, img_BND = apply(images, method=model.image_tokens)
                b = images.shape[0]
                img_NSD = jnp.repeat(img_BND, beam, axis=0)
                logits_fn = lambda t: apply(img_NSD, t, method=model.decoder_logits)
                return beam_search(logits_fn, b, length, beam, bos, eot, pad)[0]

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
