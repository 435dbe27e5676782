"""`python -m mmjax.bench loss`: per-device memory of one contrastive-loss variant, fwd + bwd.

Compiles (never runs) `jax.value_and_grad` of the mean loss w.r.t. images, texts, scale and bias
for `--devices` fake CPU devices on a `data`-only mesh, with `--local-batch` examples of
`--dim`-wide embeddings per device, and reads XLA's per-device memory analysis. That
is how the three implementations of `losses.contrastive_loss_sharded` scale with the device
count at a fixed local batch: the naive global-logits loss and `gathered` grow with it, the
`chunked` ring must not.

Returned (and, with `--json`, printed) keys:
  devices, local_batch, global_batch (= devices × local_batch), dim, impl, kind: the setting;
  temp_bytes: per-device scratch memory of the compiled program (activations, logits blocks,
    ring buffers): the number that shows the scaling;
  argument_bytes, output_bytes: per-device bytes of the program's inputs (the local shards of the
    embeddings, the scalars) and outputs (loss and gradients), None where XLA does not say;
  compile_s: seconds to lower and compile.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import losses, parallel
from mmjax.bench import common


def compile_loss_step(devices: int, local_batch: int, dim: int, impl: str, kind: str):
    """The compiled fwd+bwd of the mean loss, and the seconds it took to lower and compile."""
    if jax.device_count() != devices:
        raise RuntimeError(
            f"asked for {devices} devices but JAX sees {jax.device_count()}; run through "
            "`python -m mmjax.bench loss`, which sets the fake CPU device count first"
        )
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=devices, fsdp=1, tensor=1)))
    batch_axes = ("data", "fsdp")
    global_batch = devices * local_batch
    batch_sharded = NamedSharding(mesh, PartitionSpec(batch_axes))
    replicated = NamedSharding(mesh, PartitionSpec())
    emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=batch_sharded)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)

    def mean_loss(img_BE, txt_BE, scale, bias):
        per_example_B = losses.contrastive_loss_sharded(
            kind, impl, img_BE, txt_BE, scale, bias, mesh=mesh, batch_axes=batch_axes
        )
        return jnp.mean(per_example_B)

    # Gradients come out sharded like their inputs, as in a train step; left to itself GSPMD may
    # return replicated embedding gradients and bill every device for the global batch.
    out_shardings = (replicated, (batch_sharded, batch_sharded, replicated, replicated))
    step = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3)), out_shardings=out_shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(emb, emb, scalar, scalar).compile()
    return compiled, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    compiled, compile_s = compile_loss_step(
        args.devices, args.local_batch, args.dim, args.impl, args.kind
    )
    stats = common.compiled_stats(compiled)
    result = {
        "devices": args.devices,
        "local_batch": args.local_batch,
        "global_batch": args.devices * args.local_batch,
        "dim": args.dim,
        "impl": args.impl,
        "kind": args.kind,
        "temp_bytes": stats["temp_bytes"],
        "argument_bytes": stats["argument_bytes"],
        "output_bytes": stats["output_bytes"],
        "compile_s": round(compile_s, 3),
    }
    print(
        f"loss {args.kind}/{args.impl}: {args.devices} devices × local batch {args.local_batch}"
        f" (global {result['global_batch']}), dim {args.dim} | per device: temp "
        f"{common.human_bytes(result['temp_bytes'])}, arguments "
        f"{common.human_bytes(result['argument_bytes'])}, outputs "
        f"{common.human_bytes(result['output_bytes'])} | compiled in {compile_s:.2f} s"
    )
    return result
