"""Contrastive losses over a batch sharded across devices, with `jax.shard_map`.

The naive losses in `contrastive.py` let GSPMD partition a global B×B logits matrix; how much of it
lands on one device is up to the partitioner. The variants here fix the per-device memory by
construction, for local batch b = B / N on N data-parallel devices:

* `gathered`: every device all-gathers the other tower's embeddings and builds its b×B slab of
  logits (both directions for softmax). Memory O(b·B) = O(N·b²), so it still grows with N.
* `chunked`: a ring. Text chunks travel device to device with `ppermute`; each device only ever
  holds a b×b logits block and O(b·E) embeddings, so memory is O(b² + b·E) whatever N is, in the
  forward and, through a `custom_vjp` that runs the ring again and recomputes each block (as flash
  attention does), in the backward too.

All three give the same per-example float32 losses `[B]` (and gradients) as `contrastive.py`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmjax.losses import contrastive
from mmjax.losses.contrastive import KINDS

IMPLS = ("naive", "gathered", "chunked")

_HIGHEST = jax.lax.Precision.HIGHEST


def _similarity(a_bE, b_cE):
    return jnp.einsum("ie,je->ij", a_bE, b_cE, precision=_HIGHEST)


def _block_logits(img_bE, txt_cE, scale_b, bias_b=None):
    """Similarities and logits of local images against one chunk of texts, in float32. The
    arithmetic is the naive code's (dot, times scale, plus bias), so every logit is the same
    float32 number as in `contrastive.pairwise_logits`; results agree to rounding of the sums."""
    sim_bc = _similarity(img_bE, txt_cE)
    logits_bc = scale_b[:, None] * sim_bc
    if bias_b is not None:
        logits_bc = logits_bc + bias_b[:, None]
    return sim_bc, logits_bc


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


# ------------------------------------------------------------------------------------------------
# Gathered: all-gather the other tower, ordinary autodiff.


def _gathered_softmax(axes, img_bE, txt_bE, scale_b):
    # Each device needs the row LSE of its images (against every text) and the column LSE of its
    # texts (against every image), so it gathers both towers; the b×B slabs dominate memory.
    img_BE = jax.lax.all_gather(img_bE, axes, axis=0, tiled=True)
    txt_BE = jax.lax.all_gather(txt_bE, axes, axis=0, tiled=True)
    scale_B = jax.lax.all_gather(scale_b, axes, axis=0, tiled=True)
    _, row_logits_bB = _block_logits(img_bE, txt_BE, scale_b)
    # [j, i] = logit of image i with local text j; the scale belongs to the image, as in naive.
    col_logits_bB = scale_B[None, :] * _similarity(txt_bE, img_BE)
    b = img_bE.shape[0]
    offset = jax.lax.axis_index(axes) * b
    positive_b = jnp.diagonal(jax.lax.dynamic_slice_in_dim(row_logits_bB, offset, b, axis=1))
    lse_row_b = jax.nn.logsumexp(row_logits_bB, axis=1)
    lse_col_b = jax.nn.logsumexp(col_logits_bB, axis=1)
    return 0.5 * ((lse_row_b - positive_b) + (lse_col_b - positive_b))


def _gathered_sigmoid(axes, img_bE, txt_bE, scale_b, bias_b):
    # The sigmoid loss of example i only needs row i, so gathering the texts is enough.
    txt_BE = jax.lax.all_gather(txt_bE, axes, axis=0, tiled=True)
    _, logits_bB = _block_logits(img_bE, txt_BE, scale_b, bias_b)
    b, big_b = logits_bB.shape
    # The matching text of local row r sits at global column offset + r.
    offset = jax.lax.axis_index(axes) * b
    is_pos_bB = jnp.arange(big_b)[None, :] == (offset + jnp.arange(b))[:, None]
    labels_bB = jnp.where(is_pos_bB, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels_bB * logits_bB), axis=1)


# ------------------------------------------------------------------------------------------------
# Chunked: a ring of ppermutes inside a fori_loop, with a hand-written backward.
#
# Device d starts with its own ("home") text chunk d. Each of the N loop steps processes the chunk
# at hand and then sends it, with whatever travels along, to device d+1; so at step k device d
# holds chunk d-k, and after the N-th shift every chunk is home again with its accumulators. Only
# texts travel: the scale and bias of a logit belong to its image row, which never leaves. The
# matching pairs are all in the home block (step 0). Every step, the first included, is one loop
# iteration: a peeled first step would leave a single-iteration loop at N=2, which XLA inlines
# into a schedule with more b×b blocks alive at once (~40% more temp memory than at N≥4). The
# price is one redundant shift of the texts at the end of each pass (N transfers of b×E instead of
# the N-1 needed), which the accumulators travelling home need anyway in all but the sigmoid
# forward.


def _shift(axes, n, *xs):
    """Moves each array to the next device of the ring."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return tuple(jax.lax.ppermute(x, axes, perm) for x in xs)


def _filled(axes, like_b, value):
    """A vector shaped like `like_b` holding `value`, typed as varying over the ring axes like the
    loop carries it initialises (the shard_map type checker insists the two types agree)."""
    return jax.lax.pcast(jnp.full(like_b.shape, value, jnp.float32), axes, to="varying")


def _home_labels(step, b):
    """Labels of a block: +1 on the diagonal of the home block (the matching pairs), else -1."""
    is_pos_bb = (step == 0) & jnp.eye(b, dtype=bool)
    return jnp.where(is_pos_bb, 1.0, -1.0)


def _lse_update(m, s, logits_bc, axis):
    """Folds one block into a running log-sum-exp kept as (max, sum of exp(x - max)); rescaling
    the old sum by exp(old_max - new_max) keeps every exponent ≤ 0, so large scales cannot
    overflow. The first fold starts from (-inf, 0)."""
    m_new = jnp.maximum(m, jnp.max(logits_bc, axis=axis))
    fresh = jnp.sum(jnp.exp(logits_bc - jnp.expand_dims(m_new, axis)), axis=axis)
    return m_new, s * jnp.exp(m - m_new) + fresh


def _ring_softmax_fwd(axes, n, img_bE, txt_bE, scale_b):
    """Per-example losses plus the row / column LSE statistics the backward needs. They are kept
    as (max, sum) pairs rather than one LSE float: exp(z - max) / sum is what autodiff of the naive
    logsumexp computes, while exp(z - lse) would carry the rounding of a large lse (|lse| ~ scale)
    into every probability."""

    def step(k, carry):
        txt_cE, m_col, s_col, m_row, s_row, positive_b = carry
        _, logits_bc = _block_logits(img_bE, txt_cE, scale_b)
        positive_b = jnp.where(k == 0, jnp.diagonal(logits_bc), positive_b)
        m_row, s_row = _lse_update(m_row, s_row, logits_bc, axis=1)  # local images, all texts
        m_col, s_col = _lse_update(m_col, s_col, logits_bc, axis=0)  # this text chunk, all images
        txt_cE, m_col, s_col = _shift(axes, n, txt_cE, m_col, s_col)
        return txt_cE, m_col, s_col, m_row, s_row, positive_b

    neg_inf, zero = _filled(axes, scale_b, -jnp.inf), _filled(axes, scale_b, 0.0)
    carry = (txt_bE, neg_inf, zero, neg_inf, zero, zero)
    _, m_col, s_col, m_row, s_row, positive_b = jax.lax.fori_loop(0, n, step, carry)
    lse_row_b = m_row + jnp.log(s_row)
    lse_col_b = m_col + jnp.log(s_col)
    loss_b = 0.5 * ((lse_row_b - positive_b) + (lse_col_b - positive_b))
    return loss_b, m_row, s_row, m_col, s_col


def _ring_softmax_bwd(axes, n, img_bE, txt_bE, scale_b, m_row, s_row, m_col, s_col, g_b):
    """Gradients w.r.t. (images, texts, per-example scale), recomputing each block's logits. With
    upstream g, dL/dlogit_ij = g_i/2·softmax_row_ij + g_j/2·softmax_col_ij - [i = j]·g_i; the
    column term needs text j's max and g_j/2 / sum, so both travel with the chunk, together with
    its gradient accumulator."""
    w_row = 0.5 * g_b / s_row
    w_col = 0.5 * g_b / s_col

    def step(k, carry):
        txt_cE, m_col_c, w_col_c, dtxt_cE, dimg_bE, dscale_b = carry
        sim_bc, logits_bc = _block_logits(img_bE, txt_cE, scale_b)
        p_row_bc = jnp.exp(logits_bc - m_row[:, None]) * w_row[:, None]
        p_col_bc = jnp.exp(logits_bc - m_col_c[None, :]) * w_col_c[None, :]
        # The positive logit (home block diagonal) also appears with weight -(1/2 + 1/2).
        dlogits_bc = p_row_bc + p_col_bc - jnp.diag(jnp.where(k == 0, g_b, 0.0))
        dsim_bc = scale_b[:, None] * dlogits_bc
        dimg_bE = dimg_bE + _matmul(dsim_bc, txt_cE)
        dtxt_cE = dtxt_cE + _matmul(dsim_bc.T, img_bE)
        dscale_b = dscale_b + jnp.sum(dlogits_bc * sim_bc, axis=1)
        txt_cE, m_col_c, w_col_c, dtxt_cE = _shift(axes, n, txt_cE, m_col_c, w_col_c, dtxt_cE)
        return txt_cE, m_col_c, w_col_c, dtxt_cE, dimg_bE, dscale_b

    zero_bE = jax.lax.pcast(jnp.zeros(img_bE.shape, jnp.float32), axes, to="varying")
    carry = (txt_bE, m_col, w_col, zero_bE, zero_bE, _filled(axes, scale_b, 0.0))
    *_, dtxt_bE, dimg_bE, dscale_b = jax.lax.fori_loop(0, n, step, carry)
    return dimg_bE, dtxt_bE, dscale_b


def _ring_sigmoid_fwd(axes, n, img_bE, txt_bE, scale_b, bias_b):
    """Per-example losses, summed block by block along the row; nothing has to come home."""

    def step(k, carry):
        txt_cE, loss_b = carry
        _, logits_bc = _block_logits(img_bE, txt_cE, scale_b, bias_b)
        labels_bc = _home_labels(k, logits_bc.shape[0])
        loss_b = loss_b - jnp.sum(jax.nn.log_sigmoid(labels_bc * logits_bc), axis=1)
        (txt_cE,) = _shift(axes, n, txt_cE)
        return txt_cE, loss_b

    _, loss_b = jax.lax.fori_loop(0, n, step, (txt_bE, _filled(axes, scale_b, 0.0)))
    return loss_b


def _ring_sigmoid_bwd(axes, n, img_bE, txt_bE, scale_b, bias_b, g_b):
    """Gradients w.r.t. (images, texts, per-example scale and bias), recomputing each block's
    logits. d(-log σ(y z))/dz = -y·σ(-y z); scale and bias are per row, so theirs stay local and
    only the text-gradient accumulator travels with its chunk."""

    def step(k, carry):
        txt_cE, dtxt_cE, dimg_bE, dscale_b, dbias_b = carry
        sim_bc, logits_bc = _block_logits(img_bE, txt_cE, scale_b, bias_b)
        labels_bc = _home_labels(k, logits_bc.shape[0])
        dlogits_bc = g_b[:, None] * (-labels_bc * jax.nn.sigmoid(-labels_bc * logits_bc))
        dsim_bc = scale_b[:, None] * dlogits_bc
        dimg_bE = dimg_bE + _matmul(dsim_bc, txt_cE)
        dtxt_cE = dtxt_cE + _matmul(dsim_bc.T, img_bE)
        dscale_b = dscale_b + jnp.sum(dlogits_bc * sim_bc, axis=1)
        dbias_b = dbias_b + jnp.sum(dlogits_bc, axis=1)
        txt_cE, dtxt_cE = _shift(axes, n, txt_cE, dtxt_cE)
        return txt_cE, dtxt_cE, dimg_bE, dscale_b, dbias_b

    zero_bE = jax.lax.pcast(jnp.zeros(img_bE.shape, jnp.float32), axes, to="varying")
    zero_b = _filled(axes, scale_b, 0.0)
    carry = (txt_bE, zero_bE, zero_bE, zero_b, zero_b)
    _, dtxt_bE, dimg_bE, dscale_b, dbias_b = jax.lax.fori_loop(0, n, step, carry)
    return dimg_bE, dtxt_bE, dscale_b, dbias_b


def _ring_loss(kind, mesh, axes, n):
    """The chunked loss as a `custom_vjp` on global, batch-sharded arrays. Forward and backward are
    separate shard_maps, so the residuals between them are ordinary sharded arrays of O(b·E) per
    device and autodiff never sees (or stores) the loop."""
    spec = PartitionSpec(axes)
    fwd_body, bwd_body, n_in = {
        "softmax": (_ring_softmax_fwd, _ring_softmax_bwd, 3),
        "sigmoid": (_ring_sigmoid_fwd, _ring_sigmoid_bwd, 4),
    }[kind]

    def smap(body, n_args):
        return jax.shard_map(
            functools.partial(body, axes, n),
            mesh=mesh,
            in_specs=(spec,) * n_args,
            out_specs=spec,
        )

    fwd_map = smap(fwd_body, n_in)
    n_saved = 4 if kind == "softmax" else 0  # the LSE statistics
    bwd_map = smap(bwd_body, n_in + n_saved + 1)

    def loss_fwd(*args):
        out = fwd_map(*args)
        if kind == "softmax":
            loss_B, *stats = out
            return loss_B, (*args, *stats)
        return out, args

    def loss_bwd(residuals, g_B):
        return tuple(bwd_map(*residuals, g_B))

    loss = jax.custom_vjp(lambda *args: loss_fwd(*args)[0])
    loss.defvjp(loss_fwd, loss_bwd)
    return loss


# ------------------------------------------------------------------------------------------------
# Public entry point.


def _ring_size(mesh, batch_axes) -> int:
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch_axes {missing} are not axes of the mesh {mesh.axis_names}")
    n = 1
    for a in batch_axes:
        n *= mesh.shape[a]
    return n


def contrastive_loss_sharded(
    kind: str,
    impl: str,
    img_BE: jax.Array,
    txt_BE: jax.Array,
    scale,
    bias,
    *,
    mesh=None,
    batch_axes=("data", "fsdp"),
) -> jax.Array:
    """Per-example float32 contrastive losses `[B]` of the global batch, equal (values and
    gradients) to `mmjax.losses.contrastive` whatever `impl`.

    `img_BE`, `txt_BE`: L2-normalised global embeddings, row i of each a matching pair, with the
    batch dimension sharded over `batch_axes`. `scale`: the (already exponentiated) logit scale;
    `bias`: the sigmoid logit bias, ignored by softmax. `impl` picks the memory/communication
    trade-off ("naive", "gathered", "chunked"; see the module docstring). The sharded impls run
    `jax.shard_map` over `mesh`, or over the context mesh of `jax.set_mesh` when `mesh` is None;
    mesh axes outside `batch_axes` (e.g. `tensor`) just repeat the same computation.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {IMPLS}")
    if impl == "naive":
        if kind == "softmax":
            return contrastive.softmax_contrastive(img_BE, txt_BE, scale)
        return contrastive.sigmoid_contrastive(img_BE, txt_BE, scale, bias)

    ring_mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if ring_mesh is None or ring_mesh.empty:
        raise ValueError(f"impl={impl!r} needs a mesh: pass mesh= or call inside jax.set_mesh")
    axes = tuple(batch_axes)
    n = _ring_size(ring_mesh, axes)
    big_b = img_BE.shape[0]
    if big_b % n:
        raise ValueError(f"batch {big_b} is not divisible by the {n} devices of axes {axes}")

    # Every input of the shard_map is batch-sharded, the scalars broadcast to one copy per example
    # (the scale and bias of a logit belong to its image row): their gradients then come from
    # ordinary autodiff out here (a broadcast's transpose is a sum) and the sharded code never has
    # to reduce the cotangent of a replicated input.
    img_BE = img_BE.astype(jnp.float32)
    txt_BE = txt_BE.astype(jnp.float32)
    per_example = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (big_b,))
    args = (img_BE, txt_BE, per_example(scale))
    if kind == "sigmoid":
        args += (per_example(bias),)

    if impl == "gathered":
        body = {"softmax": _gathered_softmax, "sigmoid": _gathered_sigmoid}[kind]
        spec = PartitionSpec(axes)
        sharded = jax.shard_map(
            functools.partial(body, axes), mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec
        )
        return sharded(*args)
    return _ring_loss(kind, mesh, axes, n)(*args)
