"""`python -m mmjax.generate --judge`: a text→image run judged on prompts of held-out
colour–shape compositions, with and without reranking (see `mmjax.generate`)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from mmjax.eval import image_judge
from mmjax.eval.generated_images import CHANCE, SCORED, Generator, heldout_prompts, judged
from mmjax.parallel import batch_sharding

GRID_PROMPTS, GRID_SAMPLES = 8, 4  # grid.png: the first prompts (rows), their best samples


def best_per_prompt(scores_MP: np.ndarray, samples: int) -> np.ndarray:
    """Index of the best-scored sample of each prompt p (its samples are rows p·K..p·K+K-1,
    scored against prompt p), [P]."""
    prompts = scores_MP.shape[1]
    own_PK = scores_MP.reshape(prompts, samples, prompts)[np.arange(prompts), :, np.arange(prompts)]
    return np.arange(prompts) * samples + np.argmax(own_PK, axis=1)


def grid_image(images_MSS3: np.ndarray, columns: int) -> np.ndarray:
    """The images in rows of `columns`, 2 px dark gaps, uint8."""
    m, s = len(images_MSS3), images_MSS3.shape[1]
    rows = -(-m // columns)
    gap = 2
    out = np.full((rows * (s + gap) - gap, columns * (s + gap) - gap, 3), 16, np.uint8)
    for i, image in enumerate(images_MSS3):
        r, c = divmod(i, columns)
        out[r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = image
    return out


def judge_report(run, sampling, args, out: str, reranker) -> str:
    prompts, wanted = heldout_prompts(args.prompts, args.language)
    k = args.num
    tokens = np.repeat(run.tokenizer.encode(prompts), k, axis=0)
    with run.context():
        uncond_L = run.tokenizer.encode([""])[0]
        sharding = batch_sharding(run.mesh, run.rules)
        generate = Generator(run.model, sharding, sampling, uncond_L, len(tokens))
        images = generate(run.params, tokens, args.seed)
    hits = judged(images, {a: np.repeat(v, k) for a, v in wanted.items()})
    result = {"all": {a: float(np.mean(v)) for a, v in hits.items()}}
    rank_KP = np.tile(np.arange(k), (len(prompts), 1))  # sample order per prompt (grid)
    if reranker is not None:
        scores = reranker.scores(images, prompts)
        best = best_per_prompt(scores, k)
        result["reranked"] = {a: float(np.mean(v[best])) for a, v in hits.items()}
        own = scores.reshape(len(prompts), k, len(prompts))
        own = own[np.arange(len(prompts)), :, np.arange(len(prompts))]
        rank_KP = np.argsort(-own, axis=1, kind="stable")
    for part in result.values():
        part["score"] = float(np.mean([part[a] for a in SCORED]))
    record = {
        "checkpoint": run.source,
        "language": args.language,
        "prompts": prompts,
        "samples_per_prompt": k,
        "seed": args.seed,
        "sampling": {
            f: getattr(sampling, f) for f in ("temperature", "top_k", "top_p", "guidance")
        },
        "reranked_with": reranker.workdir if reranker else None,
        "chance": {**image_judge.CHANCE, "score": CHANCE},
        **result,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "judge.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    rows = min(GRID_PROMPTS, len(prompts))
    cols = min(GRID_SAMPLES, k)
    picked = [p * k + rank_KP[p, c] for p in range(rows) for c in range(cols)]
    grid = Image.fromarray(grid_image(images[picked], cols))
    grid.save(os.path.join(out, "grid.png"), optimize=True)
    return table(record, out)


def table(record: dict, out: str) -> str:
    cols = ["all"] + (["reranked"] if "reranked" in record else [])
    k = record["samples_per_prompt"]
    names = {"all": f"all {k} samples", "reranked": f"best of {k}, reranked"}
    lines = [
        f"held-out compositions: {len(record['prompts'])} prompts x {k} samples, seed "
        f"{record['seed']}, sampling {record['sampling']}",
        "| attribute | " + " | ".join(names[c] for c in cols) + " | chance |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for a in (*image_judge.ATTRIBUTES, "score"):
        values = " | ".join(f"{record[c][a]:.3f}" for c in cols)
        lines.append(f"| {a} | {values} | {record['chance'][a]:.3f} |")
    return "\n".join([*lines, f"wrote {out}/judge.json and {out}/grid.png"])
