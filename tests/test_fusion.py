"""Fusion modules: shapes and dtypes, padding invariance, attention masks, the GMU and LMF formulas,
gradient flow to both modalities, sharded == single device, and the registry (graph fusion's own
properties: test_graph_fusion.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config as base_config
from mmjax import parallel
from mmjax.models.cross_attention import CrossAttention, CrossBlock
from mmjax.models.fusion import FUSIONS, build_fusion

DV, DT, N, L = 12, 16, 4, 6  # image width, text width, image tokens, text length
KW = {
    "early_concat": dict(width=16, depth=1, num_heads=2, mlp_dim=32),
    "late_concat": dict(hidden_dim=32, out_dim=8),
    "gmu": dict(out_dim=8),
    "tensor": dict(out_dim=8, rank_dim=4),
    "low_rank": dict(out_dim=8, rank=3),
    "cross_attention": dict(depth=1, num_heads=2, mlp_dim=32),
    "co_attention": dict(depth=1, num_heads=2, mlp_dim=32),
    "bottleneck": dict(
        width=16, depth=2, num_heads=2, mlp_dim=32, num_bottlenecks=2, fusion_layer=1
    ),
    "graph": dict(width=16, depth=2, num_heads=2),
}
OUT_DIM = {
    "early_concat": 16,
    "late_concat": 8,
    "gmu": 8,
    "tensor": 8,
    "low_rank": 8,
    "cross_attention": DT,
    "co_attention": DV + DT,
    "bottleneck": 16,
    "graph": 16,
}
TOKEN_FUSIONS = ("early_concat", "cross_attention", "co_attention", "bottleneck", "graph")
CROSS_FUSIONS = ("cross_attention", "co_attention")


def make_inputs(batch=2, seed=0):
    """(image_pooled, image_tokens, text_pooled, text_tokens, text_valid); example 1 has 3 valid
    text tokens of L."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(batch, DV), (batch, N, DV)]]
    arrays += [rng.normal(size=s).astype(np.float32) for s in [(batch, DT), (batch, L, DT)]]
    lengths = np.array([L, 3, 5, 1][:batch])
    valid = np.arange(L)[None] < lengths[:, None]
    return (*map(jnp.asarray, arrays), jnp.asarray(valid))


# Everything runs jitted and cached: on 2 CPU cores one compile of a whole model is several times
# cheaper than dispatching its (and its gradient's) hundreds of small ops eagerly.
@functools.cache
def init_params(name):
    """Boxed float32 parameters (the same tree serves every compute dtype)."""
    return jax.jit(build_fusion(name, **KW[name]).init)(jax.random.key(0), *make_inputs())


@functools.cache
def _jitted_apply(name, dtype, return_attention):
    model = build_fusion(name, dtype=dtype, **KW[name])
    return jax.jit(functools.partial(model.apply, return_attention=return_attention))


def apply(name, inputs, dtype=jnp.float32, image_valid_BN=None, return_attention=False):
    fn = _jitted_apply(name, dtype, return_attention)
    return fn(init_params(name), *inputs, image_valid_BN=image_valid_BN)


@functools.cache
def forward_and_input_grads(name):
    """The float32 output on make_inputs() and the gradients of a random projection of its pooled
    vector w.r.t. (image_pooled, image_tokens, text_pooled, text_tokens); two tests read it."""
    *inputs, valid = make_inputs()
    cot = jnp.asarray(np.random.default_rng(4).normal(size=(2, OUT_DIM[name])), jnp.float32)
    model = build_fusion(name, **KW[name])

    def loss(variables, *inputs):
        out = model.apply(variables, *inputs, valid)
        return jnp.sum(out.pooled_BD * cot), out

    grad_fn = jax.jit(jax.value_and_grad(loss, (1, 2, 3, 4), has_aux=True))
    (_, out), grads = grad_fn(init_params(name), *inputs)
    return out, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_shapes_dtypes_finite(name, dtype):
    if dtype == jnp.float32:
        out, _ = forward_and_input_grads(name)
    else:
        out = apply(name, make_inputs(), dtype)
    assert out.pooled_BD.shape == (2, OUT_DIM[name]) and out.pooled_BD.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out.pooled_BD, np.float32)))
    if name in TOKEN_FUSIONS:
        assert out.text_tokens_BLD.shape == (2, L, 16) and out.text_tokens_BLD.dtype == dtype
        assert np.all(np.isfinite(np.asarray(out.text_tokens_BLD, np.float32)))
    if name in ("early_concat", "co_attention", "bottleneck", "graph"):
        width = DV if name == "co_attention" else 16  # co-attention keeps the image width
        assert out.image_tokens_BND.shape == (2, N, width) and out.image_tokens_BND.dtype == dtype
    # Parameters are float32 storage whatever the compute dtype, and every one carries a logical
    # axis name per dimension.
    model = build_fusion(name, dtype=dtype, **KW[name])
    boxed = jax.eval_shape(model.init, jax.random.key(0), *make_inputs())
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(x.value.dtype == jnp.float32 and len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize("name", TOKEN_FUSIONS)
def test_padding_never_changes_outputs(name):
    """Large changes to padded text and image tokens leave pooled and fused tokens unchanged."""
    ip, it, tp, tt, text_valid = make_inputs()
    image_valid = jnp.asarray([[True] * N, [True, True, False, False]])
    rng = np.random.default_rng(5)
    noise_tt = jnp.asarray(100 * rng.normal(size=tt.shape), jnp.float32)
    noise_it = jnp.asarray(100 * rng.normal(size=it.shape), jnp.float32)
    tt2 = jnp.where(text_valid[:, :, None], tt, noise_tt)
    it2 = jnp.where(image_valid[:, :, None], it, noise_it)
    assert not np.allclose(tt2, tt) and not np.allclose(it2, it)
    ref = apply(name, (ip, it, tp, tt, text_valid), image_valid_BN=image_valid)
    out = apply(name, (ip, it2, tp, tt2, text_valid), image_valid_BN=image_valid)
    for a, b in zip(ref, out, strict=True):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Fused tokens are zero at padding.
    assert np.all(np.asarray(out.text_tokens_BLD)[1, 3:] == 0)


@pytest.mark.parametrize(
    "name, option", [("early_concat", dict(pool="cls")), ("cross_attention", dict(pool="first"))]
)
def test_token_pooling_options(name, option):
    ip, it, tp, tt, valid = make_inputs()
    model = build_fusion(name, **KW[name], **option)
    variables = jax.jit(model.init)(jax.random.key(0), ip, it, tp, tt, valid)
    run = jax.jit(model.apply)
    out = run(variables, ip, it, tp, tt, valid)
    assert out.pooled_BD.shape == (2, OUT_DIM[name])
    padded = jnp.where(valid[:, :, None], tt, 50.0)
    np.testing.assert_allclose(run(variables, ip, it, tp, padded, valid).pooled_BD, out.pooled_BD)
    if name == "cross_attention":  # the first text token is the pooled vector
        np.testing.assert_array_equal(out.pooled_BD, out.text_tokens_BLD[:, 0])
    else:  # a learned fusion token, prepended and not returned among the tokens
        assert variables["params"]["cls_token"].value.shape == (KW[name]["width"],)
        assert out.image_tokens_BND.shape[1] == N and out.text_tokens_BLD.shape[1] == L


def _unboxed(variables):
    return nn.unbox(variables)["params"]


def test_cross_attention_matches_reference_and_masked_keys_get_zero_probability():
    rng = np.random.default_rng(1)
    # The fusion inputs' shapes (queries L x DT, context N x DV: E != D) reuse compiled ops.
    x = jnp.asarray(rng.normal(size=(2, L, DT)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, N, DV)), jnp.float32)
    ctx_valid = jnp.asarray(np.arange(N)[None] < np.array([[N], [2]]))
    mask = jnp.asarray(rng.random((2, L, N)) < 0.7).at[:, :, 0].set(True)
    layer = CrossAttention(num_heads=2)
    variables = layer.init(jax.random.key(0), x, ctx)
    out, probs = layer.apply(variables, x, ctx, mask, ctx_valid, return_attention=True)
    np.testing.assert_array_equal(out, layer.apply(variables, x, ctx, mask, ctx_valid))
    allowed = np.asarray(mask) & np.asarray(ctx_valid)[:, None, :]
    assert probs.shape == (2, 2, L, N) and not allowed.all()
    assert np.all(np.where(allowed[:, None], 0.0, np.asarray(probs)) == 0)
    assert np.all(np.where(allowed[:, None], np.asarray(probs), 1.0) > 0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    # Independent reference: explicit projections + jax.nn.dot_product_attention.
    p = _unboxed(variables)
    q = jnp.einsum("btd,dhk->bthk", x, p["q_kernel"]) + p["q_bias"][None, None]
    kv = jnp.einsum("bse,ehck->bshck", ctx, p["kv_kernel"]) + p["kv_bias"][None, None]
    o = jax.nn.dot_product_attention(q, kv[:, :, :, 0], kv[:, :, :, 1], mask=allowed[:, None])
    ref = jnp.einsum("bthk,hkd->btd", o, p["out_kernel"]) + p["out_bias"][None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    scores = jnp.einsum("bthk,bshk->bhts", q, kv[:, :, :, 0]) / np.sqrt(q.shape[-1])
    ref_probs = jax.nn.softmax(jnp.where(allowed[:, None], scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CROSS_FUSIONS)
def test_fusion_attention_maps_ignore_masked_keys(name):
    inputs = make_inputs()
    image_valid = jnp.asarray([[True] * N, [True, False, True, False]])
    plain = apply(name, inputs, image_valid_BN=image_valid)
    out = apply(name, inputs, image_valid_BN=image_valid, return_attention=True)
    np.testing.assert_array_equal(out.pooled_BD, plain.pooled_BD)
    t2i = np.asarray(out.attention["text_to_image"])
    assert t2i.shape == (2, 2, L, N)
    assert np.all(t2i[1, :, :, [1, 3]] == 0) and np.all(t2i[1, :, :, [0, 2]] > 0)
    np.testing.assert_allclose(t2i.sum(-1), 1.0, rtol=1e-6)
    if name == "co_attention":
        i2t = np.asarray(out.attention["image_to_text"])
        assert i2t.shape == (2, 2, N, L) and np.all(i2t[1, :, :, 3:] == 0)


def test_cross_block_causal_self_attention():
    """With causal=True, changing text token t changes no output before t."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, L, DT)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, N, DV)), jnp.float32)
    block = CrossBlock(num_heads=2, mlp_dim=32)
    variables = block.init(jax.random.key(0), x, ctx, causal=True)
    run = jax.jit(functools.partial(block.apply, causal=True))
    out, out2 = run(variables, x, ctx), run(variables, x.at[:, 4].add(1.0), ctx)
    np.testing.assert_array_equal(out[:, :4], out2[:, :4])
    assert not np.allclose(out[:, 4:], out2[:, 4:])


def test_gmu_gate_and_formula():
    ip, _, tp, _, _ = make_inputs()
    model = build_fusion("gmu", **KW["gmu"])
    p = _unboxed(init_params("gmu"))
    # Nonzero biases, so the formula check covers them too.
    rng = np.random.default_rng(3)
    p = {k: np.asarray(v) + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()}
    ip, tp = np.asarray(ip), np.asarray(tp)
    out, state = model.apply({"params": p}, ip, None, tp, None, mutable=["intermediates"])
    (gate,) = state["intermediates"]["gate_BO"]
    hv = np.tanh(ip @ p["image_kernel"] + p["image_bias"])
    ht = np.tanh(tp @ p["text_kernel"] + p["text_bias"])
    z = 1 / (1 + np.exp(-(np.concatenate([ip, tp], -1) @ p["gate_kernel"] + p["gate_bias"])))
    assert np.all((gate > 0) & (gate < 1))
    np.testing.assert_allclose(gate, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.pooled_BD, z * hv + (1 - z) * ht, rtol=1e-5, atol=1e-6)


def test_low_rank_fusion_equals_tensor_fusion_with_reconstructed_weight():
    ip, _, tp, _, _ = make_inputs()
    lmf = _unboxed(init_params("low_rank"))
    a, c = lmf["image_factor"], lmf["text_factor"]  # [DV+1, R, O], [DT+1, R, O]
    full = jnp.einsum("iro,jro->ijo", a, c)
    tfn = build_fusion("tensor", out_dim=8, rank_dim=None)
    shapes = jax.eval_shape(tfn.init, jax.random.key(0), ip, None, tp, None)
    assert nn.unbox(shapes)["params"]["fusion_kernel"].shape == (DV + 1, DT + 1, 8)
    tfn_params = {"fusion_kernel": full, "fusion_bias": lmf["fusion_bias"] + 0.1}
    ref = tfn.apply({"params": tfn_params}, ip, None, tp, None).pooled_BD
    lmf["fusion_bias"] = lmf["fusion_bias"] + 0.1
    out = build_fusion("low_rank", **KW["low_rank"]).apply({"params": lmf}, ip, None, tp, None)
    np.testing.assert_allclose(out.pooled_BD, ref, rtol=1e-5, atol=1e-5)
    # The projected TensorFusion's kernel is (rank_dim + 1)^2 × out, not (DV + 1)(DT + 1) × out.
    assert _unboxed(init_params("tensor"))["fusion_kernel"].shape == (5, 5, 8)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_gradients_reach_both_modalities(name):
    _, (g_ip, g_it, g_tp, g_tt) = forward_and_input_grads(name)
    g_image, g_text = (g_it, g_tt) if name in TOKEN_FUSIONS else (g_ip, g_tp)
    assert np.linalg.norm(g_image) > 0 and np.linalg.norm(g_text) > 0
    if name in TOKEN_FUSIONS:
        assert np.all(np.asarray(g_tt)[1, 3:] == 0)  # padding gets no gradient
        assert np.all(np.asarray(g_tt)[1, :3] != 0)


def _loss_and_grads(model, params, it, tt, valid, cot):
    def loss(params, it, tt):
        out = model.apply({"params": params}, None, it, None, tt, valid)
        return jnp.sum(out.pooled_BD * cot) + jnp.sum(out.text_tokens_BLD**2), out.pooled_BD

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, it, tt)


@pytest.mark.multidevice
# CrossAttentionFusion in the fast tier; the other token fusions (two compiles each, ~5-10 s) in
# the slow one. Distinct rows in every batch shard: XLA's sharding propagation once swapped the
# rows of two shards on this mesh (see tests/test_graph_fusion_sharded.py), which a batch with
# equal rows hides.
@pytest.mark.parametrize(
    "name",
    [
        "cross_attention",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in TOKEN_FUSIONS
            if n not in ("cross_attention", "graph")  # graph: its own sharded test
        ),
    ],
)
def test_sharded_equals_single_device(name):
    _, it, _, tt, valid = make_inputs(batch=4)
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(4, OUT_DIM[name])), jnp.float32)
    model = build_fusion(name, **KW[name])
    key = jax.random.key(0)
    init = lambda k: _unboxed(model.init(k, None, it, None, tt, valid))
    single = _loss_and_grads(model, jax.jit(init)(key), it, tt, valid, cot)

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    rules = tuple(base_config.get_config().rules)
    abstract = jax.eval_shape(lambda k: model.init(k, None, it, None, tt, valid)["params"], key)
    shardings = parallel.logical_shardings(
        nn.unbox(abstract), nn.get_partition_spec(abstract), mesh, rules
    )
    # Initialised straight into its shardings (as train/state.py does); partitionable threefry
    # (conftest) makes the sharded random values equal the single-device ones.
    params = jax.jit(init, out_shardings=shardings)(key)
    if name == "cross_attention":
        q_kernel = params["block0"]["cross_attn"]["q_kernel"]  # (embed, heads, kv)
        assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    batch = parallel.batch_sharding(mesh, rules)
    it_s, tt_s, valid_s, cot_s = (jax.device_put(x, batch) for x in (it, tt, valid, cot))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = _loss_and_grads(model, params, it_s, tt_s, valid_s, cot_s)
    flat_single, flat_sharded = jax.tree.leaves(single), jax.tree.leaves(sharded)
    assert len(flat_single) == len(flat_sharded) > 10
    for a, b in zip(flat_single, flat_sharded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_registry_and_argument_errors():
    assert set(FUSIONS) == set(KW)
    assert all(type(build_fusion(n, **KW[n])) is FUSIONS[n] for n in FUSIONS)
    with pytest.raises(ValueError, match="unknown fusion 'nope'; use one of bottleneck"):
        build_fusion("nope")
    ip, it, tp, tt, valid = make_inputs()
    for name in ("gmu", "early_concat", "bottleneck"):
        with pytest.raises(ValueError, match="has no cross-attention"):
            apply(name, (ip, it, tp, tt, valid), return_attention=True)
    with pytest.raises(ValueError, match="needs text_pooled_BD"):
        apply("late_concat", (ip, it, None, tt, valid))
    with pytest.raises(ValueError, match="needs image_tokens_BND"):
        apply("cross_attention", (ip, None, tp, tt, valid))
    with pytest.raises(ValueError, match="needs equal widths"):
        build_fusion("co_attention", combine="product", **KW["co_attention"]).init(
            jax.random.key(0), *make_inputs()
        )
    with pytest.raises(ValueError, match="fusion_layer=2 must be in"):
        build_fusion("bottleneck", **{**KW["bottleneck"], "fusion_layer": 2}).init(
            jax.random.key(0), *make_inputs()
        )
