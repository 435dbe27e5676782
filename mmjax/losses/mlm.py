"""Masked language modelling (BERT, Devlin et al., 2019), e.g. on text conditioned on an image.

Each eligible token is chosen with probability `prob`; a chosen token is replaced by [MASK] with
probability 0.8, by a random token with 0.1 and left as is with 0.1, and must be predicted in all
three cases (so the model cannot assume an unmasked token is always correct). Special tokens
(CLS, SEP, PAD, ...) are never chosen. Shapes stay static: the loss is a weighted mean over all
positions, the chosen ones weighted 1.
"""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.losses.reduce import masked_mean


def _random_regular_tokens(
    rng: jax.Array, shape: tuple[int, ...], vocab_size: int, excluded: np.ndarray
) -> jax.Array:
    """Uniform over [0, vocab_size) minus the sorted `excluded` ids, without a vocab-sized table.

    Draw r uniform over the n allowed ranks; the r-th allowed id is a_r = r + #{excluded < a_r},
    and since e_k - k (the number of allowed ids below the k-th excluded e_k) is non-decreasing,
    #{excluded < a_r} = #{k : e_k - k <= r}, one searchsorted over a few entries.
    """
    n_allowed = vocab_size - len(excluded)
    r = jax.random.randint(rng, shape, 0, n_allowed, dtype=jnp.int32)
    below_K = jnp.asarray(excluded - np.arange(len(excluded)), jnp.int32)
    return r + jnp.searchsorted(below_K, r, side="right").astype(jnp.int32)


def mask_tokens(
    tokens_BL: jax.Array,
    rng: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    word_ids_BL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT masking. Returns `(inputs_BL, targets_BL, weights_BL)`:

    * inputs: tokens with the chosen positions replaced (80% [MASK], 10% random, 10% kept);
    * targets: the original token at chosen positions, 0 elsewhere (ignored there);
    * weights: float32, 1 at chosen positions, else 0.

    `special_ids` (include the pad id) and `mask_id` are never chosen and never drawn as
    random replacements. The arguments other than the arrays are static (Python numbers).

    Whole-word masking: with `word_ids_BL` (int, in [0, L), equal for the tokens of one word)
    words rather than tokens are chosen with probability `prob`, and every eligible token of a
    chosen word is. With sub-word tokens (bytes, word pieces) a half-masked word can be completed
    from its visible part; masking it whole makes the model use the context (e.g. the image).
    """
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"bad rates prob={prob} mask_frac={mask_frac} random_frac={random_frac}")
    excluded = np.asarray(sorted({int(i) for i in special_ids} | {int(mask_id)}), np.int64)
    excluded = excluded[(excluded >= 0) & (excluded < vocab_size)]
    if len(excluded) >= vocab_size:
        raise ValueError("no regular token left to draw random replacements from")
    k_choose, k_action, k_random = jax.random.split(rng, 3)
    eligible_BL = ~jnp.isin(tokens_BL, jnp.asarray(excluded, tokens_BL.dtype))
    u_choose_BL = jax.random.uniform(k_choose, tokens_BL.shape)
    if word_ids_BL is not None:  # every token of a word reads the same draw: its word's
        u_choose_BL = jnp.take_along_axis(u_choose_BL, word_ids_BL.astype(jnp.int32), axis=1)
    chosen_BL = eligible_BL & (u_choose_BL < prob)
    u_BL = jax.random.uniform(k_action, tokens_BL.shape)
    to_mask_BL = chosen_BL & (u_BL < mask_frac)
    to_random_BL = chosen_BL & (u_BL >= mask_frac) & (u_BL < mask_frac + random_frac)
    random_BL = _random_regular_tokens(k_random, tokens_BL.shape, vocab_size, excluded)
    inputs_BL = jnp.where(to_random_BL, random_BL.astype(tokens_BL.dtype), tokens_BL)
    inputs_BL = jnp.where(to_mask_BL, jnp.asarray(mask_id, tokens_BL.dtype), inputs_BL)
    targets_BL = jnp.where(chosen_BL, tokens_BL, jnp.zeros_like(tokens_BL))
    return inputs_BL, targets_BL, chosen_BL.astype(jnp.float32)


def mlm_loss(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array) -> jax.Array:
    """Scalar mean cross-entropy over weighted positions, float32:

    Σ_bl w_bl (logsumexp_v z_blv - z_bl[t_bl]) / Σ_bl w_bl,   0 when no position is weighted.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    target_logit_BL = jnp.take_along_axis(
        logits_BLV, targets_BL.astype(jnp.int32)[..., None], axis=-1
    )[..., 0]
    nll_BL = jax.nn.logsumexp(logits_BLV, axis=-1) - target_logit_BL
    return masked_mean(nll_BL, weights_BL)
