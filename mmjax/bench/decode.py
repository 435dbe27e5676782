"""`python -m mmjax.bench decode`: captioning speed with and without the key/value cache.

The CoCa captioner of a config (`--config`, default the base config; the decoder depth is the
recipe's `captioning.decoder_depth` where it has one, else `--decoder-depth`) with random
weights, on random images. For each caption length in `--lengths`, greedy decoding and beam
search (`--beam`, if > 1) are compiled twice: with the cache (`coca.caption(cache=True)`, what the
captioning evaluation runs: one new token per position against key/value caches) and without
(the whole prefix rerun at every position). Each timed call captions `--batch` images (the image
tower included, once per call); the variants alternate for `--rounds` rounds and the median
call counts. tokens/s = batch × (length − 1) decoded positions per second (per image, not per
beam). Decoding has static shapes, so the cost does not depend on the weights or on when beams
finish. `same_captions`: the two variants' captions of the last round are identical.

JSON keys: config, batch, beam, decoder_depth, rounds, runs [{mode (greedy|beam), length,
cache_tokens_per_s, no_cache_tokens_per_s, speedup, same_captions, cache_s, no_cache_s}].

A text→image recipe (`config.task == "text_to_image"`, e.g. configs/text_to_image.py) benches
its prior instead (`image_sampling.sample_codes`, random weights, `--codebook-size` codes on the
grid of an 8-pixel-per-token tokenizer, `--batch` prompts of `data.text_length` tokens): greedy
and sampled (the recipe's temperature/top-k/top-p; guidance when it sets one) rows, with the
cache (prefix once, then one position per step) and without (the whole [text; codes] buffer
rerun per position). tokens/s = prompts × image tokens per second; `same_captions` says the two
variants sampled the same codes (the same key). `length` is the number of image tokens and
`decoder_depth` the prior's depth.
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import model_state
from mmjax.bench.common import median
from mmjax.bench.train import load_config
from mmjax.models.coca import build_coca, caption


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def captioner(config: ml_collections.ConfigDict, vocab: int, length: int, depth: int):
    """(model, random params) of `config`'s CoCa with `depth` decoder blocks, for captions of
    `length` tokens (with a BatchNorm tower, `ParamsAndState`: its statistics at their init)."""
    c = config.copy_and_resolve_references()
    c.data.text_length = length
    if "captioning" not in c:
        c.captioning = ml_collections.ConfigDict()
    c.captioning.decoder_depth = depth
    model = build_coca(c, vocab)
    images = jnp.zeros((1, c.data.image_size, c.data.image_size, 3))
    tokens = jnp.zeros((1, length), jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    return model, model_state.with_state(*model_state.split(variables))


def time_variants(fns: dict, params, images, rounds: int) -> tuple[dict, dict]:
    """Median seconds per call of each compiled fn, called in alternation, and the last
    outputs."""
    seconds = {k: [] for k in fns}
    outputs = {k: jax.block_until_ready(fn(params, images)) for k, fn in fns.items()}  # warm-up
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            start = time.perf_counter()
            outputs[k] = jax.block_until_ready(fns[k](params, images))
            seconds[k].append(time.perf_counter() - start)
    return {k: median(v) for k, v in seconds.items()}, outputs


def run(args: argparse.Namespace) -> dict:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 2 or args.batch < 1 or args.beam < 1 or args.rounds < 1:
        raise ValueError("--lengths must be integers >= 2; --batch, --beam, --rounds >= 1")
    config, vocab, name, _ = load_config(args)
    if config.task == "text_to_image":
        return run_prior(args, config, vocab, name)
    depth = args.decoder_depth
    if depth is None:
        depth = config.captioning.decoder_depth if "captioning" in config else 2
    t = config.model.text
    bos, eot, pad = 1, t.eot_id, t.pad_id  # the byte tokenizer's ids; weights are random anyway
    size = config.data.image_size
    images = jax.random.normal(jax.random.key(1), (args.batch, size, size, 3))
    runs = []
    for length in lengths:
        model, params = captioner(config, vocab, length, depth)
        modes = [("greedy", 1)] + ([("beam", args.beam)] if args.beam > 1 else [])
        for mode, beam in modes:

            def compiled(cache, beam=beam, length=length, model=model):
                fn = lambda p, x: caption(model, p, x, length, beam, bos, eot, pad, cache=cache)
                return jax.jit(fn)

            _log(f"compiling {mode} (beam {beam}), length {length}")
            fns = {"cache": compiled(True), "no_cache": compiled(False)}
            seconds, out = time_variants(fns, params, images, args.rounds)
            same = np.array_equal(out["cache"][0], out["no_cache"][0])
            runs.append(_row(mode, length, seconds, args.batch * (length - 1), same))
    print(report(name, args, depth, runs))
    return {
        "config": name,
        "batch": args.batch,
        "beam": args.beam,
        "decoder_depth": depth,
        "rounds": args.rounds,
        "runs": runs,
    }


def run_prior(args, config, vocab: int, name: str) -> dict:
    from mmjax.models.image_prior import TextImagePrior
    from mmjax.models.image_sampling import Sampling, sample_codes

    t, length = config.text_to_image, int(config.data.text_length)
    grid = int(config.data.image_size) // 8
    prior = TextImagePrior(
        vocab, args.codebook_size, length, grid * grid, t.width, t.depth, t.num_heads, t.mlp_dim
    )
    text = jax.random.randint(jax.random.key(1), (args.batch, length), 3, vocab)
    codes = jnp.zeros((1, grid * grid), jnp.int32)
    params = nn.unbox(jax.jit(prior.init)(jax.random.key(0), text[:1], codes)["params"])
    uncond = jnp.asarray([1, 2] + [0] * (length - 2), jnp.int32)
    recipe = Sampling(float(t.temperature), int(t.top_k), float(t.top_p), float(t.guidance))
    runs = []
    for mode, sampling in (("greedy", Sampling(temperature=0.0)), ("sampled", recipe)):

        def compiled(cache, sampling=sampling):
            fn = lambda p, x: sample_codes(prior, p, x, jax.random.key(2), sampling, uncond, cache)
            return jax.jit(fn)

        _log(f"compiling {mode}, {grid * grid} image tokens after {length} text tokens")
        fns = {"cache": compiled(True), "no_cache": compiled(False)}
        seconds, out = time_variants(fns, params, text, args.rounds)
        same = np.array_equal(out["cache"], out["no_cache"])
        runs.append(_row(mode, grid * grid, seconds, args.batch * grid * grid, same))
    one_beam = argparse.Namespace(**{**vars(args), "beam": 1})
    print(report(name, one_beam, int(t.depth), runs).replace("captions", "codes"))
    return {
        "config": name,
        "batch": args.batch,
        "beam": 1,
        "decoder_depth": int(t.depth),
        "rounds": args.rounds,
        "runs": runs,
    }


def _row(mode: str, length: int, seconds: dict, positions: int, same: bool) -> dict:
    """One timed variant pair: tokens/s of both, the speedup, whether outputs matched."""
    row = {
        "mode": mode,
        "length": length,
        "cache_s": seconds["cache"],
        "no_cache_s": seconds["no_cache"],
        "cache_tokens_per_s": positions / seconds["cache"],
        "no_cache_tokens_per_s": positions / seconds["no_cache"],
        "speedup": seconds["no_cache"] / seconds["cache"],
        "same_captions": bool(same),
    }
    _log(
        f"{mode:7s} L={length:3d}: cache {row['cache_tokens_per_s']:9.0f} tok/s, no cache "
        f"{row['no_cache_tokens_per_s']:8.0f} tok/s, {row['speedup']:.1f}x, same: {same}"
    )
    return row


def report(name: str, args, depth: int, runs: list[dict]) -> str:
    lines = [
        f"decoding: {name}, decoder depth {depth}, batch {args.batch}, beam {args.beam}, "
        f"median of {args.rounds} alternating rounds (tokens/s = images x decoded positions / s)",
        "| mode | length | with cache tok/s | without tok/s | speedup | same captions |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['mode']} | {r['length']} | {r['cache_tokens_per_s']:.0f} | "
            f"{r['no_cache_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['same_captions']} |"
        )
    return "\n".join(lines)
