"""Sampling image codes from the text→image prior: temperature, top-k, top-p and classifier-free
guidance, in one compiled loop over the N image positions.

With the cache (the default), the text prefix runs once (one `decode` call over its L tokens,
which creates the key/value caches of `decoding`), then `lax.scan` feeds one sampled code per
step at its position; nothing is recompiled per token and no prefix is run twice. Without
(`cache=False`), every step reruns the prior on the whole [text; codes so far] buffer and reads
the logits at its position: the reference the cached sampler must equal, and the slow side of
`python -m mmjax.bench decode --text-to-image`.

Classifier-free guidance (`guidance` g): the prior also sees the unconditional prompt (the empty
caption it was trained on with probability `text_to_image.text_drop_prob`); each step samples
from logits u + g·(c − u) of the conditional c and unconditional u rows, and feeds the same code
to both. g = 1 is the conditional model (no unconditional rows are run); g = 0 is the
unconditional one.

Randomness: step i draws with `fold_in(key, i)`, so a (key, prompt) pair gives the same codes
with and without the cache, on any mesh (with `jax_threefry_partitionable`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.models import decoding
from mmjax.models.image_prior import TextImagePrior

_NEG = -1e30  # a removed token's logit: finite, so a row never becomes NaN


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1 = off; guidance 1 = none."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.guidance < 0:
            raise ValueError(
                f"sampling: temperature {self.temperature} and top_k {self.top_k} must be >= 0, "
                f"top_p {self.top_p} in (0, 1], guidance {self.guidance} >= 0"
            )


def filter_logits(logits_BC: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """float32 logits with every token outside the top k (k > 0) and outside the smallest set
    whose probability reaches top_p (< 1) set to a large negative number. The most likely
    token always stays."""
    logits_BC = logits_BC.astype(jnp.float32)
    if top_k > 0 and top_k < logits_BC.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BC, top_k)[0][:, -1:]
        logits_BC = jnp.where(logits_BC < kth_B1, _NEG, logits_BC)
    if top_p < 1.0:
        sorted_BC = jnp.sort(logits_BC, axis=-1)[:, ::-1]
        probs_BC = jax.nn.softmax(sorted_BC, axis=-1)
        # A token stays if the probability of the tokens before it is below top_p.
        before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
        kept_B = jnp.sum(before_BC < top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BC, kept_B - 1, axis=-1)
        logits_BC = jnp.where(logits_BC < cutoff_B1, _NEG, logits_BC)
    return logits_BC


def choose(logits_BC: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One code per row, int32 [B]."""
    if s.temperature == 0:
        return jnp.argmax(logits_BC, axis=-1).astype(jnp.int32)
    logits_BC = filter_logits(logits_BC.astype(jnp.float32) / s.temperature, s.top_k, s.top_p)
    return jax.random.categorical(key, logits_BC, axis=-1).astype(jnp.int32)


def guide(logits_RC: jax.Array, batch: int, guidance: float) -> jax.Array:
    """[B, C] logits: the rows themselves (guidance 1), or u + g·(c − u) of the conditional rows
    0..B-1 and the unconditional rows B..2B-1."""
    if guidance == 1.0:
        return logits_RC
    cond_BC, uncond_BC = logits_RC[:batch], logits_RC[batch:]
    return uncond_BC + guidance * (cond_BC - uncond_BC)


def sample_codes(
    prior: TextImagePrior,
    params: dict,
    text_BL: jax.Array,
    key: jax.Array,
    sampling: Sampling,
    uncond_L: jax.Array | None = None,
    cache: bool = True,
) -> jax.Array:
    """Image codes int32 [B, N] for the prompts `text_BL` (tokenised, length L). `uncond_L`:
    the unconditional prompt's tokens, needed when `sampling.guidance` != 1. Jit it (shapes are
    static; one compile per batch size)."""
    b, length = text_BL.shape
    n, offset = prior.image_tokens, prior.text_vocab
    rows_RL = text_BL
    if sampling.guidance != 1.0:
        if uncond_L is None:
            raise ValueError("classifier-free guidance needs the unconditional prompt uncond_L")
        rows_RL = jnp.concatenate([text_BL, jnp.broadcast_to(uncond_L, text_BL.shape)])
    r = rows_RL.shape[0]
    seq_RS = jnp.concatenate([rows_RL, jnp.zeros((r, n), jnp.int32)], axis=1).astype(jnp.int32)

    def full_logits(seq_RS, t):  # the image logits after position t, no cache
        out = prior.apply({"params": params}, seq_RS, method=TextImagePrior.full_image_logits)
        return jax.lax.dynamic_index_in_dim(out, t, axis=1, keepdims=False)

    if cache:
        logits_RTC, kv = decoding.apply_cached(
            prior, params, None, rows_RL, 0, method=TextImagePrior.decode
        )
        first_RC = logits_RTC[:, -1]
    else:
        first_RC, kv = full_logits(seq_RS, length - 1), None

    def step(carry, i):
        logits_RC, seq_RS, kv = carry
        code_B = choose(
            guide(logits_RC, b, sampling.guidance), jax.random.fold_in(key, i), sampling
        )
        code_R = jnp.tile(code_B, r // b)
        t = length + i  # the position the code is written to
        seq_RS = jax.lax.dynamic_update_slice(seq_RS, (code_R + offset)[:, None], (0, t))
        if cache:
            out, kv = decoding.apply_cached(
                prior, params, kv, (code_R + offset)[:, None], t, method=TextImagePrior.decode
            )
            logits_RC = out[:, 0]
        else:
            logits_RC = full_logits(seq_RS, t)
        return (logits_RC, seq_RS, kv), code_B

    # The last code's step also computes logits nobody reads: one wasted position of N, for
    # a loop body that is the same at every step.
    _, codes_NB = jax.lax.scan(step, (first_RC, seq_RS, kv), jnp.arange(n))
    return codes_NB.T
