"""Tasks by name (`config.task`): each module defines `TASK`, a `mmjax.tasks.base.Task`."""

from __future__ import annotations

import importlib

from mmjax.tasks.base import Task, headline

# name -> module; imported on first use so a run loads only what its task needs.
TASKS = {
    "contrastive": "mmjax.tasks.contrastive",
    "classification": "mmjax.tasks.classification",
    "matching": "mmjax.tasks.matching",
    "captioning": "mmjax.tasks.captioning",
    "text_classification": "mmjax.tasks.text_classification",
    "video_contrastive": "mmjax.tasks.video_contrastive",
    "video_qa": "mmjax.tasks.video_qa",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name]).TASK


__all__ = ["TASKS", "Task", "get_task", "headline"]
