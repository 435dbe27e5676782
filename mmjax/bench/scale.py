"""`python -m mmjax.bench scale`: what one train step costs each device of a large mesh.

AOT-compiles (never runs) the full jitted train step of a config for `--devices` fake CPU
devices at `--global-batch`, and reports per device: the train state's bytes (parameters +
optimizer state, from the shardings: what FSDP divides), XLA's argument / temp / output bytes
(`memory_analysis()`), XLA's FLOPs (`cost_analysis()` of the partitioned program) and the analytic
model FLOPs. Mesh, loss implementation, remat and the rest come from the config; change them with
`--override key=value` (e.g. `mesh.data=1 mesh.fsdp=-1 loss_impl=chunked model.remat=full`).

JSON keys (`--json`): model, devices, mesh {data, fsdp, tensor}, global_batch, overrides,
param_count, state_bytes_per_device, state_bytes_total, argument_bytes, temp_bytes, output_bytes,
alias_bytes, xla_flops_per_device, model_flops_per_step, model_flops_per_device,
model_forward_flops_per_sample, compile_s.
"""

import argparse
import ast
import math
import time

import flax.linen as nn
import jax
import numpy as np

from mmjax import parallel
from mmjax.bench import common, flops
from mmjax.bench.train import load_config
from mmjax.tasks import get_task
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer


def apply_overrides(config, overrides: list[str]) -> None:
    """`key=value` edits of a (nested) config; values are Python literals or plain strings."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected key=value, e.g. mesh.fsdp=-1")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise ValueError(f"--override {item!r}: the config has no field {key!r}")
        node[leaf] = value


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def run(args: argparse.Namespace) -> dict:
    config, vocab, name, _ = load_config(args)
    apply_overrides(config, args.override)
    if args.global_batch:
        config.batch_size = args.global_batch
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(config.batch_size, mesh, config.microbatches)
    trainer = build_trainer(get_task(config.task), config, mesh, vocab)
    size, length = config.data.image_size, config.data.text_length
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.batch_size, size, size, 3), np.float32, sharding=trainer.batch_sharding
        ),
        "tokens": jax.ShapeDtypeStruct(
            (config.batch_size, length), np.int32, sharding=trainer.batch_sharding
        ),
    }
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        compiled = trainer.step.lower(trainer.abstract_state, batch, NO_CEILING).compile()
    compile_s = time.perf_counter() - start
    stats = common.compiled_stats(compiled)
    model = flops.model_flops(config, config.batch_size)
    n = len(jax.devices())
    abstract = trainer.abstract_state
    result = {
        "model": name,
        "devices": n,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True)),
        "global_batch": int(config.batch_size),
        "overrides": list(args.override),
        "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
        "state_bytes_per_device": shard_bytes(abstract),
        "state_bytes_total": int(
            sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
        ),
        "argument_bytes": stats["argument_bytes"],
        "temp_bytes": stats["temp_bytes"],
        "output_bytes": stats["output_bytes"],
        "alias_bytes": stats["alias_bytes"],
        "xla_flops_per_device": stats["xla_flops"],
        "model_flops_per_step": model["train_per_step"],
        "model_flops_per_device": model["train_per_step"] / n,
        "model_forward_flops_per_sample": model["forward_per_sample"],
        "compile_s": round(compile_s, 2),
    }
    print_report(result)
    return result


def print_report(r: dict) -> None:
    hb = common.human_bytes
    mesh = " × ".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"{r['model']}: {r['param_count'] / 1e6:.1f}M params, global batch {r['global_batch']}")
    print(f"mesh {mesh} ({r['devices']} devices); overrides {r['overrides'] or 'none'}")
    print(f"compiled in {r['compile_s']:.1f} s; per device:")
    print(f"  train state   {hb(r['state_bytes_per_device'])} (of {hb(r['state_bytes_total'])})")
    print(f"  arguments     {hb(r['argument_bytes'])}")
    print(f"  temporaries   {hb(r['temp_bytes'])}")
    print(f"  outputs       {hb(r['output_bytes'])}")
    print(
        f"  FLOPs         XLA {r['xla_flops_per_device']:.3e}, "
        f"model {r['model_flops_per_device']:.3e}"
    )
    print(f"model forward FLOPs per sample: {r['model_forward_flops_per_sample'] / 1e9:.2f} G")
