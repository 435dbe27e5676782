"""Two-tower contrastive pretraining (CLIP softmax / SigLIP sigmoid / LiT) on image–caption data."""

from __future__ import annotations

import numpy as np

from mmjax import parallel
from mmjax.data import pipeline
from mmjax.eval.tasks import build_evaluator
from mmjax.models.two_tower import build_two_tower
from mmjax.tasks.base import Task
from mmjax.train import step as train_step


class ContrastiveTask(Task):
    name = "contrastive"
    supports_microbatches = True

    def build_model(self, config, vocab_size):
        return build_two_tower(config, vocab_size)

    def example_batch(self, config):
        size = config.data.image_size
        return {
            "image": np.zeros((1, size, size, 3), np.float32),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
        }

    def model_inputs(self, batch):
        return batch["image"], batch["tokens"]

    def objective(self, model, config, mesh, rules):
        return train_step.ContrastiveObjective(
            model, config.loss, config.loss_impl, mesh, parallel.batch_axes(rules)
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
