"""`init_towers_from` carries a tower's BatchNorm running statistics with its parameters (they
were dropped before: a BatchNorm tower then evaluated with fresh statistics), and refuses a model
whose tower has no such state instead of losing it."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import config as base
from mmjax.errors import ConfigError
from mmjax.train import pretrained


def saved_run(tmp_path):
    """A run directory whose newest checkpoint holds an image tower with BatchNorm statistics."""
    rng = np.random.default_rng(0)
    tree = {
        "params": {
            "image": {"conv": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)}},
            "text": {"dense": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)}},
        },
        "model_state": {
            "batch_stats": {
                "image": {"bn": {"mean": rng.normal(size=4).astype(np.float32)}},
            }
        },
        "step": np.int32(7),
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "run" / "checkpoints" / "7" / "state", tree)
    checkpointer.wait_until_finished()
    return str(tmp_path / "run"), tree


def sources_for(run_dir):
    config = base.get_config()
    config.init_towers_from, config.init_towers = run_dir, ("image",)
    return pretrained.from_settings(config)


def test_tower_statistics_are_placed_with_the_parameters(tmp_path):
    run_dir, saved = saved_run(tmp_path)
    (source,) = sources_for(run_dir)
    initial = {
        "batch_stats": {"image": {"bn": {"mean": jnp.zeros(4)}}, "other": {"m": jnp.ones(2)}}
    }
    merged = pretrained.merge_state(initial, [source])
    np.testing.assert_array_equal(
        merged["batch_stats"]["image"]["bn"]["mean"],
        saved["model_state"]["batch_stats"]["image"]["bn"]["mean"],
    )
    np.testing.assert_array_equal(merged["batch_stats"]["other"]["m"], np.ones(2))  # untouched
    # The text tower has no statistics in the run: nothing to place for it.
    config = base.get_config()
    config.init_towers_from, config.init_towers = run_dir, ("text",)
    (text,) = pretrained.from_settings(config)
    assert text.state == {}
    assert pretrained.merge_state({}, [text]) == {}


def test_statistics_the_model_cannot_hold_are_refused(tmp_path):
    run_dir, _ = saved_run(tmp_path)
    (source,) = sources_for(run_dir)
    with pytest.raises(ConfigError, match=r"image has batch_stats .* the model's has none"):
        pretrained.merge_state({}, [source])  # e.g. a GroupNorm tower: same parameter shapes
    wrong = {"batch_stats": {"image": {"bn": {"mean": jnp.zeros(5)}}}}
    with pytest.raises(
        ConfigError, match=r"does not fit model\.image .*\(batch_stats\): .* \(4,\) vs model \(5,\)"
    ):
        pretrained.merge_state(wrong, [source])
    assert jax.tree.leaves(wrong)[0].shape == (5,)  # nothing was changed on the way
