"""`python -m mmjax.bench pipeline`: input-pipeline throughput (decode + augment + tokenize).

Two measurements on the training dataset of a config:
- stages: per-image cost of decoding, of the training view (crop/resize/flip) and of
  tokenizing one caption, each timed alone on one thread over the same examples;
- end to end: images/s of the grain iterator the trainer uses (the same transforms plus
  batching and normalisation), for each `--threads` value, after a warm-up batch. Per core =
  images/s divided by the cores the run could use (min(threads, cores), 1 for threads=0,
  which loads in the caller's thread).

JSON keys: config, batch, cores, stages_ms_per_image {decode, augment, tokenize}, runs
[{threads, images_per_s, images_per_s_per_core, batches}], dataset, augment.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mmjax.bench.common import median
from mmjax.bench.scale import apply_overrides
from mmjax.bench.train import load_config
from mmjax.data import pipeline, preprocess


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _stage_ms(fn, items: list, rounds: int = 3) -> float:
    """Median over rounds of the mean milliseconds per item of `fn(item)`."""
    per_item = []
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            fn(item)
        per_item.append((time.perf_counter() - start) / len(items) * 1e3)
    return median(per_item)


def stage_costs(data_cfg, num_examples: int) -> dict[str, float]:
    source = pipeline.train_source(data_cfg)
    examples = source.__getitems__(range(min(num_examples, len(source))))
    decoded = [preprocess.decode(ex["image"]) for ex in examples]
    tokenizer = pipeline.tokenizer_for(data_cfg)
    rng = np.random.default_rng(0)
    view = lambda image: preprocess.train_view(
        image,
        data_cfg.image_size,
        augment=data_cfg.augment,
        crop_scale=tuple(data_cfg.crop_scale),
        flip=data_cfg.flip,
        rng=rng,
    )
    return {
        "decode": _stage_ms(lambda ex: preprocess.decode(ex["image"]), examples),
        "augment": _stage_ms(view, decoded),
        "tokenize": _stage_ms(lambda ex: tokenizer.encode([ex["captions"][-1]]), examples),
    }


def iterator_rate(data_cfg, batch: int, threads: int, batches: int) -> float:
    it = pipeline.train_iterator(
        data_cfg,
        seed=0,
        global_batch_size=batch,
        process_index=0,
        process_count=1,
        num_threads=threads,
        prefetch_batches=max(2, threads),
    )
    next(it)  # opens the files and starts the workers
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    config, _, name, _ = load_config(args)
    apply_overrides(config, args.override)
    cores = _cores()
    stages = stage_costs(config.data, args.stage_examples)
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        rate = iterator_rate(config.data, args.batch, threads, args.batches)
        used = min(max(threads, 1), cores)
        runs.append(
            {
                "threads": threads,
                "images_per_s": rate,
                "images_per_s_per_core": rate / used,
                "batches": args.batches,
            }
        )
    result = {
        "config": name,
        "dataset": config.data.name,
        "augment": config.data.augment,
        "image_size": config.data.image_size,
        "batch": args.batch,
        "cores": cores,
        "stages_ms_per_image": stages,
        "runs": runs,
    }
    print_report(result)
    return result


def print_report(r: dict) -> None:
    s = r["stages_ms_per_image"]
    print(
        f"input pipeline of {r['config']} ({r['dataset']}, {r['image_size']} px, "
        f"augment={r['augment']}), batch {r['batch']}, {r['cores']} cores"
    )
    print(
        f"  per image, one thread: decode {s['decode']:.3f} ms, augment {s['augment']:.3f} ms, "
        f"tokenize {s['tokenize']:.3f} ms → {1e3 / sum(s.values()):.0f} images/s"
    )
    for run_ in r["runs"]:
        print(
            f"  grain iterator, {run_['threads']} threads: {run_['images_per_s']:.0f} images/s "
            f"({run_['images_per_s_per_core']:.0f} per core)"
        )
