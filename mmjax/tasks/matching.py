"""Image–text matching pretraining (ALBEF-style) as a weighted multi-task sum on image–caption
data, logged as `train/loss/<term>`:

  contrastive  the two-tower contrastive objective (weight `matching.itc`; every setting of it
               applies: `loss`, `loss_impl`, `objective.*` terms, `distill`);
  itm          match / no-match of the fusion's pooled text stream on the positive pairs plus
               one hard negative text per image and one hard negative image per text, sampled
               in proportion to the contrastive similarity (identical captions never count as
               negatives); with `matching.swap_prob` > 0 an image's negative text is, that often,
               its own caption with one attribute word swapped (`mmjax.data.word_swap`), the
               one-fact-false negative that in-batch mining rarely finds; `positive_weight`
               weighs the positives against the two negatives per image;
  mlm          masked language modelling of the caption by the fused text stream, i.e.
               conditioned on the image (bytes tokenizer: the unused id `vocab_size - 1` is the
               mask token).

Weights: `config.matching.{itc,itm,mlm}`. The randomness (negatives, masks) comes from a seed
drawn per example by the data pipeline, so it is deterministic, resumes exactly and is the same
on any mesh. GradCache (`microbatches` > 1) is refused: the ITM negatives of an example come
from the whole batch, through the fusion, so the loss does not split into per-example parts.

Evaluation on the validation split of a shapes-like dataset with attribute labels: every image
with its canonical caption (match) and with the caption of the same image with one attribute
changed (colour, shape, size or position; no match). `task/score` is the ITM accuracy over these
pairs, `task/chance` 0.5. `matching/mlm_color` is the fraction of captions whose masked colour
word the MLM head restores exactly (text alone cannot know it: chance is 1/8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses, model_state
from mmjax.data import pipeline, tokenizers, word_swap
from mmjax.data.builtin import shapes
from mmjax.errors import ConfigError, EvalSpecError
from mmjax.eval import maps
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.matching_model import build_matching_model
from mmjax.tasks.contrastive import EVAL_SETTINGS, ContrastiveTask
from mmjax.tasks.contrastive_objective import ContrastiveObjective, weigh
from mmjax.train.task import headline
from mmjax.train.validate import refuse_overrides

_ATTRIBUTES = ("color", "shape", "size", "position")
_VALUES = {"color": shapes.COLORS, "shape": shapes.SHAPES, "size": shapes.SIZES}
_VALUES["position"] = shapes.POSITIONS


class _CaptionAndSeed(pipeline.DecodeAndPickCaption):
    """The image and its caption's tokens, a per-example seed, and with `swap_prob` > 0 a
    negative caption: the caption with one attribute word swapped (`swap_tokens`), to be used
    in place of the mined negative text where `swap_use` is set (with probability `swap_prob`,
    if the caption has a word of the vocabulary)."""

    def __init__(self, tokenizer, data_cfg, swap_prob: float, swap_vocabulary: str):
        super().__init__(tokenizer, data_cfg)
        self._swap_prob = swap_prob
        self._swap = (
            word_swap.WordSwap(word_swap.vocabulary(swap_vocabulary)) if swap_prob else None
        )

    def random_map(self, element, rng):
        image, caption = self.pick(element, rng)
        encode = lambda text: self._tokenizer.encode([text])[0]
        out = {"image": image, "tokens": encode(caption), "seed": np.uint32(rng.integers(2**32))}
        if self._swap is not None:  # off: no draws, the stream of earlier runs is unchanged
            use = rng.random() < self._swap_prob
            swapped = self._swap(caption, rng)
            out["swap_tokens"] = encode(caption if swapped is None else swapped)
            out["swap_use"] = np.bool_(use and swapped is not None)
        return out


def mask_id_of(tokenizer: tokenizers.Tokenizer) -> int:
    """The tokenizer's mask token; a clear error for tokenizers without one (CLIP BPE)."""
    if tokenizer.mask_id is None:
        raise ConfigError(
            f"the MLM term needs a tokenizer with a mask token; {type(tokenizer).__name__} has "
            "none: use data.tokenizer=bytes or wordpiece, or set matching.mlm=0"
        )
    return int(tokenizer.mask_id)


class MatchingObjective:
    """The contrastive objective's terms on the matching model's two towers plus ITM and MLM
    (weights > 0 only), one weighted sum. Not a `SplitObjective` (see the module docstring)."""

    def __init__(
        self,
        contrastive: ContrastiveObjective,
        model,
        weights: dict,
        tokenizer,
        pad_id: int,
        hardness: float = 1.0,
        positive_weight: float = 1.0,
    ):
        self.contrastive = contrastive
        self.model = model
        own = {k: float(weights[k]) for k in ("itm", "mlm") if float(weights[k]) > 0}
        self.weights = {**contrastive.weights, **own}
        self.hardness = hardness
        self.positive_weight = positive_weight
        self.pad_id = pad_id
        self.vocab_size = tokenizer.vocab_size
        self.mask_id = mask_id_of(tokenizer)
        specials = {pad_id, *(i for i in (tokenizer.bos_id, tokenizer.eot_id) if i is not None)}
        self.space_id = None
        if isinstance(tokenizer, tokenizers.ByteTokenizer):
            self.space_id = int(tokenizer.encode([" "])[0, 1])
            specials.add(self.space_id)
        self.special_ids = tuple(sorted(specials))

    def word_ids(self, tokens_BL):
        """Whole-word masking for the bytes tokenizer: a word is a run between spaces (the
        spaces themselves are never masked); None (token-level masking) otherwise."""
        if self.space_id is None:
            return None
        return jnp.cumsum(tokens_BL == self.space_id, axis=1)

    def __call__(self, params: dict, batch: dict, step=None):
        loss, logs, _ = self.with_state(params, {}, batch, step)
        return loss, logs

    def with_state(self, params: dict, state: dict, batch: dict, step=None):
        """(loss, logs, the state after this batch) of a model with state (a BatchNorm image
        tower, `mmjax.model_state`): the towers run in training mode once; the fusion and the
        heads read their token streams (and the text tower, on masked text) and have no state."""
        m = self.model

        def apply(method, *args):
            return m.apply({"params": params}, *args, method=method)

        tokens_BL = batch["tokens"]
        valid_BL = tokens_BL != self.pad_id
        embedded = self.contrastive.embed_with_tokens(params, batch, step, state)
        img_BE, txt_BE, aux, img_BND, txt_BLD, state = embedded
        terms, logs = self.contrastive.terms(img_BE, txt_BE, aux)
        k_negatives, k_mask = jax.random.split(jax.random.key(batch["seed"][0]))
        if "itm" in self.weights:
            sim_BB = img_BE @ txt_BE.T
            same_text_BB = jnp.all(tokens_BL[:, None, :] == tokens_BL[None, :, :], axis=-1)
            # Negatives drawn ∝ exp(hardness · scale · cosine): 1 = the contrastive model's
            # own distribution (ALBEF), 0 = uniform over the other captions.
            scale = jax.lax.stop_gradient(aux["logit_scale"])
            neg_txt_B, neg_img_B = losses.mine_hard_negatives(
                sim_BB * (self.hardness * scale), k_negatives, positive_BB=same_text_BB
            )
            img_idx_N, txt_idx_N, labels_N, weights_N = losses.itm_batch_indices(
                neg_txt_B, neg_img_B
            )
            texts = (txt_BLD, valid_BL)
            if "swap_tokens" in batch:  # word-swapped captions: texts B..2B-1
                swap_BL = batch["swap_tokens"]
                swap_BLD = apply(m.text_tokens, swap_BL)
                swapped = (swap_BLD, swap_BL != self.pad_id)
                texts = tuple(map(jnp.concatenate, zip(texts, swapped, strict=True)))
                txt_idx_N, weights_N = losses.use_extra_text_negatives(
                    txt_idx_N, weights_N, batch["swap_use"]
                )
            (img_NSD,), (txt_NLD, valid_NL) = losses.take_pairs(
                (img_BND,), texts, img_idx_N, txt_idx_N
            )
            # Each image has one positive and two negatives: positive_weight=2 balances them.
            weights_N = weights_N * jnp.where(labels_N == 1, self.positive_weight, 1.0)
            fused = apply(m.fuse, img_NSD, txt_NLD, valid_NL)
            logits_N2 = apply(m.itm_logits, fused.pooled_BD)
            terms["itm"] = losses.masked_mean(losses.itm_loss(logits_N2, labels_N), weights_N)
            correct_N = (jnp.argmax(logits_N2, -1) == labels_N).astype(jnp.float32)
            logs["train/itm_accuracy"] = losses.masked_mean(correct_N, weights_N)
        if "mlm" in self.weights:
            inputs_BL, targets_BL, weights_BL = losses.mask_tokens(
                tokens_BL,
                k_mask,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                special_ids=self.special_ids,
                word_ids_BL=self.word_ids(tokens_BL),
            )
            fused = apply(m.fuse, img_BND, apply(m.text_tokens, inputs_BL), valid_BL)
            logits_BLV = apply(m.mlm_logits, fused.text_tokens_BLD)
            terms["mlm"] = losses.mlm_loss(logits_BLV, targets_BL, weights_BL)
        return *weigh(terms, self.weights, logs), state


# Settings added after the first matching runs: a workdir's `config.json` written before them
# (read back by `python -m mmjax.evaluate`) means these values: no swapped negatives, weight 1.
_LATER_SETTINGS = {"positive_weight": 1.0, "swap_prob": 0.0, "swap_vocabulary": "shapes"}


def _setting(config, name: str):
    """`config.matching.<name>` of a setting in `_LATER_SETTINGS`, its "off" value if absent."""
    return config.matching.get(name, _LATER_SETTINGS[name])


def _swap_prob(config) -> float:
    return float(_setting(config, "swap_prob"))


def _changed(attrs: shapes.Attributes, i: int) -> tuple[shapes.Attributes, str]:
    """The attributes of image i with one of them changed (which and to what: fixed by i)."""
    name = _ATTRIBUTES[i % len(_ATTRIBUTES)]
    n = len(_VALUES[name])
    new = (getattr(attrs, name) + 1 + (i // len(_ATTRIBUTES)) % (n - 1)) % n
    return attrs._replace(**{name: new}), name


def _itm_attention(model, images, tokens_BL, valid_BL):
    """MatchingModel method: (ITM logits, the fusion's attention maps)."""
    _, _, img_BND, txt_BLD, _ = model.embed(images, tokens_BL)
    out = model.fuse(img_BND, txt_BLD, valid_BL, return_attention=True)
    return model.itm_logits(out.pooled_BD), out.attention


def _match_line(probs_C) -> str:
    return f"ITM match probability: {probs_C[1]:.3f}"


class MatchingTask(ContrastiveTask):
    name = "matching"
    metric_name = "itm_accuracy"
    supports_microbatches = False
    contrastive_weight_setting = "matching.itc"
    image_text_embeddings = True  # MatchingModel.encode_image / encode_text (its TwoTower)

    def visualizer(self, config):
        return maps.AttentionMaps(_itm_attention, _match_line, config.model.text.pad_id)

    def validate(self, config):
        if int(config.microbatches) > 1:
            raise ConfigError(
                f"microbatches={config.microbatches}: task=matching cannot use GradCache (ITM "
                "draws each example's hard negatives from the whole batch and fuses them, so "
                "its loss does not split into microbatches); set microbatches=1"
            )
        if config.matching.hardness < 0:
            raise ConfigError(f"matching.hardness={config.matching.hardness} must be >= 0")
        if float(_setting(config, "positive_weight")) <= 0:
            raise ConfigError("matching.positive_weight must be > 0")
        swap_prob = _swap_prob(config)
        if not 0 <= swap_prob <= 1:
            raise ConfigError(f"matching.swap_prob={swap_prob} must be in [0, 1]")
        if swap_prob:
            if float(config.matching.itm) <= 0:
                raise ConfigError(
                    f"matching.swap_prob={swap_prob} makes ITM negatives, but matching.itm=0: "
                    "set matching.itm > 0 or matching.swap_prob=0"
                )
            word_swap.vocabulary(_setting(config, "swap_vocabulary"))
        refuse_overrides(config, EVAL_SETTINGS, f"task={self.name} evaluates ITM and MLM")
        super().validate(config)  # every term's weight, and the contrastive settings

    def own_terms(self, config):
        return {k: float(config.matching[k]) for k in ("itm", "mlm")}

    def build_model(self, config, vocab_size):
        two_tower = super().build_model(config, vocab_size)
        return build_matching_model(config, vocab_size, two_tower=two_tower)

    def example_batch(self, config):
        batch = {**super().example_batch(config), "seed": np.zeros((1,), np.uint32)}
        if _swap_prob(config):
            batch |= {"swap_tokens": batch["tokens"], "swap_use": np.zeros((1,), bool)}
        return batch

    def model_inputs(self, batch):
        return batch["image"], batch["tokens"], batch["tokens"] != 0

    def objective(self, model, config, mesh, rules):
        return MatchingObjective(
            self.contrastive_objective(model.two_tower, config, mesh, rules),
            model,
            self.own_terms(config),
            self.tokenizer(config),
            config.model.text.pad_id,
            config.matching.hardness,
            float(_setting(config, "positive_weight")),
        )

    def train_iterator(self, config, process_index, process_count):
        return pipeline.train_batches(
            pipeline.train_source(config.data),
            _CaptionAndSeed(
                self.tokenizer(config),
                config.data,
                _swap_prob(config),
                _setting(config, "swap_vocabulary"),
            ),
            config,
            process_index,
            process_count,
            batch_map=pipeline.normalize_batch,
        )

    def evaluator(self, config, model, batch_sharding):
        return MatchingEvaluator(config, model, batch_sharding, self.tokenizer(config))


class MatchingEvaluator:
    def __init__(self, config, model, sharding, tokenizer):
        val = pipeline.eval_arrays(config.data)
        fields = shapes.Attributes._fields
        if not set(fields) <= set(val):
            raise EvalSpecError(
                f"task=matching evaluates on attribute-labelled data (shapes); "
                f"data.name={config.data.name!r} has fields {sorted(val)}"
            )
        self.config, self.sharding = config, sharding
        n = len(val["image"])
        attrs = [shapes.Attributes(*(int(val[f][i]) for f in fields)) for i in range(n)]
        negatives = [_changed(a, i) for i, a in enumerate(attrs)]
        self.changed = np.array([_ATTRIBUTES.index(name) for _, name in negatives])
        positive = [shapes.canonical_caption(a) for a in attrs]
        negative = [shapes.canonical_caption(a) for a, _ in negatives]
        self.pairs = {
            "image": np.concatenate([val["image"], val["image"]]),
            "tokens": tokenizer.encode(positive + negative),
        }
        self.labels = np.concatenate([np.ones(n, np.int32), np.zeros(n, np.int32)])
        self.masked = None
        if isinstance(tokenizer, tokenizers.ByteTokenizer):
            tokens = self.pairs["tokens"][:n].copy()
            # Byte k of a caption is token k + 1 (after BOS); the colour word follows "a size ".
            self.spans = []
            for i, (a, caption) in enumerate(zip(attrs, positive, strict=True)):
                lo = len(caption.encode()[: caption.index(f" {shapes.COLORS[a.color]} ")]) + 2
                hi = lo + len(shapes.COLORS[a.color].encode())
                self.spans.append((lo, min(hi, tokens.shape[1] - 1)))
                tokens[i, lo : self.spans[-1][1]] = mask_id_of(tokenizer)
            self.masked = {"image": val["image"], "tokens": tokens}
            self.targets = self.pairs["tokens"][:n]
        pad = config.model.text.pad_id

        def fused_stream(params, b):
            def apply(method, *args):  # a BatchNorm tower's running statistics, frozen
                return model.apply(model_state.variables(params), *args, method=method)

            _, _, img_BND, txt_BLD, _ = apply(model.embed, b["image"], b["tokens"])
            fused = apply(model.fuse, img_BND, txt_BLD, b["tokens"] != pad)
            return apply, fused

        def itm(params, b):
            apply, fused = fused_stream(params, b)
            return jnp.argmax(apply(model.itm_logits, fused.pooled_BD), -1)

        def mlm(params, b):
            apply, fused = fused_stream(params, b)
            return jnp.argmax(apply(model.mlm_logits, fused.text_tokens_BLD), -1)

        self._itm, self._mlm = jit_encoder(itm, sharding), jit_encoder(mlm, sharding)

    def __call__(self, params) -> dict:
        bs = self.config.eval.batch_size
        pred = predict_all(self._itm, params, self.pairs, bs, self.sharding)
        correct = pred == self.labels
        n = len(self.changed)
        out = {"matching/itm_accuracy": float(correct.mean())}
        for k, name in enumerate(_ATTRIBUTES):
            out[f"matching/itm_negative_{name}"] = float(correct[n:][self.changed == k].mean())
        if self.masked is not None:
            ids = predict_all(self._mlm, params, self.masked, bs, self.sharding)
            restored = [
                np.array_equal(ids[i, lo:hi], self.targets[i, lo:hi])
                for i, (lo, hi) in enumerate(self.spans)
            ]
            out["matching/mlm_color"] = float(np.mean(restored))
        return {**out, **headline(correct.mean(), 0.5)}


TASK = MatchingTask()
