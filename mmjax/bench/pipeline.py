"""`python -m mmjax.bench pipeline`: input-pipeline throughput (decode + augment + tokenize),
next to the train step it has to feed.

Three measurements on the training dataset and model of a config (`--config`, or
`--open-clip-config` for an open_clip architecture with its data defaults):
- stages: per-image cost of decoding, of the training view (crop/resize/flip) and of
  tokenizing one caption, each timed alone on one thread over the same examples;
- end to end: images/s of the iterator the trainer uses (the same transforms plus batching
  and normalisation), for each `--threads` value (loader threads of the training process;
  training uses 1) and each `--workers` value (`data.workers` processes), after warm-up
  batches. Per core = images/s divided by the cores the run could use (min(threads or
  workers, cores), 1 for threads=0, which loads in the caller's thread);
- the step: samples/s of the config's jitted train step on a synthetic batch of `--batch`
  (median of `--step-steps` steps; 0 skips it). A loader keeps up when its images/s is at least
  that; measured alone, each has the machine to itself: in training they share the CPU cores,
  which `perf/data_wait_fraction` of a real run shows.

JSON keys: config, batch, cores, stages_ms_per_image {decode, augment, tokenize}, runs
[{threads, workers, images_per_s, images_per_s_per_core, batches}], step {samples_per_s,
step_s, dtype} (or null), dataset, augment, image_size.
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


def iterator_rate(data_cfg, batch: int, threads: int, batches: int, workers: int = 0) -> float:
    it = pipeline.train_iterator(
        data_cfg,
        seed=0,
        global_batch_size=batch,
        process_index=0,
        process_count=1,
        num_threads=threads,
        prefetch_batches=max(2, threads, workers),
        workers=workers,
    )
    for _ in range(max(1, workers)):  # opens the files and starts every worker
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def step_rate(config, vocab: int, batch: int, steps: int) -> dict:
    """samples/s of the config's train step (its dtype) on a synthetic batch, median of `steps`
    after one untimed step."""
    from mmjax.bench import common
    from mmjax.bench.train import bench_devices, build_mmjax_variant, synthetic_batch

    variant = build_mmjax_variant(
        config, vocab, config.dtype, bench_devices(), synthetic_batch(batch, config, vocab)
    )
    step_s = median(common.time_calls(variant.step, steps, warmup=1))
    return {"samples_per_s": batch / step_s, "step_s": step_s, "dtype": config.dtype}


def _loader_runs(args, data_cfg, cores: int) -> list[dict]:
    settings = [(int(t), 0) for t in _ints(args.threads)]
    settings += [(0, int(w)) for w in _ints(args.workers) if int(w) > 0]
    runs = []
    for threads, workers in settings:
        rate = iterator_rate(data_cfg, args.batch, threads, args.batches, workers)
        used = min(max(threads, workers, 1), cores)
        runs.append(
            {
                "threads": threads,
                "workers": workers,
                "images_per_s": rate,
                "images_per_s_per_core": rate / used,
                "batches": args.batches,
            }
        )
    return runs


def _ints(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def run(args: argparse.Namespace) -> dict:
    config, vocab, name, _ = load_config(args)
    apply_overrides(config, args.override)
    cores = _cores()
    stages = stage_costs(config.data, args.stage_examples)
    runs = _loader_runs(args, config.data, cores)
    step = step_rate(config, vocab, args.batch, args.step_steps) if args.step_steps else None
    result = {
        "config": name,
        "dataset": config.data.name,
        "augment": config.data.augment,
        "image_size": config.data.image_size,
        "batch": args.batch,
        "cores": cores,
        "stages_ms_per_image": stages,
        "runs": runs,
        "step": step,
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
    step = r.get("step")
    if step:
        print(
            f"  train step ({step['dtype']}): {step['step_s']:.3f} s → "
            f"{step['samples_per_s']:.1f} samples/s to feed"
        )
    for run_ in r["runs"]:
        how = f"{run_['workers']} workers" if run_["workers"] else f"{run_['threads']} threads"
        verdict = ""
        if step:
            ratio = run_["images_per_s"] / step["samples_per_s"]
            verdict = f", {ratio:.1f}× the step's need" + ("" if ratio >= 1 else ": LIMITS it")
        print(
            f"  loader, {how}: {run_['images_per_s']:.1f} images/s "
            f"({run_['images_per_s_per_core']:.1f} per core){verdict}"
        )
