"""GradCache: contrastive gradients of a large global batch with microbatch activation memory.

A contrastive loss couples every example with every other one, so plain gradient accumulation
(averaging per-microbatch losses) would shrink the set of negatives to one microbatch. GradCache
(Gao et al., 2021) splits the computation at the embeddings instead:

1. run the towers over each microbatch *without* keeping activations, collecting the embeddings
   of the whole global batch;
2. compute the loss over the global batch and its gradient w.r.t. the embeddings (cheap: no tower);
3. run each microbatch again with `jax.vjp`, feeding it its slice of the embedding gradients,
   and sum the parameter gradients.

The result is the big-batch gradient up to float summation order, at the cost of one extra tower
forward pass; peak activation memory is that of one microbatch (`lax.scan` over microbatches).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# (params, batch) -> (img_BE, txt_BE, aux): the towers.
EmbedFn = Callable[[dict, dict], tuple[jax.Array, jax.Array, dict]]
# (img_BE, txt_BE, aux) -> (scalar loss, logs): the loss over the global batch.
LossFn = Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, dict]]
# The aux entry holding per-example arrays ([B, ...], e.g. a teacher's embeddings): merged over
# microbatches like the embeddings. Every other aux entry is a per-microbatch scalar.
PER_EXAMPLE = "per_example"


def split_microbatches(x_B: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with microbatch m = rows m, m+k, m+2k, ...

    Strided rather than contiguous: each device's block of rows contributes b/k rows to every
    microbatch, so microbatches stay evenly sharded and splitting moves no data between devices.
    """
    b = x_B.shape[0]
    if b % k:
        raise ValueError(f"batch {b} is not divisible into {k} microbatches")
    x_Nk = x_B.reshape(b // k, k, *x_B.shape[1:])
    x_kN = jnp.swapaxes(x_Nk, 0, 1)
    return nn.with_logical_constraint(x_kN, (None, "batch") + (None,) * (x_B.ndim - 1))


def merge_microbatches(x_kN: jax.Array) -> jax.Array:
    """Inverse of `split_microbatches`: the rows come back in their original order."""
    k, n = x_kN.shape[:2]
    x_B = jnp.swapaxes(x_kN, 0, 1).reshape(k * n, *x_kN.shape[2:])
    return nn.with_logical_constraint(x_B, ("batch",) + (None,) * (x_B.ndim - 1))


def value_and_grad(
    embed: EmbedFn, loss: LossFn, params: dict, batch: dict, microbatches: int
) -> tuple[tuple[jax.Array, dict], dict]:
    """`jax.value_and_grad(lambda p: loss(*embed(p, batch)), has_aux=True)(params)`, computed
    with the towers run over `microbatches` slices of the batch."""
    k = microbatches
    batch_k = jax.tree.map(lambda x: split_microbatches(x, k), batch)

    def embed_one(_, microbatch):
        return None, embed(params, microbatch)

    _, (img_kNE, txt_kNE, aux_k) = jax.lax.scan(embed_one, None, batch_k)
    img_BE, txt_BE = merge_microbatches(img_kNE), merge_microbatches(txt_kNE)
    # Every other aux entry (temperature, bias, embedding norms) is a per-microbatch scalar; the
    # mean over equal microbatches is its big-batch value (temperature and bias are equal in all).
    scalars_k = {name: a for name, a in aux_k.items() if name != PER_EXAMPLE}
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), scalars_k)
    if PER_EXAMPLE in aux_k:
        aux[PER_EXAMPLE] = jax.tree.map(merge_microbatches, aux_k[PER_EXAMPLE])

    (value, logs), (g_img_BE, g_txt_BE, g_aux) = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True
    )(img_BE, txt_BE, aux)
    g_img_kNE = split_microbatches(g_img_BE, k)
    g_txt_kNE = split_microbatches(g_txt_BE, k)
    g_scalars = {name: g / k for name, g in g_aux.items() if name != PER_EXAMPLE}  # d mean/d a_m
    g_per_example_k = jax.tree.map(lambda g: split_microbatches(g, k), g_aux.get(PER_EXAMPLE))

    def backprop_one(grads, xs):
        microbatch, g_img_NE, g_txt_NE, g_per_example = xs
        _, pullback = jax.vjp(lambda p: embed(p, microbatch), params)
        g_aux_one = dict(g_scalars)
        if g_per_example is not None:
            g_aux_one[PER_EXAMPLE] = g_per_example
        (g_params,) = pullback((g_img_NE, g_txt_NE, g_aux_one))
        return jax.tree.map(jnp.add, grads, g_params), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (batch_k, g_img_kNE, g_txt_kNE, g_per_example_k)
    grads, _ = jax.lax.scan(backprop_one, zeros, xs)
    return (value, logs), grads
