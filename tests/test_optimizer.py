"""Optimizer behaviour: weight-decay mask, text-tower freezing, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.train import optimizer
from tests.test_models import tiny_config


def params():
    return {
        "image": {"block": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
        "text": {"token_embedding": jnp.ones((8, 4)), "kernel": jnp.ones((4, 4))},
        "text_projection": jnp.ones((4, 2)),
        "image_projection": jnp.ones((4, 2)),
        "logit_scale": jnp.float32(2.0),
    }


def test_decay_mask_skips_norms_biases_embeddings_temperature():
    mask = optimizer.decay_mask(params())
    assert mask["image"]["block"]["kernel"] and mask["text"]["kernel"]
    assert mask["image_projection"] and mask["text_projection"]
    assert not mask["image"]["block"]["bias"]
    assert not mask["text"]["token_embedding"]
    assert not mask["logit_scale"]


def test_text_tower_is_frozen_for_the_configured_steps():
    config = tiny_config()
    config.total_steps = 10
    config.optim.warmup_steps = 0
    config.optim.text_frozen_steps = 3
    tx, _ = optimizer.build_optimizer(config)
    p = params()
    state = tx.init(p)
    grads = jax.tree.map(jnp.ones_like, p)
    history = []
    for _ in range(5):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        history.append(p)
    first = params()
    for step in range(3):  # steps 0, 1, 2: text unchanged, image trained
        np.testing.assert_array_equal(history[step]["text"]["kernel"], first["text"]["kernel"])
        np.testing.assert_array_equal(history[step]["text_projection"], first["text_projection"])
        assert not np.allclose(history[step]["image"]["block"]["kernel"], 1.0)
    assert not np.allclose(history[3]["text"]["kernel"], first["text"]["kernel"])


def test_schedule_warms_up_then_decays():
    config = tiny_config()
    config.total_steps = 100
    config.optim.warmup_steps = 10
    schedule = optimizer.learning_rate_schedule(config.optim, config.total_steps)
    peak = config.optim.learning_rate
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), peak * config.optim.end_lr_fraction, rtol=1e-5)


def test_frozen_prefixes_never_update_and_keep_no_optimizer_state():
    config = tiny_config()
    config.optim.frozen_prefixes = ("text/",)
    tx, _ = optimizer.build_optimizer(config)
    p = params()
    state = tx.init(p)
    # No Adam moments for the frozen tower: its slots are optax's empty MaskedNode.
    sizes = [x.size for x in jax.tree.leaves(state)]
    trainable = sum(
        x.size
        for path, x in jax.tree_util.tree_leaves_with_path(p)
        if not optimizer.path_name(path).startswith("text/")
    )
    assert sum(sizes) < 2 * trainable + 10  # mu + nu of trainable params, plus counters
    grads = jax.tree.map(jnp.ones_like, p)
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    assert np.all(p["text"]["kernel"] == 1.0) and np.all(p["text"]["token_embedding"] == 1.0)
    assert not np.all(p["text_projection"] == 1.0)  # outside text/: trains
    assert not np.all(p["image"]["block"]["kernel"] == 1.0)
