"""Image + text -> label through a fusion module: multimodal classification (`shapes_mmc`) and
VQA as answer classification (`shapes_vqa`); datasets in `mmjax.data.builtin.labelled`.

Reported: `classification/accuracy`, per group (`classification/accuracy_<group>`: language or
question type), and `task/score` (accuracy) next to `task/chance`, the accuracy of a blind
baseline that answers each group's most frequent training label (see `labelled.prior_accuracy`).
"""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data import pipeline, preprocess, tokenizers
from mmjax.data.builtin import labelled
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.tasks.weights import hf_text_tower
from mmjax.train.task import Task, headline


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def map(self, element: dict) -> dict:
        tokens = tokenizers.token_ids(self._tokenizer, [element["text"]])[0]
        return {"image": element["image"], "tokens": tokens, "label": element["label"]}


def _normalize(batch: dict) -> dict:
    return {**batch, "image": preprocess.normalize(batch["image"])}


class ClassificationObjective:
    """Mean softmax cross-entropy of the fused logits over the global batch."""

    def __init__(self, model, inputs: tuple[str, ...] = ("image", "tokens")):
        self.model = model
        self.inputs = inputs  # the batch fields the model takes, in order

    def __call__(self, params: dict, batch: dict, step=None):
        logits_BC = self.model.apply({"params": params}, *(batch[k] for k in self.inputs))
        labels_B = batch["label"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B))
        accuracy = jnp.mean(jnp.argmax(logits_BC, axis=-1) == labels_B)
        return loss, {"train/accuracy": accuracy}


def accuracy_by_group(prefix: str, correct, groups, group_names) -> dict[str, float]:
    """`<prefix>/accuracy` overall and `<prefix>/accuracy_<group>` for each group present."""
    out = {f"{prefix}/accuracy": float(np.mean(correct))}
    for g, name in enumerate(group_names):
        if np.any(groups == g):
            out[f"{prefix}/accuracy_{name}"] = float(np.mean(correct[groups == g]))
    return out


def split_of(config, split: str) -> labelled.LabelledSplit:
    d = config.data
    num = d.num_train if split == "train" else d.num_val
    return labelled.load(d.name, split, num, d.image_size, d.dataset_seed)


class ClassificationTask(Task):
    name = "classification"
    metric_name = "accuracy"

    def validate(self, config):
        from mmjax.errors import ConfigError

        if config.data.name not in labelled.DATASETS:
            raise ConfigError(
                f"task=classification needs data.name in {labelled.DATASETS}, got "
                f"{config.data.name!r}"
            )

    def build_model(self, config, vocab_size):
        num_classes = len(split_of(config, "validation").classes)
        return build_fusion_classifier(config, vocab_size, num_classes)

    def example_batch(self, config):
        size = config.data.image_size
        return {
            "image": np.zeros((1, size, size, 3), np.float32),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
            "label": np.zeros((1,), np.int32),
        }

    def model_inputs(self, batch):
        return batch["image"], batch["tokens"]

    def pretrained(self, config, abstract_params):
        return super().pretrained(config, abstract_params) + hf_text_tower(config)

    def objective(self, model, config, mesh, rules):
        return ClassificationObjective(model)

    def train_iterator(self, config, process_index, process_count):
        ds = pipeline.batched_stream(
            split_of(config, "train"),
            _Tokenize(self.tokenizer(config)),
            seed=config.seed,
            global_batch_size=config.batch_size,
            process_index=process_index,
            process_count=process_count,
            batch_map=_normalize,
        )
        return pipeline.iterate(ds)

    def evaluator(self, config, model, batch_sharding):
        train, val = split_of(config, "train"), split_of(config, "validation")
        chance = labelled.prior_accuracy(train, val)
        inputs = {
            "image": preprocess.normalize(val.images),
            "tokens": tokenizers.token_ids(self.tokenizer(config), list(val.texts)),
        }
        predict = jit_encoder(
            lambda p, b: jnp.argmax(model.apply({"params": p}, b["image"], b["tokens"]), -1),
            batch_sharding,
        )

        def evaluate(params) -> dict:
            pred = predict_all(predict, params, inputs, config.eval.batch_size, batch_sharding)
            correct = pred == val.labels
            out = accuracy_by_group("classification", correct, val.groups, val.group_names)
            return {**out, **headline(correct.mean(), chance)}

        return evaluate


TASK = ClassificationTask()
