"""Knowledge distillation from a teacher model: of its similarity structure or its embeddings.

The teacher is always wrapped in `stop_gradient`, so a teacher that shares parameters with the
student (an EMA copy, the same tower on another view) is never trained by these losses.
"""

import jax
import jax.numpy as jnp

from mmjax.losses.triplet import l2_normalize

# Masked logits become this rather than -inf: a fully masked row then gives a uniform softmax
# instead of NaN, and the masked KL terms are zeroed explicitly anyway.
_MASKED = -1e9


def _kl_terms(t_BB: jax.Array, s_BB: jax.Array, axis: int) -> jax.Array:
    """Elementwise p_t (log p_t - log p_s) for softmax along `axis`. Identical inputs give
    exactly 0 since both log-softmaxes are the same float computation."""
    log_pt = jax.nn.log_softmax(t_BB, axis=axis)
    log_ps = jax.nn.log_softmax(s_BB, axis=axis)
    return jnp.exp(log_pt) * (log_pt - log_ps)


def similarity_kd_loss(
    student_logits_BB: jax.Array,
    teacher_logits_BB: jax.Array,
    temperature: float | jax.Array = 1.0,
    *,
    mask_B: jax.Array | None = None,
) -> jax.Array:
    """Distils the teacher's in-batch retrieval distribution into the student's, `[B]`:

        L_i = T² · ½ (KL(softmax(t[i, :]/T) ‖ softmax(s[i, :]/T))
                    + KL(softmax(t[:, i]/T) ‖ softmax(s[:, i]/T)))

    rows = image→text retrieval, columns = text→image. T² keeps the gradient scale independent
    of T (Hinton et al., 2015). With `mask_B`, masked examples leave both softmaxes and get 0.
    """
    t = jax.lax.stop_gradient(teacher_logits_BB).astype(jnp.float32) / temperature
    s = student_logits_BB.astype(jnp.float32) / temperature
    if t.shape != s.shape or t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"need two equal square logits, got {s.shape} and {t.shape}")
    if mask_B is None:
        rows_B = jnp.sum(_kl_terms(t, s, axis=1), axis=1)
        cols_B = jnp.sum(_kl_terms(t, s, axis=0), axis=0)
        return temperature**2 * 0.5 * (rows_B + cols_B)
    valid_B = mask_B.astype(bool)
    valid_BB = valid_B[:, None] & valid_B[None, :]
    t = jnp.where(valid_BB, t, _MASKED)
    s = jnp.where(valid_BB, s, _MASKED)
    rows_B = jnp.sum(jnp.where(valid_BB, _kl_terms(t, s, axis=1), 0.0), axis=1)
    cols_B = jnp.sum(jnp.where(valid_BB, _kl_terms(t, s, axis=0), 0.0), axis=0)
    return jnp.where(valid_B, temperature**2 * 0.5 * (rows_B + cols_B), 0.0)


EMBEDDING_KINDS = ("cosine", "mse")


def embedding_distill_loss(
    student_BE: jax.Array, teacher_BE: jax.Array, kind: str = "cosine"
) -> jax.Array:
    """Per-example feature distillation `[B]`:

    * "cosine": 1 - cos(s_i, t_i) (direction only; scale-free, fits L2-normalised retrieval);
    * "mse":    mean_e (s_ie - t_ie)² (matches magnitudes too).
    Widths must agree: a projection from student to teacher width is the caller's (trained) layer.
    """
    if student_BE.shape != teacher_BE.shape:
        raise ValueError(f"student {student_BE.shape} and teacher {teacher_BE.shape} differ")
    s = student_BE.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_BE).astype(jnp.float32)
    if kind == "cosine":
        return 1.0 - jnp.sum(l2_normalize(s) * l2_normalize(t), axis=-1)
    if kind == "mse":
        return jnp.mean(jnp.square(s - t), axis=-1)
    raise ValueError(f"unknown kind {kind!r}; choose one of {EMBEDDING_KINDS}")
