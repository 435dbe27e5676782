"""Evaluate a trained or imported model on any tasks (see `mmjax.eval.evaluators`).

    python -m mmjax.evaluate --workdir DIR [--tasks SPEC[,SPEC] ...] [--batch-size N]
                             [--step N] [--classnames [DATASET=]FILE]

DIR is a training workdir (`config.json` + `checkpoints/`, evaluated at its newest checkpoint
or `--step`), or a directory written by `python -m mmjax.interop.open_clip` (`params/` +
`open_clip_config.json`). Without --tasks, the
workdir config's `eval.tasks`, else the defaults of `tasks.default_tasks`.

Writes `DIR/eval/<spec>.json` per task (spec with ':' and '/' as '_': task, dataset, split,
checkpoint, counts, metrics, per-class detail) and `DIR/eval/results.md` (one table row per
metric), and prints the table. Bad input (no checkpoint, unknown task, dataset not prepared)
prints one line `error: ...` and exits with status 2, before anything is compiled; so does a
workdir whose task's model does not embed images and texts (`Task.image_text_embeddings`:
contrastive runs and imported open_clip models do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections

from mmjax import checkpoint, model_state, parallel
from mmjax.eval import evaluators as eval_tasks
from mmjax.interop import open_clip_config
from mmjax.tasks import get_task
from mmjax.train.trainer import build_trainer

_COMMA_OUTSIDE_BRACKETS = re.compile(r",(?![^\[]*\])")  # keeps "test[:10%]"-style splits whole


class UsageError(ValueError):
    """Input the command cannot evaluate; printed as one `error:` line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmjax.evaluate",
        description="Evaluate a training workdir's checkpoint or an imported open_clip model.",
    )
    p.add_argument("--workdir", required=True, help="training workdir or open_clip import dir")
    p.add_argument(
        "--tasks",
        nargs="+",
        action="extend",
        default=[],
        metavar="SPEC",
        help="KIND:DATASET[:SPLIT], KIND in zeroshot|retrieval|linear_probe|shapes; "
        "space- or comma-separated",
    )
    p.add_argument("--batch-size", type=int, help="eval batch size (default: eval.batch_size)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument(
        "--classnames",
        action="append",
        default=[],
        metavar="[DATASET=]FILE",
        help="a JSON list of class names, one per label, for DATASET (default: every task)",
    )
    return p


def _read_classnames(values: Sequence[str]) -> dict[str, list[str]]:
    out = {}
    for value in values:
        dataset, _, path = value.rpartition("=")
        try:
            with open(path, encoding="utf-8") as f:
                names = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--classnames {value}: cannot read a JSON list ({e})") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"--classnames {value}: expected a JSON list of strings")
        out[dataset or "*"] = names
    return out


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
    """(config, "train" | "open_clip") of a workdir; UsageError if it is neither kind."""
    oc_json = os.path.join(workdir, "open_clip_config.json")
    if os.path.isdir(os.path.join(workdir, "params")) and os.path.exists(oc_json):
        return open_clip_config.finetune_config(oc_json), "open_clip"
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UsageError(
            f"{workdir} has no config.json (a training workdir) nor params/ + "
            "open_clip_config.json (from python -m mmjax.interop.open_clip)"
        )
    with open(path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    # JSON turned the rules' tuples into lists; flax wants the tuples back.
    config.rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in config.rules)
    return config, "train"


def _open_checkpoint(workdir: str, step: int | None) -> tuple[checkpoint.Checkpointer, int]:
    """The workdir's checkpoints and the step to evaluate (`step`, or the newest)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked first: the manager would create it
        raise UsageError(f"{workdir} has no checkpoint; train first (python train.py --workdir)")
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    steps = ckpt.all_steps()
    if not steps:
        raise UsageError(f"{workdir} has no checkpoint; train first (python train.py --workdir)")
    if step is not None and step not in steps:
        raise UsageError(f"no checkpoint at --step {step}; there are {', '.join(map(str, steps))}")
    return ckpt, steps[-1] if step is None else step


def _file_name(spec: str) -> str:
    return re.sub(r"[:/]", "_", spec)


def results_table(results: Sequence[eval_tasks.TaskResult]) -> str:
    """Markdown: one row per metric of every task, then its counts and numeric settings
    (e.g. the probe's shots and C)."""
    rows = ["| task | split | metric | value |", "|---|---|---|---|"]
    for r in results:
        rows += [f"| {r.spec} | {r.split} | {k} | {v:.4f} |" for k, v in r.metrics.items()]
        facts = {**r.counts, **{k: v for k, v in r.details.items() if _is_number(v)}}
        rows += [f"| {r.spec} | {r.split} | {k} | {v:g} |" for k, v in facts.items()]
    return "\n".join(rows)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _write(workdir: str, results, source: dict) -> str:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    for r in results:
        record = {**dataclasses.asdict(r), "task": r.spec, "checkpoint": source}
        del record["spec"]
        with open(os.path.join(out_dir, f"{_file_name(r.spec)}.json"), "w") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
    what = f"step {source['step']}" if source.get("step") is not None else source["kind"]
    table = f"# Evaluation of {workdir} ({what})\n\n{results_table(results)}\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    try:
        specs = [s for t in args.tasks for s in _COMMA_OUTSIDE_BRACKETS.split(t) if s.strip()]
        for spec in specs:  # syntax first: a typo fails before any file is read
            eval_tasks.parse_task(spec)
        classnames = _read_classnames(args.classnames)
        config, kind = load_config(workdir)
        task = get_task(config.task)
        if not task.image_text_embeddings:
            raise UsageError(
                f"task={config.task!r}: its model does not embed images and texts, which every "
                "evaluation here needs; evaluate a contrastive run or an imported open_clip model "
                "(the task's own scores are in the run's summary.json)"
            )
        if kind == "train":
            ckpt, step = _open_checkpoint(workdir, args.step)
        elif args.step is not None:
            raise UsageError("--step: an imported open_clip model has no training steps")
        if args.batch_size is not None:
            if args.batch_size < 1:
                raise UsageError(f"--batch-size {args.batch_size} must be positive")
            config.eval.batch_size = args.batch_size
        mesh = parallel.make_mesh(config.mesh)
        trainer = build_trainer(task, config, mesh, task.tokenizer(config).vocab_size)
        with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
            evaluator = eval_tasks.build_evaluator(
                config,
                trainer.model,
                trainer.batch_sharding,
                specs or tuple(config.eval.get("tasks", ())),
                classnames=classnames,
            )
            if kind == "train":
                _, state = ckpt.restore_state(trainer.abstract_state, step)
                ckpt.close()
                # (with a ResNet's BatchNorm statistics, frozen: see mmjax/model_state.py)
                params = model_state.with_state(state.params, state.model_state)
                source = {"kind": "train", "step": step}
            else:
                path = os.path.join(workdir, "params")
                params = checkpoint.restore_params(path, trainer.abstract_state.params)
                source = {"kind": "open_clip", "path": path, "step": None}
    except (ValueError, OSError, ImportError) as e:  # EvalSpecError and DataError are ValueErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        evaluator(params)
    results = list(evaluator.results.values())  # in task order
    if jax.process_index() == 0:
        print(_write(workdir, results, source))
    return 0


if __name__ == "__main__":
    from absl import logging

    # Errors only: tfds warns about every catalog folder without dataset_info.json while it
    # looks a dataset up, which would bury the one-line `error:` of a missing dataset.
    logging.set_verbosity(logging.ERROR)
    raise SystemExit(main())
