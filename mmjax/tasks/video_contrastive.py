"""Video–text contrastive training on the built-in moving-shapes clips, and what the video tasks
share: the clip splits, the video tower built from the config, and their validation.

video_contrastive: a `VideoTower` and the text tower trained with the two-tower contrastive loss
(`config.loss`, over the global batch) on the clips' captions, one drawn per step as for images
(the canonical caption with probability `data.first_caption_prob`, else one of the others).
Evaluated on the validation clips:

  retrieval/{v2t,t2v}/r{1,5}  video→text and text→video recall with the canonical captions
                              (equal caption texts are one item, as in `multi_caption_recall`);
  zeroshot/direction/top1     the direction (8 classes) from prompt ensembles ("a shape moving
                              to the left", ...): the headline, `task/score`. `task/chance` is
                              the majority-class rate of the validation directions (the
                              validation split cycles through them, so 1/8 when num_val is a
                              multiple of 8);
  zeroshot/{color,shape}/top1 the same for colour and shape: a tower that ignores time reaches
                              these but stays at chance on the direction.

Clips come from `mmjax.data.builtin.clips` (generated in memory, a function of
(data.dataset_seed, split, index) only). Batches hold the clips under "image" (float32
[B, F, S, S, 3], normalised like images), since the two-tower model and the fusion classifier
take any tower in their image slot.
"""

from __future__ import annotations

import grain
import numpy as np

from mmjax.data import pipeline, sources
from mmjax.data.builtin import clips, moving_shapes
from mmjax.errors import ConfigError
from mmjax.eval import retrieval, zeroshot
from mmjax.eval.embed import Embedder
from mmjax.models.video import KINDS, build_video_tower
from mmjax.tasks.contrastive import EVAL_SETTINGS, ContrastiveTask
from mmjax.train.task import headline
from mmjax.train.validate import refuse_overrides

# Zero-shot prompts: (class names, templates). Every template puts "a" before a word that is
# not the class name, so no class needs "an" (e.g. "an orange", "an up-left").
ZEROSHOT = {
    "direction": (
        moving_shapes.DIRECTION_PHRASES,
        ("a shape moving {}", "an object moving {}", "something moving {}"),
    ),
    "color": (moving_shapes.COLORS, ("a moving {} shape", "the {} shape")),
    "shape": (moving_shapes.SHAPES, ("a moving {}", "the {}")),
}


def validate_video(config, task: str) -> None:
    """ConfigError for settings the video tower or the moving-shapes data cannot run with."""
    v = config.video
    sources.require(config.data, "clips", task)
    if v.kind not in KINDS:
        raise ConfigError(f"video.kind={v.kind!r} is unknown; use one of {', '.join(KINDS)}")
    if v.frames < 2:
        raise ConfigError(f"video.frames={v.frames}: motion needs at least 2 frames")
    if v.kind == "tubelet" and v.tubelet_size < 1:  # before it divides below
        raise ConfigError(f"video.tubelet_size={v.tubelet_size} must be a positive integer")
    if v.kind == "tubelet" and v.frames % v.tubelet_size:
        raise ConfigError(
            f"video.frames={v.frames} is not divisible by video.tubelet_size={v.tubelet_size}"
        )
    if config.data.image_size < 16:
        raise ConfigError(f"data.image_size={config.data.image_size} must be >= 16 for clips")
    if tuple(config.model.image.stem_channels):
        raise ConfigError("model.image.stem_channels: the video tower has no conv stem; use ()")


def example_clips(config) -> np.ndarray:
    size = config.data.image_size
    return np.zeros((1, config.video.frames, size, size, 3), np.float32)


class _PickCaption(grain.transforms.RandomMap):
    """One caption per clip and step, chosen as `pipeline.DecodeAndPickCaption` chooses."""

    def __init__(self, tokenizer, first_caption_prob: float):
        self._tokenizer = tokenizer
        self._first_prob = first_caption_prob

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        captions = element["captions"]
        # Always draw both numbers, so the stream of choices does not depend on the outcome.
        use_first = rng.random() < self._first_prob
        other = 1 + rng.integers(len(captions) - 1)
        text = captions[0 if use_first else other]
        return {"image": element["frames"], "tokens": self._tokenizer.encode([text])[0]}


class VideoContrastiveTask(ContrastiveTask):
    name = "video_contrastive"
    metric_name = "zeroshot_direction_top1"
    image_text_embeddings = False  # its image tower reads clips: no image evaluation
    visualizer = None  # the two-tower maps are drawn on one image, not a clip
    draws_captions = False  # its own _PickCaption, over clips

    def validate(self, config):
        refuse_overrides(config, EVAL_SETTINGS, f"task={self.name} evaluates on its clips")
        super().validate(config)  # the objective's weights and settings
        validate_video(config, self.name)

    def two_tower(self, config, vocab_size):
        # The image recipe's two-tower model (projections, loss-specific temperature and bias
        # initialisation) with the video tower in the ViT's place; so the objective's parts
        # come as for images, and a distillation teacher (a video_contrastive run) is one too.
        return super().two_tower(config, vocab_size).clone(image=build_video_tower(config))

    def example_batch(self, config):
        return {
            "image": example_clips(config),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
        }

    def train_iterator(self, config, process_index, process_count):
        return pipeline.train_batches(
            clips.clips_of(config, "train"),
            _PickCaption(self.tokenizer(config), config.data.first_caption_prob),
            config,
            process_index,
            process_count,
            batch_map=pipeline.normalize_batch,
        )

    def evaluator(self, config, model, batch_sharding):
        val = clips.clips_of(config, "validation")
        embedder = Embedder(config, model, batch_sharding)
        videos = clips.NormalizedClips(val.frames)
        canonical = [c[0] for c in val.captions]
        # Clips with the same canonical caption (the split repeats every 384) share the text.
        _, text_id_N = np.unique(canonical, return_inverse=True)
        directions_N = val.labels("direction")
        chance = np.bincount(directions_N).max() / len(val)

        def evaluate(params) -> dict:
            video_NE = embedder.images(params, videos)
            caption_NE = embedder.texts(params, canonical)
            recall = retrieval.multi_caption_recall(
                video_NE, caption_NE, np.arange(len(val)), text_id_N.reshape(-1), ks=(1, 5)
            )
            out = {}
            for k in (1, 5):
                out[f"retrieval/v2t/r{k}"] = recall[f"i2t_r{k}"]
                out[f"retrieval/t2v/r{k}"] = recall[f"t2i_r{k}"]
            for attribute, (names, templates) in ZEROSHOT.items():
                prompt_PE = embedder.texts(params, zeroshot.prompts(list(names), list(templates)))
                class_CE = zeroshot.class_embeddings(
                    prompt_PE.reshape(len(names), len(templates), -1)
                )
                out[f"zeroshot/{attribute}/top1"] = zeroshot.topk_accuracy(
                    video_NE, class_CE, val.labels(attribute), 1
                )
            return {**out, **headline(out["zeroshot/direction/top1"], chance)}

        return evaluate


TASK = VideoContrastiveTask()
