"""The built-in `moving_shapes` clips as in-memory splits: clips with their captions (video–text
contrastive training) and every question about them (video QA).

Clips are generated in memory (`moving_shapes.generate_clip`, about 0.6 ms per 32×32 clip of 8
frames on one core), each a function of (dataset seed, split, index) only, so clip i is the
same whatever the number of clips asked for; the questions of clip i are a function of
(seed, split, i) too.

Only the split loaded last stays cached per process (`load_clips`): video QA reads its training
clips twice per run (the training stream and the blind baseline), which the cache saves (1.3 s
for its 3,000 clips of 4 frames), while a larger cache would keep splits alive after their run
(video_contrastive's 10,000 training clips of 8 frames are 246 MB).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np

from mmjax.data import preprocess, sources
from mmjax.data.builtin import moving_shapes

# What the questions of one clip ask, in the order `moving_shapes.video_qa` asks them: 4 per
# clip, 7 when the clip has a still distractor.
QUESTION_TYPES = (
    "direction",
    "color",
    "shape",
    "direction_yes_no",
    "still_color",
    "still_shape",
    "still_moving",
)


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


@functools.lru_cache(maxsize=1)
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


def clips_of(config: ml_collections.ConfigDict, split: str) -> Clips:
    """The clips of `split` a run of `config` reads (`data.*`, `video.frames`)."""
    d = config.data
    num = sources.split_size(d, split)
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


@dataclasses.dataclass(frozen=True)
class QASplit:
    """Every (clip, question, answer) of some clips; a grain source. `labels` index
    `moving_shapes.ANSWERS` and `groups` QUESTION_TYPES (what `labelled.prior_accuracy` reads)."""

    clips: Clips
    clip_of: np.ndarray  # int32 [m]: the clip each question is about
    texts: tuple[str, ...]
    labels: np.ndarray  # int32 [m]
    groups: np.ndarray  # int32 [m]
    group_names: tuple[str, ...] = QUESTION_TYPES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        frames = self.clips.frames[self.clip_of[i]]
        return {"frames": frames, "text": self.texts[i], "label": self.labels[i]}

    def where(self, keep: np.ndarray) -> QASplit:
        """The questions where `keep` (bool [m]) is true, about the same clips."""
        texts = tuple(t for t, k in zip(self.texts, keep, strict=True) if k)
        return dataclasses.replace(
            self,
            clip_of=self.clip_of[keep],
            texts=texts,
            labels=self.labels[keep],
            groups=self.groups[keep],
        )


def load_qa(split: str, num: int, image_size: int, num_frames: int, seed: int) -> QASplit:
    """The questions about clips 0 .. num-1 of `split` (see `load_clips`). Not cached: asking
    is 0.1 s per 3,000 clips, and the clips come from `load_clips`' cache."""
    clips = load_clips(split, num, image_size, num_frames, seed)
    clip_of, texts, labels, groups = [], [], [], []
    for i, attrs in enumerate(clips.attributes):
        # Its own generator (a 4-element seed, unlike the clip's 3-element one), so the
        # questions never change the clip and depend on (seed, split, i) only.
        rng = np.random.default_rng([seed, moving_shapes.SPLITS.index(split), i, 1])
        qa = moving_shapes.video_qa(attrs, rng)
        if len(qa) not in (4, len(QUESTION_TYPES)):  # the types are read from the order
            raise ValueError(f"moving_shapes.video_qa asked {len(qa)} questions; expected 4 or 7")
        for kind, (question, answer) in enumerate(qa):
            clip_of.append(i)
            texts.append(question)
            labels.append(moving_shapes.ANSWERS.index(answer))
            groups.append(kind)
    return QASplit(
        clips,
        np.array(clip_of, np.int32),
        tuple(texts),
        np.array(labels, np.int32),
        np.array(groups, np.int32),
    )


def qa_of(config: ml_collections.ConfigDict, split: str) -> QASplit:
    """The questions of `split` a run of `config` reads (`data.*`, `video.frames`)."""
    d = config.data
    num = sources.split_size(d, split)
    return load_qa(split, num, d.image_size, config.video.frames, d.dataset_seed)
