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

Clips are generated in memory (`moving_shapes.generate_clip`, about 0.6 ms per 32×32 clip of 8
frames on one core: 1.2 s for 2,000), each a function of (data.dataset_seed, split, index) only,
and cached per process per (split, number, size, frames, seed). Batches hold the clips under
"image" (float32 [B, F, S, S, 3], normalised like images), since the two-tower model and the
fusion classifier take any tower in their image slot.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax.numpy as jnp
import numpy as np

from mmjax.data import pipeline, preprocess, tokenizers
from mmjax.data.builtin import moving_shapes
from mmjax.eval import retrieval, zeroshot
from mmjax.eval.embed import Embedder
from mmjax.models.video import KINDS, VideoTower
from mmjax.tasks.contrastive import EVAL_SETTINGS, ContrastiveTask
from mmjax.train.task import headline
from mmjax.train.validate import refuse_overrides

DATASET = "moving_shapes"

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


@dataclasses.dataclass(frozen=True)
class Clips:
    """The first `len` clips of a split; a grain source (len + getitem)."""

    frames: np.ndarray  # uint8 [n, F, S, S, 3]
    captions: tuple[tuple[str, ...], ...]  # per clip, the canonical caption first
    attributes: tuple[moving_shapes.MotionAttributes, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        return {"frames": self.frames[i], "captions": self.captions[i]}

    def labels(self, attribute: str) -> np.ndarray:
        """int32 [n]: each clip's class index of `attribute` (direction, color or shape)."""
        return np.array([getattr(a, attribute) for a in self.attributes], np.int32)


@functools.lru_cache(maxsize=4)
def load_clips(split: str, num: int, image_size: int, num_frames: int, seed: int) -> Clips:
    """Clips 0 .. num-1 of `split`; clip i is the same whatever `num` (a prefix property)."""
    frames = np.empty((num, num_frames, image_size, image_size, 3), np.uint8)
    captions, attributes = [], []
    for i in range(num):
        frames[i], caps, attrs = moving_shapes.generate_clip(
            split, i, num_frames=num_frames, image_size=image_size, seed=seed
        )
        captions.append(tuple(caps))
        attributes.append(attrs)
    return Clips(frames, tuple(captions), tuple(attributes))


def clips_of(config, split: str) -> Clips:
    d = config.data
    num = d.num_train if split == "train" else d.num_val
    return load_clips(split, num, d.image_size, config.video.frames, d.dataset_seed)


class NormalizedClips:
    """float32 normalised clips `frames[rows]`, made per slice as `predict_all` reads them, so a
    split never exists whole in float32 (4× its uint8 size, and QA repeats each clip ~5×)."""

    def __init__(self, frames: np.ndarray, rows: np.ndarray | None = None):
        self._frames = frames
        self._rows = np.arange(len(frames)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: slice) -> np.ndarray:
        return preprocess.normalize(self._frames[self._rows[key]])


def validate_video(config, task: str) -> None:
    """ConfigError for settings the video tower or the moving-shapes data cannot run with."""
    from mmjax.errors import ConfigError

    v = config.video
    if config.data.name != DATASET:
        raise ConfigError(f"task={task} trains on data.name={DATASET!r}, got {config.data.name!r}")
    if v.kind not in KINDS:
        raise ConfigError(f"video.kind={v.kind!r} is unknown; use one of {', '.join(KINDS)}")
    if v.frames < 2:
        raise ConfigError(f"video.frames={v.frames}: motion needs at least 2 frames")
    if v.kind == "tubelet" and v.frames % v.tubelet_size:
        raise ConfigError(
            f"video.frames={v.frames} is not divisible by video.tubelet_size={v.tubelet_size}"
        )
    if config.data.image_size < 16:
        raise ConfigError(f"data.image_size={config.data.image_size} must be >= 16 for clips")
    if tuple(config.model.image.stem_channels):
        raise ConfigError("model.image.stem_channels: the video tower has no conv stem; use ()")


def build_video_tower(config) -> VideoTower:
    """Spatial settings from `config.model.image` (the per-frame ViT of a factorized tower is
    exactly the image tower), temporal ones from `config.video`."""
    m, v = config.model, config.video
    return VideoTower(
        kind=v.kind,
        patch_size=m.image.patch_size,
        width=m.image.width,
        depth=m.image.depth,
        num_heads=m.image.num_heads,
        mlp_dim=m.image.mlp_dim,
        pool=v.pool,
        tubelet_size=v.tubelet_size,
        temporal_depth=v.temporal_depth,
        frame_pool=m.image.pool,
        frame_posemb=m.image.posemb,
        time_posemb=v.time_posemb,
        posemb=v.tubelet_posemb,
        patch_bias=m.image.patch_bias,
        pre_norm=m.image.pre_norm,
        dtype=jnp.dtype(config.dtype),
        remat=m.remat,
        scan_layers=m.scan_layers,
        activation=m.activation,
    )


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
        tokens = tokenizers.token_ids(self._tokenizer, [text])[0]
        return {"image": element["frames"], "tokens": tokens}


class VideoContrastiveTask(ContrastiveTask):
    name = "video_contrastive"
    metric_name = "zeroshot_direction_top1"

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
        ds = pipeline.batched_stream(
            clips_of(config, "train"),
            _PickCaption(self.tokenizer(config), config.data.first_caption_prob),
            seed=config.seed,
            global_batch_size=config.batch_size,
            process_index=process_index,
            process_count=process_count,
            batch_map=pipeline.normalize_batch,
        )
        return pipeline.iterate(ds)

    def evaluator(self, config, model, batch_sharding):
        val = clips_of(config, "validation")
        embedder = Embedder(config, model, batch_sharding)
        clips = NormalizedClips(val.frames)
        canonical = [c[0] for c in val.captions]
        # Clips with the same canonical caption (the split repeats every 384) share the text.
        _, text_id_N = np.unique(canonical, return_inverse=True)
        directions_N = val.labels("direction")
        chance = np.bincount(directions_N).max() / len(val)

        def evaluate(params) -> dict:
            video_NE = embedder.images(params, clips)
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
