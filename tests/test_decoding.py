"""Key/value-cached decoding (mmjax/models/decoding.py): one cached step equals the full-prefix
pass at that position, cached captions equal the prefix-rerunning ones token for token (random
and briefly trained weights, one device and the 8-device mesh), and the parameters are those of
the decoder trained without a cache."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import captioning
from mmjax import config as base_config
from mmjax import losses, parallel
from mmjax.bench.__main__ import main
from mmjax.models import decoding
from mmjax.models.causal_decoder import CausalDecoder
from mmjax.models.coca import CoCa, build_coca, caption
from mmjax.models.fusion_attention import CrossAttentionFusion
from mmjax.models.layers import Attention, LayerNorm, Mlp
from tests.conftest import tiny

BOS, EOT, PAD = 1, 2, 0
LENGTH = 12
# One caption per image, of different lengths, so trained decoding finishes at different steps.
CAPTIONS = [[40, 41, 42], [50, 51], [60, 61, 62, 63, 64], [70]]


def padded(rows):
    return jnp.array([[BOS, *r, EOT] + [PAD] * (LENGTH - len(r) - 2) for r in rows], jnp.int32)


def train_briefly(model, params, images, tokens, steps=60):
    """Adam on the caption loss alone: enough for the decoder to write the captions and stop."""
    opt = optax.adam(1e-2)

    def loss(params):
        _, img_BND = model.apply({"params": params}, images, method=CoCa.image_tokens)
        logits = model.apply({"params": params}, img_BND, tokens, method=CoCa.decoder_logits)
        return losses.mean_caption_loss(*losses.caption_nll(logits, tokens, PAD))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


@pytest.fixture(scope="module")
def coca():
    c = tiny(captioning.on_base_towers(), text_length=LENGTH)
    c.captioning.decoder_depth = 2
    model = build_coca(c, 264)
    images = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    tokens = padded(CAPTIONS)
    params = nn.unbox(model.init(jax.random.key(1), images, tokens)["params"])
    trained = train_briefly(model, params, images, tokens)
    return model, images, {"random": params, "trained": trained}


def decode(model, params, images, beam, cache):
    fn = jax.jit(lambda p, x: caption(model, p, x, LENGTH, beam, BOS, EOT, PAD, cache=cache))
    return jax.device_get(fn(params, images))


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_cached_captions_equal_prefix_rerun_captions(coca, kind):
    model, images, params = coca
    for beam in (1, 3):
        tokens, scores = decode(model, params[kind], images, beam, cache=True)
        ref_tokens, ref_scores = decode(model, params[kind], images, beam, cache=False)
        np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"beam {beam}")
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
        if kind == "trained":  # every beam finishes: the EOT-then-PAD path is exercised
            np.testing.assert_array_equal(tokens, padded(CAPTIONS), err_msg=f"beam {beam}")


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_each_cached_step_equals_the_full_prefix_logits(coca, kind):
    model, images, params = coca
    params = params[kind]
    # A PAD before the end (a decoder may emit one) and trailing padding: masked as keys alike.
    tokens = padded(CAPTIONS).at[2, 3].set(PAD)
    _, img = model.apply({"params": params}, images, method=CoCa.image_tokens)
    full = model.apply({"params": params}, img, tokens, method=CoCa.decoder_logits)
    step = jax.jit(
        lambda c, img, t: decoding.apply_cached(
            model, params, c, img, tokens, t, method=CoCa.decode_step
        )
    )
    cache = None
    for t in range(LENGTH):
        # After the first step the image is read from the cache, never again from the input.
        logits, cache = step(cache, img if t == 0 else jnp.zeros_like(img), t)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5, err_msg=f"t={t}")
    key_BSHK = cache[decoding.CACHE]["decoder"]["block0"]["self_attn"]["key"]
    assert key_BSHK.shape == (4, LENGTH, 2, 16)
    assert set(cache) == {decoding.CACHE, decoding.CONTEXT}


def test_parameters_are_those_of_the_decoder_trained_without_cache(coca):
    """CoCa's decoder has the parameter tree of the CrossAttentionFusion it replaced and computes
    the same tokens with them; init creates parameters only (no cache)."""
    model, images, params = coca
    tokens = padded(CAPTIONS)
    variables = model.init(jax.random.key(1), images, tokens)
    assert set(variables) == {"params"}
    ctx = jax.random.normal(jax.random.key(2), (4, 5, 32))
    x = jax.random.normal(jax.random.key(3), (4, LENGTH, 32))
    valid = tokens != PAD
    fusion = CrossAttentionFusion(depth=2, num_heads=2, mlp_dim=64, causal=True)
    fusion_params = nn.unbox(fusion.init(jax.random.key(4), None, ctx, None, x, valid))["params"]
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    assert shapes(fusion_params) == shapes(params["random"]["decoder"])
    ours = CausalDecoder(depth=2, num_heads=2, mlp_dim=64).apply(
        {"params": fusion_params}, x, ctx, valid
    )
    theirs = fusion.apply({"params": fusion_params}, None, ctx, None, x, valid).text_tokens_BLD
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


class TinyCausalLM(nn.Module):
    """A decoder-only stack of the shared layers (a prior's shape): the cache is not CoCa's."""

    @nn.compact
    def __call__(self, x_BTD, valid_BS, cache_position=None):
        t = x_BTD.shape[1]
        mask_BTS = jnp.broadcast_to(valid_BS[:, None], (x_BTD.shape[0], t, valid_BS.shape[1]))
        for i in range(2):
            h = LayerNorm(name=f"ln_attn{i}")(x_BTD)
            x_BTD = x_BTD + Attention(2, name=f"attn{i}")(h, mask_BTS, True, cache_position)
            x_BTD = x_BTD + Mlp(64, name=f"mlp{i}")(LayerNorm(name=f"ln_mlp{i}")(x_BTD))
        return x_BTD


def test_a_decoder_only_stack_decodes_a_prompt_then_token_by_token():
    x = jax.random.normal(jax.random.key(0), (3, 8, 32))
    valid = jnp.ones((3, 8), bool).at[1, 2].set(False)
    model = TinyCausalLM()
    params = model.init(jax.random.key(1), x, valid)["params"]
    # The teacher-forced pass masks invalid keys within T = S.
    full = model.apply({"params": params}, x, valid)
    step = jax.jit(lambda c, x, t: decoding.apply_cached(model, params, c, x, valid, t))
    out, cache = step(None, x[:, :3], 0)
    np.testing.assert_allclose(out, full[:, :3], rtol=1e-5, atol=1e-5)  # a 3-token prompt
    for t in range(3, 8):
        out, cache = step(cache, x[:, t : t + 1], t)
        np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-5, atol=1e-5, err_msg=str(t))


def test_beams_move_the_token_caches_not_the_context():
    cache = {decoding.CACHE: {"k": jnp.arange(6.0)}, decoding.CONTEXT: {"kv": jnp.arange(6.0)}}
    moved = decoding.reorder(cache, jnp.array([0, 0, 1, 5, 3, 3]))
    np.testing.assert_array_equal(moved[decoding.CACHE]["k"], [0, 0, 1, 5, 3, 3])
    np.testing.assert_array_equal(moved[decoding.CONTEXT]["kv"], np.arange(6.0))
    assert decoding.reorder(None, jnp.arange(2)) is None


def test_decoding_argument_errors():
    x = jnp.ones((1, 1, 8))
    with pytest.raises(ValueError, match="needs mask_BTS over the cache slots"):
        Attention(2).init(jax.random.key(0), x, None, True, 0, mutable=True)
    with pytest.raises(ValueError, match="needs causal=True"):
        Attention(2).init(jax.random.key(0), x, jnp.ones((1, 1, 4), bool), False, 0)
    with pytest.raises(ValueError, match="length >= 2"):
        decoding.beam_search(None, 1, 1, 1, BOS, EOT, PAD)


@pytest.mark.slow  # the decoding loops compiled for 8 devices (~5 s)
@pytest.mark.multidevice
def test_cached_captions_on_the_8_device_mesh_are_the_learned_ones(coca):
    """Data, FSDP and tensor parallel (the cache's heads axis sharded too): greedy and beam
    captions of the trained weights are the training captions, as on one device without a
    cache (test_cached_captions_equal_prefix_rerun_captions)."""
    model, images, params = coca
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    rules = tuple(base_config.get_config().rules)
    abstract = jax.eval_shape(model.init, jax.random.key(1), images, padded(CAPTIONS))["params"]
    specs = nn.get_partition_spec(abstract)
    shardings = parallel.logical_shardings(nn.unbox(abstract), specs, mesh, rules)
    sharded_params = jax.device_put(params["trained"], shardings)
    sharded_images = jax.device_put(images, parallel.batch_sharding(mesh, rules))
    for beam in (1, 3):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            tokens, _ = decode(model, sharded_params, sharded_images, beam, cache=True)
        np.testing.assert_array_equal(tokens, padded(CAPTIONS), err_msg=f"beam {beam}")


@pytest.mark.slow
def test_decode_bench_reports_both_paths_with_the_same_captions(tmp_path, capsys):
    recipe = tmp_path / "tiny_captioning.py"
    recipe.write_text(
        "from configs import captioning\nfrom tests.conftest import tiny\n\n\n"
        "def get_config():\n    return tiny(captioning.get_config())\n"
    )
    args = ["decode", "--config", str(recipe), "--batch", "2", "--lengths", "6,8"]
    assert main([*args, "--rounds", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["decoder_depth"] == 2 and r["beam"] == 3  # the recipe's
    assert [(run["mode"], run["length"]) for run in r["runs"]] == [
        ("greedy", 6),
        ("beam", 6),
        ("greedy", 8),
        ("beam", 8),
    ]
    for run in r["runs"]:
        assert run["same_captions"], run
        assert run["cache_tokens_per_s"] == pytest.approx(2 * (run["length"] - 1) / run["cache_s"])
        assert run["speedup"] == pytest.approx(run["no_cache_s"] / run["cache_s"])
