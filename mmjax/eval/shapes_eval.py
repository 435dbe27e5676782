"""Evaluation on the built-in `shapes` validation split.

Zero-shot classification of shape and colour from prompt ensembles, reported separately for
(shape, colour) compositions seen in training and for the held-out ones, and image↔text retrieval.
"""

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from mmjax import model_state
from mmjax.data import pipeline
from mmjax.data.builtin import shapes
from mmjax.eval import embed, retrieval, zeroshot


class ShapesEvaluator:
    """Loads the validation split once; `__call__(params)` returns a dict of metrics."""

    def __init__(
        self, config: ml_collections.ConfigDict, model: nn.Module, sharding: NamedSharding
    ):
        self._arrays = pipeline.eval_arrays(config.data, "validation")
        self._batch_size = config.eval.batch_size
        self._sharding = sharding
        tokenizer = pipeline.tokenizer_for(config.data)
        self._prompt_tokens = {}
        for prefix, prompt_sets in (
            ("zeroshot", shapes.ZEROSHOT),
            ("zeroshot_paraphrase", shapes.ZEROSHOT_PARAPHRASE),
        ):
            for attribute, (classnames, templates) in prompt_sets.items():
                texts = zeroshot.prompts(list(classnames), list(templates))
                self._prompt_tokens[f"{prefix}/{attribute}"] = (
                    attribute,
                    len(classnames),
                    len(templates),
                    tokenizer.encode(texts),
                )
        self._encode_image = embed.jit_encoder(
            lambda p, x: model.apply(model_state.variables(p), x, method=model.encode_image),
            sharding,
        )
        self._encode_text = embed.jit_encoder(
            lambda p, x: model.apply(model_state.variables(p), x, method=model.encode_text),
            sharding,
        )

    @property
    def num_examples(self) -> int:
        return len(self._arrays["image"])

    def _embed(self, fn, params, inputs: np.ndarray) -> np.ndarray:
        return embed.embed_all(fn, params, inputs, self._batch_size, self._sharding)

    def __call__(self, params) -> dict[str, float]:
        a = self._arrays
        img_NE = self._embed(self._encode_image, params, a["image"])
        txt_NE = self._embed(self._encode_text, params, a["tokens"])
        metrics = retrieval.retrieval_metrics(img_NE, txt_NE)
        heldout_N = a["heldout"].astype(bool)
        for name_prefix, (
            attribute,
            num_classes,
            num_templates,
            tokens,
        ) in self._prompt_tokens.items():
            prompt_emb = self._embed(self._encode_text, params, tokens)
            class_CE = zeroshot.class_embeddings(prompt_emb.reshape(num_classes, num_templates, -1))
            labels_N = a[attribute]
            for name, mask in (("all", slice(None)), ("seen", ~heldout_N), ("heldout", heldout_N)):
                acc = zeroshot.topk_accuracy(img_NE[mask], class_CE, labels_N[mask], k=1)
                metrics[f"{name_prefix}/top1_{name}"] = acc
        return metrics
