"""remat and scan_layers change memory and compile time, never the model's outputs or gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.two_tower import build_two_tower
from mmjax.tasks import get_task
from mmjax.train.validate import validate_config
from tests.test_gradcache import step_temp_bytes
from tests.test_models import VOCAB, example_inputs, tiny_config
from tests.test_sharding import config_for


def stack_blocks(params: dict, depth: int) -> dict:
    """Unrolled `block{i}` parameters -> the scanned layout (leading `layers` axis)."""
    params = jax.tree.map(lambda x: x, params)  # copy the nesting
    for tower in ("image", "text"):
        encoder = params[tower]["encoder"]
        blocks = [encoder.pop(f"block{i}") for i in range(depth)]
        encoder["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def loss_and_grads(config, params):
    model = build_two_tower(config, VOCAB)
    images, tokens = example_inputs()

    def loss(p):
        img, txt, aux = model.apply({"params": p}, images, tokens)
        return jnp.sum(aux["logit_scale"] * img @ txt.T)

    return jax.jit(jax.value_and_grad(loss))(params)


# The fast tier checks full remat of scanned layers (both knobs at once), the slow tier the other
# five settings (CI runs both tiers).
KNOBS = [("full", True)]
KNOBS += [
    pytest.param(remat, scan, marks=pytest.mark.slow)
    for remat in ("none", "dots", "full")
    for scan in (False, True)
    if (remat, scan) not in KNOBS
]


@pytest.mark.parametrize("remat, scan_layers", KNOBS)
def test_outputs_and_gradients_do_not_depend_on_memory_knobs(remat, scan_layers):
    base = tiny_config()
    images, tokens = example_inputs()
    params = nn.unbox(build_two_tower(base, VOCAB).init(jax.random.key(0), images, tokens))
    params = params["params"]
    ref_loss, ref_grads = loss_and_grads(base, params)

    config = tiny_config()
    config.model.remat, config.model.scan_layers = remat, scan_layers
    converted = stack_blocks(params, base.model.image.depth) if scan_layers else params
    loss, grads = loss_and_grads(config, converted)
    if scan_layers:
        ref_grads = stack_blocks(ref_grads, base.model.image.depth)
    # Recompute runs the same ops; only XLA's fusion of the rematerialised (or scanned) graph may
    # reorder float reductions: 1e-6 relative to each gradient's norm (fp32 epsilon ~1.2e-7).
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert np.linalg.norm(g - r) <= 1e-6 * np.linalg.norm(r) + 1e-12


def test_scanned_parameters_have_a_layers_axis():
    config = tiny_config()
    config.model.scan_layers = True
    images, tokens = example_inputs()
    boxed = build_two_tower(config, VOCAB).init(jax.random.key(0), images, tokens)
    kernel = boxed["params"]["image"]["encoder"]["blocks"]["block"]["mlp"]["in_kernel"]
    assert kernel.names == ("layers", "embed", "mlp")
    assert kernel.value.shape == (config.model.image.depth, 32, 64)


@pytest.mark.slow  # three compiles of the scanned model's gradient (~12 s)
@pytest.mark.multidevice
def test_remat_with_scan_lowers_activation_memory():
    """With scanned layers the backward pass recomputes each block from its input, so temporaries
    fall from "none" to "dots" (GEMM outputs kept) to "full" (nothing kept). (Unrolled, XLA's CPU
    scheduler hoists the recomputation back into the forward pass and the saving disappears;
    see README, Performance.)"""
    config = config_for(dict(data=1, fsdp=1, tensor=1))
    config.batch_size = 32
    config.model.scan_layers = True
    temps = {}
    for remat in ("none", "dots", "full"):
        config.model.remat = remat
        temps[remat] = step_temp_bytes(config, jax.devices()[:1])
    assert temps["full"] < temps["dots"] < temps["none"], temps


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_impl", "ring", "loss_impl='ring' is unknown; use one of naive, gathered, chunked"),
        ("microbatches", 0, "microbatches=0 must be >= 1"),
        ("model.remat", "all", "model.remat='all' is unknown; use one of none, dots, full"),
    ],
)
def test_scale_knobs_are_validated(field, value, message):
    config = tiny_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config, get_task(config.task))
