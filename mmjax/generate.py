"""Images from text with a trained text→image run, optionally reranked by a two-tower run.

    python -m mmjax.generate --workdir W --text "a small red circle on the left" --num 16
                             --out DIR [--seed S] [--rerank-with W2]
                             [--temperature T] [--top-k K] [--top-p P] [--guidance G]
    python -m mmjax.generate --workdir W --judge [--rerank-with W2] [--prompts 32] [--num 16]
        [--language en|zh]
                             [--out DIR]

W is a `task=text_to_image` training workdir (its newest checkpoint). The first form writes
DIR/000.png … (at the dataset's image size; best first when reranked), DIR/grid.png (all of them)
and DIR/scores.json (prompt, seed, sampling, and per image its file, sample index and, when
reranked, its image–text cosine under W2). Sampling settings default to the run's
`text_to_image.*`; the same seed, prompt and settings give the same images.

Reranking: W2 is any run whose model embeds images and texts (a contrastive run such as the
default `python train.py`); each sample and the prompt are embedded with it, and the samples are
ordered by cosine similarity, best first (DALL-E's CLIP reranking).

`--judge` measures instead of writing samples: `--prompts` prompts of held-out colour–shape
compositions (`mmjax.eval.generated_images`), `--num` samples each, judged from the pixels
(`mmjax.eval.image_judge`): the accuracy of every attribute over all samples and, with
--rerank-with, of the best sample per prompt; printed as a table and written to
DIR/judge.json (default DIR: W/judge) with DIR/grid.png (the first 8 prompts, their best 4).

Bad input (a workdir that is not a text_to_image run, no checkpoint, a prompt longer than the
model's context, a rerank run that cannot embed) prints one line `error: ...` and exits with
status 2 before anything is compiled or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmjax.eval.generated_images import Generator, sampling_of
from mmjax.evaluate import UsageError, _open_checkpoint, load_config
from mmjax.generate_judge import grid_image, judge_report
from mmjax.parallel import batch_sharding
from mmjax.rerank import Reranker, open_reranker
from mmjax.tasks import get_task
from mmjax.visualize import build_run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmjax.generate", description="Sample images from a text→image run."
    )
    p.add_argument("--workdir", required=True, help="a task=text_to_image training workdir")
    p.add_argument("--text", help="the prompt (any language the captions had)")
    p.add_argument("--num", type=int, default=16, help="samples (per prompt with --judge)")
    p.add_argument("--out", help="output folder (--judge: default WORKDIR/judge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerank-with", help="a run that embeds images and texts (contrastive)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's)")
    p.add_argument("--top-k", type=int, help="0 = off (default: the run's)")
    p.add_argument("--top-p", type=float, help="1 = off (default: the run's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance, 1 = none")
    p.add_argument("--judge", action="store_true", help="judge held-out prompts instead")
    p.add_argument("--prompts", type=int, default=32, help="--judge: held-out prompts")
    p.add_argument(
        "--language", choices=("en", "zh"), default="en", help="--judge: the prompts' language"
    )
    return p


def generator_config(workdir: str):
    """The config of a text_to_image workdir; UsageError for anything else."""
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir} does not exist")
    config, kind = load_config(workdir)
    if kind != "train" or config.get("task") != "text_to_image":
        what = f"a task={config.get('task')!r} run" if kind == "train" else "an open_clip import"
        raise UsageError(
            f"--workdir {workdir} is {what}; generate reads a task=text_to_image run "
            "(python train.py --config configs/text_to_image.py --workdir DIR)"
        )
    return config


def check_prompt(text: str | None, config) -> str:
    """The prompt, if the model's context holds it whole; UsageError otherwise."""
    if text is None or not text.strip():
        raise UsageError("--text is missing or empty; give the prompt, or use --judge")
    length = int(config.data.text_length)
    if config.data.tokenizer == "bytes":
        size = len(text.encode("utf-8"))
        if size + 2 > length:
            raise UsageError(
                f"--text is {size} UTF-8 bytes; the model reads prompts of at most {length - 2} "
                f"(data.text_length={length} with BOS and EOT); shorten it"
            )
    return text


def sampling_from(args, config):
    t = config.text_to_image.copy_and_resolve_references()
    for name in ("temperature", "top_k", "top_p", "guidance"):
        if getattr(args, name) is not None:
            t[name] = getattr(args, name)
    if t.guidance != 1.0 and t.text_drop_prob == 0:
        raise UsageError(
            f"--guidance {t.guidance}: the run was trained without the unconditional caption "
            "(text_to_image.text_drop_prob=0); use --guidance 1"
        )
    try:
        return sampling_of(t)
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_generator(run, sampling, rows: int) -> Generator:
    uncond_L = run.tokenizer.encode([""])[0]
    with run.context():
        return Generator(run.model, batch_sharding(run.mesh, run.rules), sampling, uncond_L, rows)


def write_samples(out: str, images, prompt, order, scores, meta) -> None:
    os.makedirs(out, exist_ok=True)
    entries = []
    for rank, i in enumerate(order):
        name = f"{rank:03d}.png"
        Image.fromarray(images[i]).save(os.path.join(out, name))
        entry = {"file": name, "sample": int(i)}
        if scores is not None:
            entry["score"] = float(scores[i])
        entries.append(entry)
    columns = int(np.ceil(np.sqrt(len(order))))
    Image.fromarray(grid_image(images[order], columns)).save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as f:
        json.dump({"prompt": prompt, **meta, "images": entries}, f, indent=2, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    try:
        if args.num < 1 or args.prompts < 1:
            raise UsageError(f"--num {args.num} and --prompts {args.prompts} must be >= 1")
        if not args.judge and not args.out:
            raise UsageError("--out is missing: the folder to write the images to")
        config = generator_config(workdir)
        prompt = None if args.judge else check_prompt(args.text, config)
        get_task(config.task).validate(config)  # e.g. its image tokenizer run is still there
        ckpt, step = _open_checkpoint(workdir, None)
        sampling = sampling_from(args, config)
        rerank = open_reranker(os.path.abspath(args.rerank_with)) if args.rerank_with else None
        out = args.out or os.path.join(workdir, "judge")
        run = build_run(workdir, config, ckpt, step)
        ckpt.close()
        reranker = Reranker(*rerank) if rerank else None
    except (ValueError, OSError, ImportError) as e:  # UsageError and ConfigError are ValueErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    if args.judge:
        print(judge_report(run, sampling, args, out, reranker))
        return 0
    tokens = np.repeat(run.tokenizer.encode([prompt]), args.num, axis=0)
    with run.context():
        images = make_generator(run, sampling, args.num)(run.params, tokens, args.seed)
    scores, order = None, np.arange(args.num)
    if reranker is not None:
        scores = reranker.scores(images, [prompt])[:, 0]
        order = np.argsort(-scores, kind="stable")
    meta = {
        "seed": args.seed,
        "sampling": dataclasses.asdict(sampling),
        "workdir": workdir,
        "step": step,
        "reranked_with": reranker.workdir if reranker else None,
    }
    write_samples(out, images, prompt, order, scores, meta)
    print(f"wrote {args.num} images, grid.png and scores.json to {out}")
    return 0


if __name__ == "__main__":
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    raise SystemExit(main())
