"""Video QA as answer classification on the built-in moving-shapes clips: clip + question -> one
of `moving_shapes.ANSWERS` (directions, colours, shapes, yes/no).

The model is the classification task's fusion classifier with the video tower in place of the
ViT, trained with its softmax cross-entropy (`ClassificationObjective`). Every question that
`moving_shapes.video_qa` asks about a clip is one example: 4 per clip, 7 when the clip has a
still distractor (`QUESTION_TYPES`, in the order `video_qa` asks them). Clips come from
`mmjax.tasks.video_contrastive` (same cache); the questions of clip i are a function of
(seed, split, i).

Reported: `video_qa/accuracy`, per question type `video_qa/accuracy_<type>` next to its blind
baseline `video_qa/chance_<type>`, and `task/score` (accuracy) next to `task/chance`: the
accuracy of answering each question type with its most frequent training answer
(`labelled.prior_accuracy`, as for image VQA), i.e. what the question alone gives away. It is
well above 1/24: "is the <still shape> moving?" is always "no", and the yes/no direction
question is half "yes".
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax.numpy as jnp
import numpy as np

from mmjax.data import pipeline, tokenizers
from mmjax.data.builtin import labelled, moving_shapes
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.tasks import video_contrastive as video
from mmjax.tasks.classification import ClassificationTask, accuracy_by_group
from mmjax.train.task import headline

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
class QASplit:
    """Every (clip, question, answer) of some clips; a grain source. `labels` index ANSWERS and
    `groups` QUESTION_TYPES (what `labelled.prior_accuracy` reads)."""

    clips: video.Clips
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


@functools.lru_cache(maxsize=4)
def load_qa(split: str, num: int, image_size: int, num_frames: int, seed: int) -> QASplit:
    """The questions about clips 0 .. num-1 of `split` (see `video.load_clips`)."""
    clips = video.load_clips(split, num, image_size, num_frames, seed)
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


def qa_of(config, split: str) -> QASplit:
    d = config.data
    num = d.num_train if split == "train" else d.num_val
    return load_qa(split, num, d.image_size, config.video.frames, d.dataset_seed)


class _TokenizeQuestion(grain.transforms.Map):
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def map(self, element: dict) -> dict:
        tokens = tokenizers.token_ids(self._tokenizer, [element["text"]])[0]
        return {"image": element["frames"], "tokens": tokens, "label": element["label"]}


class VideoQATask(ClassificationTask):
    """`ClassificationTask` with clips: its objective and model inputs are reused as they are."""

    name = "video_qa"
    metric_name = "accuracy"

    def validate(self, config):
        video.validate_video(config, self.name)

    def build_model(self, config, vocab_size):
        return build_fusion_classifier(
            config, vocab_size, len(moving_shapes.ANSWERS), image=video.build_video_tower(config)
        )

    def example_batch(self, config):
        return {
            "image": video.example_clips(config),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
            "label": np.zeros((1,), np.int32),
        }

    def train_iterator(self, config, process_index, process_count):
        ds = pipeline.batched_stream(
            qa_of(config, "train"),
            _TokenizeQuestion(self.tokenizer(config)),
            seed=config.seed,
            global_batch_size=config.batch_size,
            process_index=process_index,
            process_count=process_count,
            batch_map=pipeline.normalize_batch,
        )
        return pipeline.iterate(ds)

    def evaluator(self, config, model, batch_sharding):
        train, val = qa_of(config, "train"), qa_of(config, "validation")
        blind = {"task": labelled.prior_accuracy(train, val)}
        for g, kind in enumerate(QUESTION_TYPES):
            if np.any(val.groups == g):
                blind[kind] = labelled.prior_accuracy(train, val.where(val.groups == g))
        inputs = {
            "image": video.NormalizedClips(val.clips.frames, val.clip_of),
            "tokens": tokenizers.token_ids(self.tokenizer(config), list(val.texts)),
        }
        predict = jit_encoder(
            lambda p, b: jnp.argmax(model.apply({"params": p}, b["image"], b["tokens"]), -1),
            batch_sharding,
        )

        def evaluate(params) -> dict:
            pred = predict_all(predict, params, inputs, config.eval.batch_size, batch_sharding)
            correct = pred == val.labels
            out = accuracy_by_group("video_qa", correct, val.groups, QUESTION_TYPES)
            out.update({f"video_qa/chance_{k}": v for k, v in blind.items() if k != "task"})
            return {**out, **headline(correct.mean(), blind["task"])}

        return evaluate


TASK = VideoQATask()
