"""Image–text matching (ITM) with in-batch hard negatives, ALBEF-style (Li et al., 2021).

A fusion model scores (image, text) pairs as match / no match. Random in-batch pairs are too easy,
so each image is paired with a *hard* text (one the contrastive towers find similar) and each text
with a hard image. Everything works on static shapes: the ITM batch is always 3B pairs

    [ (i, i) for i in B ]            label 1  (positives)
    [ (i, hard_text[i]) for i in B ] label 0
    [ (hard_image[j], j) for j in B ] label 0

laid out as index arrays, and padded / degenerate rows get weight 0 instead of being removed:

    neg_txt_B, neg_img_B = mine_hard_negatives(sim_BB, rng, mask_B=mask_B)
    img_idx_N, txt_idx_N, labels_N, weights_N = itm_batch_indices(neg_txt_B, neg_img_B, mask_B)
    img_N, txt_N = take_pairs(img_feats, txt_feats, img_idx_N, txt_idx_N)
    loss = masked_mean(itm_loss(fusion(img_N, txt_N), labels_N), weights_N)
"""

import jax
import jax.numpy as jnp


def mine_hard_negatives(
    sim_BB: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    mask_B: jax.Array | None = None,
    positive_BB: jax.Array | None = None,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One hard negative text per image and one hard negative image per text.

    `sim_BB[i, j]` is the similarity of image i and text j (row i of the batch is a pair). For
    image i the negative text is drawn with

        P(j | i) = softmax_j(sim[i, j] / temperature)  over admissible j,

    and for text j the negative image with P(i | j) = softmax_i(sim[i, j] / temperature). The
    diagonal is never admissible, nor are pairs marked in `positive_BB` (e.g. several captions
    of one image in the batch), nor examples with `mask_B` False. `greedy=True` takes the argmax
    instead of sampling (`rng` may then be None). Sampling uses the Gumbel-max trick of
    `jax.random.categorical`, so it is deterministic given `rng` and excluded entries (-inf)
    are never drawn. No gradient flows into `sim_BB`: the choice of negatives is not trained.

    A row with no admissible candidate (batch of one, padded anchor, everything excluded) gets
    its own index, which `itm_batch_indices` recognises and weights 0.
    Returns `(neg_text_idx_B, neg_image_idx_B)`, int32.
    """
    sim_BB = jax.lax.stop_gradient(sim_BB).astype(jnp.float32)
    b = sim_BB.shape[0]
    if sim_BB.shape != (b, b):
        raise ValueError(f"sim_BB must be square, got {sim_BB.shape}")
    allowed_BB = ~jnp.eye(b, dtype=bool)
    if positive_BB is not None:
        allowed_BB &= ~positive_BB.astype(bool)
    if mask_B is not None:
        valid_B = mask_B.astype(bool)
        allowed_BB &= valid_B[:, None] & valid_B[None, :]
    logits_BB = sim_BB / temperature
    # Rows of the second matrix are texts: column j of the image→text matrix.
    i2t_BB = jnp.where(allowed_BB, logits_BB, -jnp.inf)
    t2i_BB = jnp.where(allowed_BB.T, logits_BB.T, -jnp.inf)
    if greedy:
        neg_txt_B = jnp.argmax(i2t_BB, axis=1)
        neg_img_B = jnp.argmax(t2i_BB, axis=1)
    else:
        if rng is None:
            raise ValueError("mine_hard_negatives needs an rng unless greedy=True")
        k_txt, k_img = jax.random.split(rng)
        neg_txt_B = jax.random.categorical(k_txt, i2t_BB, axis=1)
        neg_img_B = jax.random.categorical(k_img, t2i_BB, axis=1)
    self_B = jnp.arange(b, dtype=jnp.int32)
    neg_txt_B = jnp.where(jnp.any(allowed_BB, axis=1), neg_txt_B.astype(jnp.int32), self_B)
    neg_img_B = jnp.where(jnp.any(allowed_BB, axis=0), neg_img_B.astype(jnp.int32), self_B)
    return neg_txt_B, neg_img_B


def itm_batch_indices(
    neg_text_idx_B: jax.Array, neg_image_idx_B: jax.Array, mask_B: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The 3B-pair ITM layout (see the module docstring) as index arrays.

    Returns `(image_idx_N, text_idx_N, labels_N, weights_N)` with N = 3B, labels int32 (1 match,
    0 no match) and float32 weights: a positive counts if its example is valid, a negative if
    both its examples are valid and the negative is not the anchor itself (no candidate found).
    """
    b = neg_text_idx_B.shape[0]
    self_B = jnp.arange(b, dtype=jnp.int32)
    neg_text_idx_B = neg_text_idx_B.astype(jnp.int32)
    neg_image_idx_B = neg_image_idx_B.astype(jnp.int32)
    valid_B = jnp.ones((b,), bool) if mask_B is None else mask_B.astype(bool)
    image_idx_N = jnp.concatenate([self_B, self_B, neg_image_idx_B])
    text_idx_N = jnp.concatenate([self_B, neg_text_idx_B, self_B])
    labels_N = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    ok_txt_B = valid_B & valid_B[neg_text_idx_B] & (neg_text_idx_B != self_B)
    ok_img_B = valid_B & valid_B[neg_image_idx_B] & (neg_image_idx_B != self_B)
    weights_N = jnp.concatenate([valid_B, ok_txt_B, ok_img_B]).astype(jnp.float32)
    return image_idx_N, text_idx_N, labels_N, weights_N


def use_extra_text_negatives(
    text_idx_N: jax.Array, weights_N: jax.Array, use_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The 3B-pair layout with image i's negative text replaced by text B + i where `use_B[i]`
    (a second set of B texts after the batch's own, e.g. its captions with one word swapped:
    `mmjax.data.word_swap`). Such a pair counts as a negative whenever image i is a counted
    positive. Returns `(text_idx_N, weights_N)`."""
    b = use_B.shape[0]
    use_B = use_B.astype(bool)
    own_B = jnp.arange(b, dtype=jnp.int32) + b
    text_idx_N = text_idx_N.at[b : 2 * b].set(jnp.where(use_B, own_B, text_idx_N[b : 2 * b]))
    weights_N = weights_N.at[b : 2 * b].set(jnp.where(use_B, weights_N[:b], weights_N[b : 2 * b]))
    return text_idx_N, weights_N


def take_pairs(image_feats, text_feats, image_idx_N: jax.Array, text_idx_N: jax.Array):
    """Gathers the paired inputs of the fusion model along the batch axis (axis 0 of every leaf,
    so token features and their padding masks travel together)."""
    take = lambda idx: lambda x: jnp.take(x, idx, axis=0)
    return jax.tree.map(take(image_idx_N), image_feats), jax.tree.map(take(text_idx_N), text_feats)


def itm_loss(logits: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Per-pair ITM cross-entropy `[N]`, float32.

    * `logits_N2` (2-way head, class 1 = match): -log softmax(logits)[label];
    * `logits_N` (one logit z): binary cross-entropy -[y log σ(z) + (1-y) log σ(-z)].
    Reduce with `masked_mean(loss_N, weights_N)`.
    """
    logits = logits.astype(jnp.float32)
    labels_N = labels_N.astype(jnp.int32)
    if logits.ndim == 2 and logits.shape[1] == 2:
        log_p_N2 = jax.nn.log_softmax(logits, axis=1)
        return -jnp.take_along_axis(log_p_N2, labels_N[:, None], axis=1)[:, 0]
    if logits.ndim == 1:
        y_N = labels_N.astype(jnp.float32)
        return -(y_N * jax.nn.log_sigmoid(logits) + (1.0 - y_N) * jax.nn.log_sigmoid(-logits))
    raise ValueError(f"ITM logits must be [N, 2] or [N], got {logits.shape}")
