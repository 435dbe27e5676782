"""Image + text -> label through a fusion module: multimodal classification (`shapes_mmc`) and
VQA as answer classification (`shapes_vqa`); datasets in `mmjax.data.builtin.labelled`.

Reported: `classification/accuracy`, per group (`classification/accuracy_<group>`: language or
question type), and `task/score` (accuracy) next to `task/chance`, the accuracy of a blind
baseline that answers each group's most frequent training label (see `labelled.prior_accuracy`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from mmjax import model_state
from mmjax.data import pipeline, preprocess, sources
from mmjax.data.builtin import labelled
from mmjax.errors import ConfigError
from mmjax.eval import maps
from mmjax.eval.embed import class_predictor
from mmjax.models.fusion import ATTENTION_FUSIONS
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.models.two_tower import validate_towers
from mmjax.tasks.weights import hf_text_tower
from mmjax.train.task import Task, headline


class ClassificationObjective:
    """Mean softmax cross-entropy of the fused logits over the global batch."""

    def __init__(self, model, inputs: tuple[str, ...] = ("image", "tokens")):
        self.model = model
        self.inputs = inputs  # the batch fields the model takes, in order

    def __call__(self, params: dict, batch: dict, step=None):
        loss, logs, _ = self.with_state(params, {}, batch, step)
        return loss, logs

    def with_state(self, params: dict, state: dict, batch: dict, step=None):
        """(loss, logs, new state) of a model with state (BatchNorm: `mmjax.model_state`)."""
        inputs = (batch[k] for k in self.inputs)
        logits_BC, state = model_state.apply_training(self.model.apply, params, state, *inputs)
        labels_B = batch["label"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B))
        accuracy = jnp.mean(jnp.argmax(logits_BC, axis=-1) == labels_B)
        return loss, {"train/accuracy": accuracy}, state


def accuracy_by_group(prefix: str, correct, groups, group_names) -> dict[str, float]:
    """`<prefix>/accuracy` overall and `<prefix>/accuracy_<group>` for each group present."""
    out = {f"{prefix}/accuracy": float(np.mean(correct))}
    for g, name in enumerate(group_names):
        if np.any(groups == g):
            out[f"{prefix}/accuracy_{name}"] = float(np.mean(correct[groups == g]))
    return out


def _fused_attention(model, images, tokens_BL, valid_BL):
    """FusionClassifier method: (logits_BC, attention maps)."""
    return model(images, tokens_BL, return_attention=True)


class ClassificationTask(Task):
    name = "classification"
    metric_name = "accuracy"

    def validate(self, config):
        sources.require(config.data, "labelled", self.name)
        validate_towers(config)

    def build_model(self, config, vocab_size):
        num_classes = len(labelled.split_of(config.data, "validation").classes)
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

    def visualizer(self, config):
        kind = config.model.fusion.kind
        if kind not in ATTENTION_FUSIONS:
            raise ConfigError(
                f"model.fusion.kind={kind!r} has no text-to-image attention maps; visualize "
                f"needs a fusion among {', '.join(ATTENTION_FUSIONS)} (train with "
                "--config.model.fusion.kind=cross_attention)"
            )
        classes = labelled.split_of(config.data, "validation").classes  # cached: the model's

        def top3(probs_C):
            top = np.argsort(-probs_C)[:3]
            return "top-3: " + ", ".join(f"{classes[i]} {probs_C[i]:.3f}" for i in top)

        return maps.AttentionMaps(_fused_attention, top3, config.model.text.pad_id)

    def train_iterator(self, config, process_index, process_count):
        return pipeline.train_batches(
            labelled.split_of(config.data, "train"),
            pipeline.TokenizeText(self.tokenizer(config), image="image", label="label"),
            config,
            process_index,
            process_count,
            batch_map=pipeline.normalize_batch,
        )

    def evaluator(self, config, model, batch_sharding):
        train = labelled.split_of(config.data, "train")
        val = labelled.split_of(config.data, "validation")
        chance = labelled.prior_accuracy(train, val)
        inputs = {
            "image": preprocess.normalize(val.images),
            "tokens": self.tokenizer(config).encode(list(val.texts)),
        }
        predict = class_predictor(model, inputs, config.eval.batch_size, batch_sharding)

        def evaluate(params) -> dict:
            correct = predict(params) == val.labels
            out = accuracy_by_group("classification", correct, val.groups, val.group_names)
            return {**out, **headline(correct.mean(), chance)}

        return evaluate


TASK = ClassificationTask()
