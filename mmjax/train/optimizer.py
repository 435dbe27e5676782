"""AdamW with warmup + cosine schedule, global-norm clipping and a weight-decay mask."""

import jax
import ml_collections
import optax

# Parameters whose names contain one of these are never weight-decayed: decaying norms, biases,
# embeddings or the temperature pulls them towards zero for no regularisation benefit.
_NO_DECAY = ("bias", "scale", "embedding", "cls_token", "logit_")


def path_name(path) -> str:
    """ "text/encoder/block0/mlp/in_kernel" for a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params) -> dict:
    """True for parameters that get weight decay (matmul kernels and projections)."""

    def wants_decay(path, _) -> bool:
        return not any(tag in path_name(path) for tag in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    peak = optim.learning_rate
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * optim.end_lr_fraction,
    )


def build_optimizer(
    config: ml_collections.ConfigDict, extra_frozen: tuple[str, ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `config.optim`; parameters under `optim.frozen_prefixes` or
    `extra_frozen` (what the task freezes, e.g. a distillation teacher) are never updated."""
    o = config.optim
    schedule = learning_rate_schedule(o, config.total_steps)
    parts = [
        optax.clip_by_global_norm(o.grad_clip_norm),
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        ),
    ]
    if o.text_frozen_steps > 0:
        frozen = o.text_frozen_steps
        parts.append(
            optax.masked(
                optax.scale_by_schedule(lambda count: (count >= frozen).astype("float32")),
                text_tower_mask,
            )
        )
    tx = optax.chain(*parts)
    prefixes = (*o.frozen_prefixes, *extra_frozen)
    if prefixes:
        # Frozen parameters get `set_to_zero` (no state); clipping and AdamW see only the rest.
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: frozen_labels(params, prefixes),
        )
    return tx, schedule


def frozen_labels(params, prefixes: tuple[str, ...]) -> dict:
    """ "frozen" for parameters whose "/"-joined path starts with one of `prefixes`."""

    def label(path, _) -> str:
        return "frozen" if path_name(path).startswith(prefixes) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def text_tower_mask(params) -> dict:
    """True for the text tower's parameters and its projection."""
    return {k: jax.tree.map(lambda _, k=k: k.startswith("text"), v) for k, v in params.items()}
