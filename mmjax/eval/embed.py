"""Embedding a whole split on the training mesh, with padding so no example is lost."""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import parallel


def embed_all(
    encode: Callable[[dict, jax.Array], jax.Array],
    params: dict,
    inputs: np.ndarray,
    batch_size: int,
    sharding: NamedSharding,
) -> np.ndarray:
    """Runs `encode(params, batch)` over `inputs` in batches of `batch_size` rows and returns the
    L2-normalised float32 embeddings of every row, in order. `encode` must be jitted with a
    replicated output sharding so that every process can read the whole result.

    The last partial batch is padded (with copies of row 0) up to `batch_size` so that one compiled
    shape serves all batches; the padded rows are dropped from the result, never counted. Every
    process passes the same `inputs`; each contributes its own slice of every batch.
    """
    n = len(inputs)
    dp = parallel.data_parallel_size(sharding.mesh)
    batch_size = max(dp, batch_size // dp * dp)
    nproc, pid = jax.process_count(), jax.process_index()
    local = batch_size // nproc
    out = []
    for start in range(0, n, batch_size):
        chunk = inputs[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        arr = jax.make_array_from_process_local_data(
            sharding, chunk[pid * local : (pid + 1) * local]
        )
        emb = encode(params, arr)
        emb = np.asarray(jax.device_get(emb))
        out.append(emb[: batch_size - pad])
    emb = np.concatenate(out).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def jit_encoder(apply_fn: Callable, sharding: NamedSharding) -> Callable:
    """Jits `apply_fn(params, inputs)` with a replicated output, as `embed_all` needs."""
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.jit(apply_fn, out_shardings=replicated)
