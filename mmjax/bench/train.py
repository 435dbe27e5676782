"""`python -m mmjax.bench train`: step time, FLOPs, MFU and memory of the jitted train step.

The model comes from an mmjax config file (`--config`) or an open_clip model config
(`--open-clip-config`, a JSON path or a name such as `ViT-B-16`). Each `--dtype` is one variant
with its own compiled step; `--vs-open-clip` adds open_clip's step on the same model at each of
`--peer-settings` (default float32 and amp_bf16; `+compile` for torch.compile), each in a process
of its own started with the environment a user's process has (`mmjax.bench.peer_worker`). All
variants see one fixed synthetic batch (no input pipeline is timed) and are timed alternately:
each of `--rounds` rounds runs `--steps` steps of every variant in turn (each block after a
second of idle time and one untimed step, see `time_alternating`), so slow drift of the machine
(other jobs, thermal state) hits all of them alike. Reported times are medians over all rounds.

MFU = analytic model FLOPs per second (`mmjax.bench.flops`: 2 × multiply-adds of the matmuls,
training = 3 × forward) over a peak: `--peak-tflops` per device if given, else the measured GEMM
ceiling of this device for the variant's dtype (float32, or bfloat16 inputs with float32
accumulation) — on a CPU, where no datasheet peak applies, "how close to the best GEMM". XLA's
own FLOP count of the compiled step is reported beside the model FLOPs; it is larger because it
includes element-wise and optimizer work.

Devices: on CPU one device (fake host devices split the same cores, so more of them measure
partitioning overhead, not speed); on accelerators all devices, batch split over a data mesh.

`--json` prints one object whose keys are:
  model: {name, source, loss, image_size, image_kind, image_width, image_heads, text_length,
          text_width, text_depth, text_heads, text_mlp, vocab_size, embed_dim} and, for a ViT
          (image_kind "vit"), patch_size, image_depth, image_mlp; for a ResNet, image_layers
          (blocks per stage), image_norm (image_width: its stem width)
  batch: global batch size;  steps, warmup, rounds: as given
  platform, devices: backend of the mmjax variants and how many devices they use
  cpu_count, other_cpu_load: cores that other processes kept busy while this one timed (null
      off Linux); well above 0 means the times are noisy
  allocator: this process's malloc (mimalloc or glibc and its setting; see mmjax.runtime)
  model_flops_per_sample: analytic forward FLOPs {image, text, logits, forward}
  ceilings_flops: {dtype: GEMM FLOP/s of one device} for float32 and bfloat16, measured
      after each round (median over rounds)
  peak_flops: {dtype: MFU denominator of one device}, and peak_source: "ceiling" | "--peak-tflops"
  variants: list of {framework ("mmjax" | "open_clip"), dtype, device, devices, step_s_median,
      step_s_min, step_s (every timed step), samples_per_s, model_flops_per_step,
      xla_flops_per_step, xla_over_model, model_flops_per_s, mfu, compile_s, temp_bytes,
      argument_bytes, output_bytes, param_count, conditions, cpu_per_step, cores_busy}
      (XLA and memory fields are null for open_clip; xla_flops_per_step sums all devices, the
      byte counts are per device; conditions: the peer process's {threads, allocator,
      jax_loaded}, null for mmjax; cpu_per_step: {user_s, sys_s, minor_faults} per timed step
      of the process that ran it; cores_busy: its user + system CPU seconds over the timed
      seconds; with --profile DIR, mmjax variants also have "profile": mmjax.bench.profile)
  speedup_vs_open_clip: {mmjax dtype: {open_clip setting: its step time / mmjax step time}}
  best_vs_best: {mmjax, open_clip: the fastest variant of each, speedup: their ratio}
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mmjax import config as base_config
from mmjax import parallel, runtime
from mmjax.bench import common, flops, profile, train_report, usage
from mmjax.data import pipeline
from mmjax.tasks import get_task
from mmjax.train.step import NO_CEILING

DTYPES = ("float32", "bfloat16")
SETTLE_S = 1.0  # idle seconds before each variant's timed block (see time_alternating)


@dataclasses.dataclass
class Variant:
    framework: str
    dtype: str
    device: str
    num_devices: int
    step: Callable[[], object] | None  # one training step, blocked on by the timer
    param_count: int
    compile_s: float | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    times: list = dataclasses.field(default_factory=list)
    # A peer in its own process times its own steps: run(n) -> (n step times, its usage over
    # them) (see peer_worker).
    run: Callable[[int], tuple[list[float], dict]] | None = None
    conditions: dict = dataclasses.field(default_factory=dict)
    hlo_text: Callable[[], str] | None = None  # the compiled step's optimized HLO (mmjax)
    # CPU seconds and page faults of the timed steps (usage.USAGE_KEYS), summed over blocks.
    cpu_usage: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(usage.USAGE_KEYS, 0.0)
    )

    def timed(self, steps: int) -> tuple[list[float], dict]:
        """Step times of `steps` steps and the usage of the process that ran them: this one
        for mmjax (nothing else runs in it meanwhile), the peer's own for open_clip."""
        if self.run:
            return self.run(steps)
        start = usage.process_usage()
        times = common.time_calls(self.step, steps, 0)
        return times, usage.usage_since(start)

    def measure(self, steps: int) -> None:
        times, used = self.timed(steps)
        self.times += times
        self.cpu_usage = {k: self.cpu_usage[k] + used[k] for k in usage.USAGE_KEYS}


# open_clip model configs shipped with the benchmark (package data), found by name.
CONFIG_DIR = Path(__file__).parent / "configs"


def open_clip_config_path(name_or_path: str) -> str:
    """`name_or_path`, or the path of the benchmark's own config of that name (clip_tiny_64)."""
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if not Path(name_or_path).is_file() and shipped.is_file():
        return str(shipped)
    return name_or_path


def load_config(args: argparse.Namespace) -> tuple[ml_collections.ConfigDict, int, str, dict]:
    """(config, vocab_size, model name, open_clip config or None) of the benchmarked model:
    `--open-clip-config`, else the recipe `--config`, else the base config (mmjax/config.py)."""
    from mmjax.interop import open_clip_config

    if args.open_clip_config:
        path = open_clip_config_path(args.open_clip_config)
        oc_cfg = open_clip_config.load_open_clip_config(path)
        config, vocab = open_clip_config.mmjax_config_from_open_clip(oc_cfg)
        return config, vocab, Path(args.open_clip_config).stem, oc_cfg
    if args.config is None:
        config, name = base_config.get_config(), "base"
    else:
        spec = importlib.util.spec_from_file_location("mmjax_bench_config", args.config)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"cannot load config file {args.config!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config, name = module.get_config(), Path(args.config).stem
    # The config's tokenizer (data.tokenizer) fixes the vocabulary of config-file models.
    vocab = pipeline.tokenizer_for(config.data).vocab_size
    return config, vocab, name, None


def synthetic_batch(
    batch: int, config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Images uniform in [-1, 1] and token rows [ids..., EOT, PAD...] of random lengths, with
    the EOT and pad ids of the config's text tower."""
    size, length = config.data.image_size, config.data.text_length
    eot, pad = config.model.text.eot_id, config.model.text.pad_id
    rng = np.random.default_rng(seed)
    images_BHWC = rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)
    tokens_BL = rng.integers(0, vocab_size, (batch, length)).astype(np.int32)
    tokens_BL[tokens_BL == eot] = (eot + 1) % vocab_size  # EOT only where placed below
    lengths_B = rng.integers(min(3, length), length + 1, batch)
    for row, n in enumerate(lengths_B):
        tokens_BL[row, n - 1] = eot
        tokens_BL[row, n:] = pad
    return {"image": images_BHWC, "tokens": tokens_BL}


def bench_devices() -> list:
    """One CPU device (fake host devices share the same cores), else every accelerator."""
    devices = jax.devices()
    return devices[:1] if devices[0].platform == "cpu" else devices


def build_mmjax_variant(config, vocab: int, dtype: str, devices: list, batch_np: dict) -> Variant:
    """Compiles the train step of `config` in `dtype` (timed: lower + compile) on a data mesh."""
    from mmjax.train.trainer import build_trainer

    c = config.copy_and_resolve_references()
    c.dtype = dtype
    c.batch_size = len(batch_np["image"])
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    mesh = parallel.make_mesh(c.mesh, devices)
    parallel.check_batch_size(c.batch_size, mesh)
    trainer = build_trainer(get_task(c.task), c, mesh, vocab)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        state = trainer.init(jax.random.key(c.seed))
        batch = parallel.global_batch(batch_np, trainer.batch_sharding)
        start = time.perf_counter()
        compiled = trainer.step.lower(state, batch, NO_CEILING).compile()
        compile_s = time.perf_counter() - start
    param_count = sum(int(x.size) for x in jax.tree.leaves(state.params))
    holder = [state]  # the step donates its input state: always pass the newest one

    def step():
        holder[0], metrics = compiled(holder[0], batch, NO_CEILING)
        return holder[0], metrics

    stats = common.compiled_stats(compiled)
    if stats["xla_flops"] is not None:
        stats["xla_flops"] *= len(devices)  # cost_analysis counts one device's program
    platform = devices[0].platform
    fields = ("mmjax", dtype, platform, len(devices), step, param_count, compile_s, stats)
    return Variant(*fields, hlo_text=compiled.as_text)


def time_alternating(
    variants: list[Variant], steps: int, warmup: int, rounds: int
) -> dict[str, float]:
    """Times every variant round-robin; returns the GEMM ceiling of one device per dtype (2048³
    matmuls, float32 accumulation), measured once per round too and reported as the median over
    rounds, so that load from other processes lowers the denominator as it lowers the step.

    Each variant's block starts after `SETTLE_S` of idle time (torch's OpenMP threads keep
    spinning for a while after a peer's step) and with one untimed step: the first step after
    another variant ran pays for memory the other one touched (on ViT-B-32 the mmjax bf16 step
    took 2.1-3.2 s first, then 1.2-1.3 s), which no user training one model ever sees. Every
    variant, the peers included, gets the same treatment."""
    for v in variants:
        if warmup:
            v.timed(warmup)
    measured = {dtype: [] for dtype in DTYPES}
    for _ in range(rounds):
        for v in variants:
            time.sleep(SETTLE_S)
            v.timed(1)
            v.measure(steps)
        for dtype in DTYPES:
            measured[dtype].append(common.matmul_ceiling(dtype))
    return {dtype: common.median(xs) for dtype, xs in measured.items()}


def peak_dtype(v: Variant) -> str:
    """The GEMM ceiling a variant is measured against: bf16 for mixed precision (mmjax bfloat16,
    open_clip amp_bf16), else float32."""
    return "bfloat16" if "bf" in v.dtype else "float32"


def variant_record(v: Variant, batch: int, model_flops: int, peak_per_device: float) -> dict:
    step_s = common.median(v.times)
    xla = v.stats.get("xla_flops")
    steps = len(v.times)
    return {
        "framework": v.framework,
        "dtype": v.dtype,
        "device": v.device,
        "devices": v.num_devices,
        "step_s_median": step_s,
        "step_s_min": min(v.times),
        "step_s": v.times,
        "samples_per_s": batch / step_s,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla,
        "xla_over_model": xla / model_flops if xla else None,
        "model_flops_per_s": model_flops / step_s,
        "mfu": model_flops / step_s / (peak_per_device * v.num_devices),
        "compile_s": v.compile_s,
        "temp_bytes": v.stats.get("temp_bytes"),
        "argument_bytes": v.stats.get("argument_bytes"),
        "output_bytes": v.stats.get("output_bytes"),
        "param_count": v.param_count,
        "conditions": v.conditions or None,
        "cpu_per_step": {k: x / steps for k, x in v.cpu_usage.items()},
        "cores_busy": (v.cpu_usage["user_s"] + v.cpu_usage["sys_s"]) / sum(v.times),
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)}")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.profile_steps < 1:
        raise ValueError("--steps, --rounds, --profile-steps must be >= 1 and --warmup >= 0")
    if args.vs_open_clip:
        from mmjax.bench import open_clip_peer, peer_worker

        open_clip_peer.require()  # before any compile: fail fast with the install hint
        peer_settings = peer_worker.parse_settings(args.peer_settings)

    config, vocab, name, oc_cfg = load_config(args)
    source = "open_clip" if args.open_clip_config else "mmjax"
    if args.vs_open_clip and oc_cfg is None:
        from mmjax.interop.open_clip_config import open_clip_config_from_mmjax

        oc_cfg = open_clip_config_from_mmjax(config, vocab)
    batch = args.batch
    batch_np = synthetic_batch(batch, config, vocab)
    devices = bench_devices()
    platform = devices[0].platform

    variants = []
    for dtype in dtypes:
        _log(f"compiling mmjax {dtype} step ...")
        variants.append(build_mmjax_variant(config, vocab, dtype, devices, batch_np))
    peers = []
    try:
        for setting in peer_settings if args.vs_open_clip else ():
            _log(f"starting open_clip {setting.name} in its own process ...")
            peer = peer_worker.PeerProcess(
                setting,
                oc_cfg,
                config,
                batch_np,
                args.threads,
                platform == "gpu",
                args.peer_malloc_tuning,
            )
            peers.append(peer)
            conditions = {
                "threads": peer.threads,
                "allocator": peer.allocator,
                "jax_loaded": peer.jax_loaded,
            }
            variants.append(
                Variant(
                    "open_clip",
                    setting.name,
                    peer.device,
                    1,
                    None,
                    peer.param_count,
                    peer.setup_s if setting.compile else None,
                    run=peer.run,
                    conditions=conditions,
                )
            )
        _log(f"timing {len(variants)} variants: {args.rounds} rounds x {args.steps} steps ...")
        clock = usage.cpu_clock()
        ceiling = time_alternating(variants, args.steps, args.warmup, args.rounds)
        others = usage.other_cores(clock, usage.cpu_clock(), sum(p.cpu_s for p in peers))
    finally:
        for peer in peers:
            peer.close()
    if args.peak_tflops:
        peak, peak_source = {d: args.peak_tflops * 1e12 for d in DTYPES}, "--peak-tflops"
    else:
        peak, peak_source = dict(ceiling), "ceiling"

    per_sample = flops.model_flops(config, batch)
    step_flops = per_sample["train_per_step"]
    records = [variant_record(v, batch, step_flops, peak[peak_dtype(v)]) for v in variants]
    result = {
        "model": train_report.model_record(name, source, config, vocab),
        "batch": batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "platform": platform,
        "devices": len(devices),
        "cpu_count": os.cpu_count(),
        "other_cpu_load": others,
        "allocator": runtime.allocator_in_use(),
        "model_flops_per_sample": {
            "image": per_sample["image_forward_per_sample"],
            "text": per_sample["text_forward_per_sample"],
            "logits": per_sample["logits_forward_per_sample"],
            "forward": per_sample["forward_per_sample"],
        },
        "ceilings_flops": ceiling,
        "peak_flops": peak,
        "peak_source": peak_source,
        "variants": records,
    }
    if args.vs_open_clip:
        ours = [r for r in records if r["framework"] == "mmjax"]
        theirs = [r for r in records if r["framework"] == "open_clip"]
        result["speedup_vs_open_clip"] = {
            r["dtype"]: {p["dtype"]: p["step_s_median"] / r["step_s_median"] for p in theirs}
            for r in ours
        }
        best = min(ours, key=lambda r: r["step_s_median"])
        peer_best = min(theirs, key=lambda r: r["step_s_median"])
        result["best_vs_best"] = {
            "mmjax": best["dtype"],
            "open_clip": peer_best["dtype"],
            "speedup": peer_best["step_s_median"] / best["step_s_median"],
        }
    if args.profile:
        for v, record in zip(variants, records, strict=True):
            if v.hlo_text is not None:
                out_dir = os.path.join(args.profile, v.dtype)
                _log(f"profiling mmjax {v.dtype} ({args.profile_steps} steps) into {out_dir} ...")
                record["profile"] = profile.profile_variant(
                    v.step, v.hlo_text(), args.profile_steps, out_dir
                )
    train_report.print_report(result)
    for record in records:
        if "profile" in record:
            profile.print_profile(f"mmjax {record['dtype']}", record["profile"])
    return result
