"""Tasks by name (`config.task`): each module defines `TASK`, a `mmjax.train.task.Task`.

Only entry points (`mmjax.main`, `mmjax.evaluate`, `mmjax.visualize`, `mmjax.bench`) look tasks up
by name; the trainer is handed a Task object, so a user's own Task trains the same way:
`mmjax.train.loop.run(MyTask(), config, workdir)`.
"""

from __future__ import annotations

import importlib

from mmjax.errors import ConfigError
from mmjax.train.task import Task

# name -> module; imported on first use so a run loads only what its task needs.
TASKS = {
    "contrastive": "mmjax.tasks.contrastive",
    "classification": "mmjax.tasks.classification",
    "matching": "mmjax.tasks.matching",
    "captioning": "mmjax.tasks.captioning",
    "text_classification": "mmjax.tasks.text_classification",
    "video_contrastive": "mmjax.tasks.video_contrastive",
    "video_qa": "mmjax.tasks.video_qa",
    "text_to_image": "mmjax.tasks.text_to_image",
    "speech_to_text": "mmjax.tasks.speech_to_text",
    "image_tokenizer": "mmjax.tasks.image_tokenizer",
}


def get_task(name: str) -> Task:
    """The task registered as `name`; ConfigError naming the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name]).TASK


__all__ = ["TASKS", "get_task"]
