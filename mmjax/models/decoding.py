"""Autoregressive decoding with static shapes: the key/value caches that attention layers keep
in flax variable collections, and greedy / beam search over a per-position step function.

The caches. A causal self-attention layer called with `cache_position`
(`layers.Attention`, also through `cross_attention.CrossBlock`) writes the keys and
values of its T new tokens into slots position..position+T-1 of preallocated [B, S, H, K]
arrays (`lax.dynamic_update_slice`; the cache length S is fixed when the cache is created) in
the collection CACHE, and its queries read every slot up to their own. A cross-attention layer
in decoding (`cross_attention.CrossAttention` with `cache_context`) projects its context to keys
and values once, on the call that creates the cache, into the collection CONTEXT, and reads them
back afterwards. Parameters are untouched: a model trained without a cache decodes with one.

A decoder built from these layers decodes position by position with `apply_cached`: its first
call (no cache yet) creates the cache, later calls read and update it, inside one compiled loop
(`beam_search`), so nothing is recompiled per token and no prefix is run twice.

Shapes: N sequences (batch·beam), L = S the decoded length, V vocabulary; B/T/S/H/K as in
layers.py.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

CACHE = "cache"  # per-sequence keys/values of the tokens so far: beams reorder them
CONTEXT = "context_cache"  # keys/values of the conditioning input: shared by an example's beams
COLLECTIONS = (CACHE, CONTEXT)

# step_fn(tokens_NL, t, cache) -> (float32 logits [N, V] of the token after position t, cache)
StepFn = Callable[[jax.Array, jax.Array | int, dict | None], tuple[jax.Array, dict | None]]


def append_keys(
    module: nn.Module,
    k_BTHK: jax.Array,
    v_BTHK: jax.Array,
    mask_BTS: jax.Array | None,
    causal: bool,
    position: jax.Array | int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes the keys and values of T tokens at positions position.. into `module`'s cache and
    returns the whole cache (k_BSHK, v_BSHK) with the mask of the slots each query may read:
    `mask_BTS` (which spans the S cache slots; its length creates the cache) and the causal
    constraint slot <= position + query index. Only a `causal` layer can decode this way."""
    if not causal:
        raise ValueError("decoding with a cache (cache_position) needs causal=True")
    if mask_BTS is None:
        raise ValueError(
            "decoding with a cache needs mask_BTS over the cache slots [B, T, S] (S, the cache "
            "length, is its last dimension); all True where every slot is a valid key"
        )
    b, t = k_BTHK.shape[:2]
    s = mask_BTS.shape[-1]
    key = module.variable(CACHE, "key", jnp.zeros, (b, s, *k_BTHK.shape[2:]), k_BTHK.dtype)
    value = module.variable(CACHE, "value", jnp.zeros, (b, s, *v_BTHK.shape[2:]), v_BTHK.dtype)
    start = (0, position, 0, 0)
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTHK.astype(key.value.dtype), start)
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTHK.astype(value.value.dtype), start)
    causal_TS = jnp.arange(s)[None, :] <= position + jnp.arange(t)[:, None]
    return key.value, value.value, jnp.logical_and(mask_BTS, causal_TS[None])


def context_keys(module: nn.Module, project: Callable[[], jax.Array]) -> jax.Array:
    """`project()` (keys and values of the context), computed on the call that creates the
    cache and read from `module`'s CONTEXT cache on every later call (`project` is not run
    then, so the context passed to later calls is not read)."""
    return module.variable(CONTEXT, "kv", project).value


def apply_cached(model: nn.Module, params, cache: dict | None, *args, method=None) -> tuple:
    """(output, cache): `model.apply` of `method` in decoding mode, with the caches of an earlier
    call (`cache`), or None on the first call, which creates them."""
    variables = {"params": params, **(cache or {})}
    out, cache = model.apply(variables, *args, method=method, mutable=list(COLLECTIONS))
    return out, dict(cache)


def reorder(cache: dict | None, rows_N: jax.Array) -> dict | None:
    """The cache with row n of every CACHE array taken from row `rows_N[n]` (the beams chosen
    at a step). CONTEXT rows stay: every beam of an example has the same conditioning input."""
    if not cache or CACHE not in cache:
        return cache
    # "clip": the rows are in range, and the default out-of-range fill is an extra pass.
    take = lambda x: jnp.take(x, rows_N, axis=0, mode="clip")
    return {**cache, CACHE: jax.tree.map(take, cache[CACHE])}


def prefix_step(logits_fn: Callable[[jax.Array], jax.Array]) -> StepFn:
    """A step function without a cache: `logits_fn(tokens_NL)` -> float32 [N, L, V] runs the
    decoder on the whole buffer, and the step reads position t. Every step reruns the prefix:
    the reference the cached decoding must equal."""
    return lambda tokens_NL, t, cache: (logits_fn(tokens_NL)[:, t], cache)


def beam_search(
    step_fn: StepFn,
    batch: int,
    length: int,
    beam: int,
    bos: int,
    eot: int,
    pad: int,
    all_beams: bool = False,
):
    """Beam search with static shapes over `step_fn` (see StepFn) for N = batch·beam sequences
    (row b·beam + k is beam k of example b).

    Every sequence starts [BOS, PAD, ...]; at step t the token at t + 1 is chosen. A beam is
    finished once it emits EOT: it then only extends with PAD at no cost. Beams are ranked by
    their summed log-probability (no length normalisation: the captions here have similar
    lengths, and a finished beam keeps its score). Step 0 runs before the loop with cache None
    (a cached step function creates its cache there); the loop carries the cache, reordered
    with the chosen beams. Returns (tokens [batch, length] of the best beam, its log-probability
    [batch]); with `all_beams`, every beam, best first (tokens [batch, beam, length], scores
    [batch, beam]: what a rescorer reranks). `beam=1` is greedy decoding.
    """
    if length < 2:
        raise ValueError(f"decoding needs length >= 2 (BOS and one token), got {length}")
    tokens = jnp.full((batch, beam, length), pad, jnp.int32).at[:, :, 0].set(bos)
    # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
    scores = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)
    finished = jnp.zeros((batch, beam), bool)

    def step(t, carry):
        tokens, scores, finished, cache = carry
        logits, cache = step_fn(tokens.reshape(batch * beam, length), t, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(batch, beam, -1)
        v = logp.shape[-1]
        only_pad = jnp.where(jnp.arange(v) == pad, 0.0, -jnp.inf)
        logp = jnp.where(finished[..., None], only_pad, logp)
        total = (scores[..., None] + logp).reshape(batch, beam * v)
        scores, flat = jax.lax.top_k(total, beam)
        parent, token = flat // v, (flat % v).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
        tokens = tokens.at[:, :, t + 1].set(token)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (token == eot)
        if beam > 1:  # greedy: every parent is the row itself
            cache = reorder(cache, (jnp.arange(batch)[:, None] * beam + parent).reshape(-1))
        return tokens, scores, finished, cache

    carry = step(0, (tokens, scores, finished, None))
    tokens, scores, _, _ = jax.lax.fori_loop(1, length - 1, step, carry)
    if all_beams:
        return tokens, scores
    return tokens[:, 0], scores[:, 0]  # top_k keeps beams sorted: beam 0 is the best


def search_on_context(
    model: nn.Module,
    params,
    context_BSE: jax.Array,
    length: int,
    beam: int,
    bos: int,
    eot: int,
    pad: int,
    cache: bool = True,
    all_beams: bool = False,
):
    """`beam_search` (same returns) of a decoder conditioned on `context_BSE` (image or audio
    tokens) through its methods `decode_step(context, tokens, position)`, one position from the
    key/value caches, and `decoder_logits(context, tokens)`, teacher-forced: with `cache` each
    position runs on its one new token; without, the whole prefix is rerun at every position
    (`prefix_step`, the reference the cached decoding equals)."""
    context_NSE = jnp.repeat(context_BSE, beam, axis=0)  # row b·beam + k: beam k of example b
    if cache:
        method = type(model).decode_step
        step = lambda tokens_NL, t, c: apply_cached(
            model, params, c, context_NSE, tokens_NL, t, method=method
        )
    else:
        method = type(model).decoder_logits
        step = prefix_step(
            lambda tokens_NL: model.apply({"params": params}, context_NSE, tokens_NL, method=method)
        )
    batch = context_BSE.shape[0]
    return beam_search(step, batch, length, beam, bos, eot, pad, all_beams=all_beams)
