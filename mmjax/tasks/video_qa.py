"""Video QA as answer classification on the built-in moving-shapes clips: clip + question -> one
of `moving_shapes.ANSWERS` (directions, colours, shapes, yes/no).

The model is the classification task's fusion classifier with the video tower in place of the
ViT, trained with its softmax cross-entropy (`ClassificationObjective`). Every question that
`moving_shapes.video_qa` asks about a clip is one example: 4 per clip, 7 when the clip has a
still distractor (`clips.QUESTION_TYPES`); the questions and their clips come from
`mmjax.data.builtin.clips`.

Reported: `video_qa/accuracy`, per question type `video_qa/accuracy_<type>` next to its blind
baseline `video_qa/chance_<type>`, and `task/score` (accuracy) next to `task/chance`: the
accuracy of answering each question type with its most frequent training answer
(`labelled.prior_accuracy`, as for image VQA), i.e. what the question alone gives away. It is
well above 1/24: "is the <still shape> moving?" is always "no", and the yes/no direction
question is half "yes".
"""

from __future__ import annotations

import numpy as np

from mmjax.data import pipeline
from mmjax.data.builtin import clips, labelled, moving_shapes
from mmjax.eval.embed import class_predictor
from mmjax.models.fusion_classifier import build_fusion_classifier
from mmjax.models.two_tower import validate_towers
from mmjax.models.video import build_video_tower
from mmjax.tasks import video_contrastive as video
from mmjax.tasks.classification import ClassificationTask, accuracy_by_group
from mmjax.train.task import headline


class VideoQATask(ClassificationTask):
    """`ClassificationTask` with clips: its objective and model inputs are reused as they are."""

    name = "video_qa"
    metric_name = "accuracy"
    visualizer = None  # the classification maps are drawn on one image, not a clip

    def validate(self, config):
        validate_towers(config)
        video.validate_video(config, self.name)

    def build_model(self, config, vocab_size):
        return build_fusion_classifier(
            config, vocab_size, len(moving_shapes.ANSWERS), image=build_video_tower(config)
        )

    def example_batch(self, config):
        return {
            "image": video.example_clips(config),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
            "label": np.zeros((1,), np.int32),
        }

    def train_iterator(self, config, process_index, process_count):
        return pipeline.train_batches(
            clips.qa_of(config, "train"),
            pipeline.TokenizeText(self.tokenizer(config), image="frames", label="label"),
            config,
            process_index,
            process_count,
            batch_map=pipeline.normalize_batch,
        )

    def evaluator(self, config, model, batch_sharding):
        train, val = clips.qa_of(config, "train"), clips.qa_of(config, "validation")
        blind = {"task": labelled.prior_accuracy(train, val)}
        for g, kind in enumerate(clips.QUESTION_TYPES):
            if np.any(val.groups == g):
                blind[kind] = labelled.prior_accuracy(train, val.where(val.groups == g))
        inputs = {
            "image": clips.NormalizedClips(val.clips.frames, val.clip_of),
            "tokens": self.tokenizer(config).encode(list(val.texts)),
        }
        predict = class_predictor(model, inputs, config.eval.batch_size, batch_sharding)

        def evaluate(params) -> dict:
            correct = predict(params) == val.labels
            out = accuracy_by_group("video_qa", correct, val.groups, clips.QUESTION_TYPES)
            out.update({f"video_qa/chance_{k}": v for k, v in blind.items() if k != "task"})
            return {**out, **headline(correct.mean(), blind["task"])}

        return evaluate


TASK = VideoQATask()
