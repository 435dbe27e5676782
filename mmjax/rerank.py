"""Reranking generated images with a run whose model embeds images and texts (DALL-E's CLIP
reranking): the cosine similarity of each image and each prompt under that model.

The run is loaded as `python -m mmjax.evaluate` and `python -m mmjax.visualize` load one (its
config.json and newest checkpoint, on a one-device mesh); images are seen in its evaluation
view (resized and center-cropped to its `data.image_size`, normalised).
"""

from __future__ import annotations

import numpy as np

from mmjax.data import preprocess
from mmjax.eval.embed import Embedder
from mmjax.evaluate import UsageError, _open_checkpoint, load_config
from mmjax.parallel import batch_sharding
from mmjax.tasks import get_task
from mmjax.visualize import build_run


def open_reranker(workdir: str):
    """(workdir, config, checkpoint, step) of a run that can rerank; UsageError otherwise (no
    model is built)."""
    config, kind = load_config(workdir)
    if kind != "train":
        raise UsageError(f"--rerank-with {workdir}: give a training workdir")
    if not get_task(config.task).image_text_embeddings:
        raise UsageError(
            f"--rerank-with {workdir} is a task={config.task!r} run, whose model does not embed "
            "images and texts; give a contrastive run (e.g. the default python train.py workdir)"
        )
    ckpt, step = _open_checkpoint(workdir, None)
    return workdir, config, ckpt, step


class Reranker:
    def __init__(self, workdir: str, config, ckpt, step: int):
        self.workdir = workdir
        self.run = build_run(workdir, config, ckpt, step)
        ckpt.close()
        with self.run.context():
            self._embedder = Embedder(
                self.run.config, self.run.model, batch_sharding(self.run.mesh, self.run.rules)
            )

    def scores(self, images_MSS3: np.ndarray, prompts: list[str]) -> np.ndarray:
        """float32 [M, P]: cosine similarity of every image (uint8) with every prompt."""
        size = int(self.run.config.data.image_size)
        views = [preprocess.resize_center_crop(image, size) for image in images_MSS3]
        with self.run.context():
            img_ME = self._embedder.images(self.run.params, preprocess.normalize(np.stack(views)))
            txt_PE = self._embedder.texts(self.run.params, prompts)
        return img_ME @ txt_PE.T
