"""Graph reasoning fusion (every readout: `count` includes `question`, which includes
`attention`) on data x tensor and FSDP meshes: outputs, loss and every gradient (parameters
and both token inputs) equal one device's. Every row of the batch is distinct: with repeated
rows a sharded program that swaps rows between shards looks right (it did, see
`GraphFusion._update`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config as base_config
from mmjax import parallel
from mmjax.models.graph_fusion import GraphFusion

N, L, DV, DT, WIDTH = 6, 5, 12, 16, 16  # image tokens on a 2x3 grid


def batch(b: int):
    """`b` distinct rows; text lengths 5, 3, 1, 4, ... (padded rows in most shards)."""
    rng = np.random.default_rng(3)
    it = jnp.asarray(rng.normal(size=(b, N, DV)), jnp.float32)
    tt = jnp.asarray(rng.normal(size=(b, L, DT)), jnp.float32)
    lengths = np.array([5, 3, 1, 4, 2, 5, 3, 4])[:b]
    pooled = jnp.asarray(rng.normal(size=(b, DT)), jnp.float32)  # the text tower's
    return it, tt, jnp.asarray(np.arange(L)[None] < lengths[:, None]), pooled


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param(  # heads and relation outputs over `tensor` (~8 s: the slow tier)
            dict(data=4, fsdp=1, tensor=2), marks=pytest.mark.slow
        ),
        dict(data=2, fsdp=2, tensor=2),  # the mesh that went wrong
        pytest.param(dict(data=2, fsdp=4, tensor=1), marks=pytest.mark.slow),
    ],
    ids=str,
)
def test_fsdp_sharded_equals_single_device(mesh):
    b = mesh["data"] * mesh["fsdp"]  # one row per batch shard: the case that went wrong
    it, tt, valid, pooled = batch(b)
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(b, WIDTH)), jnp.float32)
    m = GraphFusion(width=WIDTH, depth=1, num_heads=2, grid=(2, 3), readout="count")

    def loss(p, it, tt):
        out = m.apply({"params": p}, None, it, pooled, tt, valid)
        return (
            jnp.sum(out.pooled_BD * cot)
            + jnp.sum(out.image_tokens_BND**2)
            + jnp.sum(jnp.sin(out.text_tokens_BLD))
        )

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    key = jax.random.key(0)
    init = lambda k: nn.unbox(m.init(k, None, it, pooled, tt, valid))["params"]
    single = grad(jax.jit(init)(key), it, tt)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(mesh))
    rules = tuple(base_config.get_config().rules)
    abstract = jax.eval_shape(lambda k: m.init(k, None, it, pooled, tt, valid)["params"], key)
    shardings = parallel.logical_shardings(
        nn.unbox(abstract), nn.get_partition_spec(abstract), mesh, rules
    )
    p = jax.jit(init, out_shardings=shardings)(key)
    spec = tuple(p["round0_spatial_kernel"].sharding.spec)  # (embed, mlp)
    assert mesh.shape["fsdp"] == 1 or spec[0] == "fsdp"
    assert mesh.shape["tensor"] == 1 or spec[1] == "tensor"
    batch_sharding = parallel.batch_sharding(mesh, rules)
    it_s, tt_s = (jax.device_put(x, batch_sharding) for x in (it, tt))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = grad(p, it_s, tt_s)
    flat_single, flat_sharded = jax.tree.leaves(single), jax.tree.leaves(sharded)
    assert len(flat_single) > 20
    # float32 sums of at most 2 x 16 terms per GEMM output, reordered across shards: measured
    # worst relative difference ~3e-6, rows mixed between shards differ by O(1).
    for a, b in zip(flat_single, flat_sharded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
