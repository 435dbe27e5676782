"""Model behaviour: shapes, dtypes, finiteness, masking and pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as base_config
from mmjax.models.text import TextTransformer
from mmjax.models.two_tower import build_two_tower
from mmjax.models.vision import ViT

VOCAB = 64


def tiny_config(dtype="float32"):
    c = base_config.get_config()
    c.dtype = dtype
    c.data.image_size = 16
    c.data.text_length = 12
    c.model.embed_dim = 16
    c.model.image.update(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
    c.model.text.update(width=32, depth=2, num_heads=4, mlp_dim=64)
    c.optim.text_frozen_steps = 0
    return c


def example_inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
    tokens = rng.integers(3, VOCAB, size=(batch, 12)).astype(np.int32)
    lengths = np.array([12, 7, 3, 10][:batch])
    for i, n in enumerate(lengths):
        tokens[i, n - 1] = 2  # EOT
        tokens[i, n:] = 0  # padding
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_tower_shapes_dtypes_finite(use_jit, dtype):
    config = tiny_config(dtype)
    model = build_two_tower(config, VOCAB)
    images, tokens = example_inputs()
    variables = model.init(jax.random.key(0), images, tokens)
    apply = jax.jit(model.apply) if use_jit else model.apply
    img, txt, aux = apply(variables, images, tokens)
    assert img.shape == txt.shape == (4, 16)
    # Embeddings and loss inputs are float32 whatever the compute dtype.
    assert img.dtype == txt.dtype == jnp.float32
    assert aux["logit_scale"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(img)) and np.all(np.isfinite(txt))
    # Parameters stay float32 (optimizer precision) even when computing in bf16.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_towers_compute_in_configured_dtype():
    """Both towers' token outputs come out in the compute dtype (a tower silently left in fp32
    while the other runs bf16 is a classic bug)."""
    config = tiny_config("bfloat16")
    model = build_two_tower(config, VOCAB)
    images, tokens = example_inputs()
    variables = model.init(jax.random.key(0), images, tokens)
    params = variables["params"]
    _, img_tokens = model.image.apply({"params": params["image"]}, images)
    _, txt_tokens = model.text.apply({"params": params["text"]}, tokens)
    assert img_tokens.dtype == jnp.bfloat16
    assert txt_tokens.dtype == jnp.bfloat16


def text_tower(causal=True):
    return TextTransformer(
        vocab_size=VOCAB, width=32, depth=2, num_heads=4, mlp_dim=64, max_len=12, causal=causal
    )


def test_causal_mask_is_causal():
    """Changing token t changes no output at positions < t."""
    tower = text_tower()
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, size=(2, 12)), jnp.int32)
    params = tower.init(jax.random.key(0), tokens)
    _, out = tower.apply(params, tokens)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB + 3)
    _, out2 = tower.apply(params, changed)
    np.testing.assert_array_equal(out[:, :6], out2[:, :6])
    assert not np.allclose(out[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_is_ignored(causal):
    """What sits at padded positions never reaches the pooled feature: perturbing the pad token's
    embedding and the position embeddings of padded positions, or cutting padding columns off,
    leaves it unchanged."""
    tower = text_tower(causal)
    _, tokens = example_inputs()
    params = tower.init(jax.random.key(0), tokens)
    pooled, _ = tower.apply(params, tokens)

    params = nn.unbox(params)
    perturbed = jax.tree.map(lambda x: x, params)
    inner = perturbed["params"]
    inner["token_embedding"] = inner["token_embedding"].at[0].add(3.0)  # pad id 0
    inner["pos_embedding"] = inner["pos_embedding"].at[3:].add(5.0)  # padded part of example 2
    pooled2, _ = tower.apply(perturbed, tokens[2:3])
    np.testing.assert_allclose(pooled[2:3], pooled2, rtol=1e-5, atol=1e-6)

    pooled_short, _ = jax.jit(tower.apply)(params, tokens[1:3, :8])  # lengths 7 and 3
    np.testing.assert_allclose(pooled[1:3], pooled_short, rtol=1e-5, atol=1e-6)


def test_eot_pooling_ignores_tokens_after_eot():
    """The causal tower pools at the first EOT token: ids after it, even non-pad ones, cannot
    change the pooled feature."""
    tower = text_tower(causal=True)
    _, tokens = example_inputs()
    params = tower.init(jax.random.key(0), tokens)
    pooled, _ = tower.apply(params, tokens)
    garbage = np.asarray(tokens).copy()
    garbage[2, 3:] = np.arange(3, 12) + 10  # example 2 has EOT at index 2
    pooled2, _ = tower.apply(params, jnp.asarray(garbage))
    np.testing.assert_allclose(pooled, pooled2, rtol=1e-5, atol=1e-6)


def test_vit_pooling_options():
    for pool in ("gap", "cls"):
        vit = ViT(patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, pool=pool)
        images, _ = example_inputs()
        params = vit.init(jax.random.key(0), images)
        pooled, tokens = vit.apply(params, images)
        assert pooled.shape == (4, 32) and tokens.shape == (4, 16, 32)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViT(patch_size=5, width=32, depth=1, num_heads=4, mlp_dim=64).init(
            jax.random.key(0), images
        )


def test_every_parameter_has_logical_axes():
    import flax.linen as nn

    model = build_two_tower(tiny_config(), VOCAB)
    images, tokens = example_inputs()
    boxed = model.init(jax.random.key(0), images, tokens)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_sincos2d_position_embeddings():
    from mmjax.models.vision import sincos2d

    pos = np.asarray(sincos2d(4, 4, 32))
    assert pos.shape == (16, 32)
    # Unit-scale features, and every patch position distinct.
    np.testing.assert_allclose(np.mean(pos**2), 0.5, rtol=1e-5)
    assert len({tuple(np.round(r, 5)) for r in pos}) == 16
    vit = ViT(patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, posemb="sincos2d")
    images, _ = example_inputs()
    params = nn.unbox(vit.init(jax.random.key(0), images))["params"]
    assert "pos_embedding" not in params  # fixed, not learned
    learned = ViT(patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, posemb="learn")
    assert "pos_embedding" in nn.unbox(learned.init(jax.random.key(0), images))["params"]
