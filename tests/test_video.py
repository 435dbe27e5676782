"""Video tower (factorized and tubelet) and the built-in moving-shapes clip generator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.builtin import moving_shapes as ms
from mmjax.data.builtin.shapes import COLOR_RGB, COLORS, COLORS_ZH, HELDOUT_PAIRS, SHAPES, SHAPES_ZH
from mmjax.models.video import VideoTower, sincos1d, sincos3d

B, F, S, WIDTH = 2, 4, 16, 32


def tower(kind, **kw):
    kw = dict(patch_size=4, width=WIDTH, depth=1, num_heads=2, mlp_dim=64, temporal_depth=1) | kw
    return VideoTower(kind, **kw)


def random_clips(seed=0, frames=F):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, frames, S, S, 3)), jnp.float32)


def num_tokens(kind):
    return F if kind == "factorized" else (F // 2) * (S // 4) ** 2


# --- VideoTower ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["factorized", "tubelet"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tower_shapes_dtypes_finite_under_jit(kind, dtype):
    model = tower(kind, dtype=dtype)
    clips = random_clips()
    variables = model.init(jax.random.key(0), clips)
    # Storage stays float32 whatever the compute dtype; every parameter has logical axes.
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    assert all(len(x.names) == x.value.ndim and x.value.dtype == jnp.float32 for x in boxed)
    pooled, tokens = jax.jit(model.apply)(variables, clips)
    assert pooled.shape == (B, WIDTH) and tokens.shape == (B, num_tokens(kind), WIDTH)
    assert pooled.dtype == dtype and tokens.dtype == dtype
    assert np.isfinite(np.asarray(pooled, np.float32)).all()
    assert np.isfinite(np.asarray(tokens, np.float32)).all()
    # Examples are independent: a different second clip leaves the first one's output alone.
    other = clips.at[1].set(random_clips(seed=1)[1])
    pooled2, _ = jax.jit(model.apply)(variables, other)
    np.testing.assert_allclose(
        np.asarray(pooled[0], np.float32), np.asarray(pooled2[0], np.float32), rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(np.asarray(pooled[1], np.float32), np.asarray(pooled2[1], np.float32))


def test_cls_pooling_and_learned_positions():
    clips = random_clips()
    for kind, extra in (("factorized", dict(time_posemb="learn")), ("tubelet", {})):
        model = tower(kind, pool="cls", **extra)
        variables = nn.unbox(model.init(jax.random.key(0), clips))
        pooled, tokens = model.apply(variables, clips)
        assert "cls_token" in variables["params"]
        assert pooled.shape == (B, WIDTH) and tokens.shape == (B, num_tokens(kind), WIDTH)
    params = nn.unbox(tower("factorized", time_posemb="learn").init(jax.random.key(0), clips))
    assert params["params"]["time_embedding"].shape == (F, WIDTH)
    params = nn.unbox(tower("tubelet").init(jax.random.key(0), clips))["params"]
    assert "pos_embedding" not in params  # sincos3d is fixed
    assert params["tubelet_kernel"].shape == (2 * 4 * 4 * 3, WIDTH)


def apply_with_intermediates(model, variables, clips):
    (pooled, tokens), state = model.apply(variables, clips, mutable=["intermediates"])
    (inter,) = jax.tree.leaves(state["intermediates"])
    return np.asarray(pooled), np.asarray(tokens), np.asarray(inter)


@pytest.mark.parametrize("kind", ["factorized", "tubelet"])
def test_temporal_order_matters_but_static_frames_embed_alike(kind):
    model = tower(kind)
    clips = random_clips()
    variables = model.init(jax.random.key(0), clips)
    pooled, _, inter = apply_with_intermediates(model, variables, clips)
    rev_pooled, _, rev_inter = apply_with_intermediates(model, variables, clips[:, ::-1])
    # The same frames in reverse order are a different video.
    assert np.abs(pooled - rev_pooled).max() > 1e-3
    if kind == "factorized":
        # ... though each frame, seen alone by the spatial ViT, gives the same features.
        np.testing.assert_allclose(rev_inter, inter[:, ::-1], rtol=1e-5, atol=1e-5)

    # A static clip: every frame (factorized) / every tubelet in time (tubelet) embeds the
    # same before time positions are added; after them the time steps are told apart.
    static = jnp.repeat(clips[:, :1], F, axis=1)
    _, tokens, inter = apply_with_intermediates(model, variables, static)
    for t in range(1, inter.shape[1]):
        np.testing.assert_allclose(inter[:, t], inter[:, 0], rtol=1e-5, atol=1e-5)
    first, last = (
        (tokens[:, 0], tokens[:, -1]) if kind == "factorized" else (tokens[:, :16], tokens[:, -16:])
    )
    assert np.abs(first - last).max() > 1e-3


def test_bad_sizes_raise_clear_errors():
    clips = random_clips()
    with pytest.raises(ValueError, match="not divisible by patch size 5"):
        tower("factorized", patch_size=5).init(jax.random.key(0), clips)
    with pytest.raises(ValueError, match="not divisible by patch size 3"):
        tower("tubelet", patch_size=3).init(jax.random.key(0), clips)
    with pytest.raises(ValueError, match="5 frames are not divisible by tubelet size 2"):
        tower("tubelet").init(jax.random.key(0), random_clips(frames=5))
    with pytest.raises(ValueError, match="kind must be one of"):
        tower("spacetime").init(jax.random.key(0), clips)
    with pytest.raises(ValueError, match=r"clips \[B, F, H, W, C\]"):
        tower("tubelet").init(jax.random.key(0), clips[:, 0])


def test_sincos_position_embeddings():
    pos = np.asarray(sincos3d(2, 3, 4, 64))
    assert pos.shape == (24, 64)
    assert len({tuple(np.round(r, 5)) for r in pos}) == 24  # every space-time position distinct
    np.testing.assert_array_equal(pos[:, 60:], 0.0)  # 64 = 6 * 10 + 4 position-free dims
    np.testing.assert_allclose(np.mean(pos[:, :60] ** 2), 0.5, rtol=1e-5)
    time = np.asarray(sincos1d(8, 32))
    assert time.shape == (8, 32) and len({tuple(np.round(r, 5)) for r in time}) == 8
    with pytest.raises(ValueError):
        sincos3d(2, 2, 2, 4)


# --- moving_shapes -------------------------------------------------------------------------


def test_clip_is_a_pure_function_of_seed_split_index():
    frames, caps, attrs = ms.generate_clip("train", 5, seed=3)
    again, caps2, attrs2 = ms.generate_clip("train", 5, seed=3)
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(frames, again)
    assert caps == caps2 and attrs == attrs2
    for other in (("train", 6, 3), ("train", 5, 4), ("validation", 5, 3)):
        f, _, _ = ms.generate_clip(other[0], other[1], seed=other[2])
        assert not np.array_equal(f, frames)
    frames, _, _ = ms.generate_clip("validation", 0, num_frames=12, image_size=48)
    assert frames.shape == (12, 48, 48, 3)
    # Consecutive frames differ: something moves in every frame.
    assert all(not np.array_equal(frames[i], frames[i + 1]) for i in range(11))
    with pytest.raises(ValueError):
        ms.generate_clip("test", 0)
    with pytest.raises(ValueError):
        ms.generate_clip("train", 0, num_frames=1)


def centroids(frames, color):
    """Sub-pixel centre (x, y) of the shape of `color` in every frame, from pixels alone.

    Each pixel's background is its value in the frame where it is least like the shape colour
    (the shape covers no pixel in every frame); a pixel's coverage is its projection from that
    background onto the shape colour. Still pixels (background, distractor) get coverage 0.
    """
    x = frames.astype(np.float64)
    target = COLOR_RGB[color].astype(np.float64)
    far = np.argmax(np.linalg.norm(x - target, axis=-1), axis=0)  # [S, S]
    bg = np.take_along_axis(x, far[None, :, :, None], axis=0)[0]  # [S, S, 3]
    toward = target - bg
    cov = np.clip(np.sum((x - bg) * toward, -1) / np.sum(toward * toward, -1), 0.0, 1.0)
    ys, xs = np.mgrid[: x.shape[1], : x.shape[2]]
    mass = cov.sum(axis=(1, 2))
    assert (mass > 4).all(), "the moving shape should be clearly visible in every frame"
    return np.stack([(cov * xs).sum((1, 2)) / mass, (cov * ys).sum((1, 2)) / mass], axis=-1)


@pytest.mark.parametrize("size,frames", [(32, 8), (64, 16)])
def test_shape_moves_in_its_direction_at_constant_speed(size, frames):
    seen = set()
    # Validation cycles direction fastest: 40 clips cover every direction five times, with
    # and without distractors, and indices 0..39 and 300..339 reach several shapes.
    for index in (*range(40), *range(300, 340)):
        clip, _, attrs = ms.generate_clip("validation", index, num_frames=frames, image_size=size)
        seen.add(attrs.direction)
        c = centroids(clip, attrs.color)
        steps = np.diff(c, axis=0)
        mean = steps.mean(axis=0)
        expected = np.array(ms.DIRECTION_STEPS[attrs.direction], np.float64)
        expected /= np.linalg.norm(expected)
        assert np.linalg.norm(mean) > 0.5, (index, mean)
        cos = mean @ expected / np.linalg.norm(mean)
        assert cos > np.cos(np.deg2rad(5)), (index, ms.DIRECTIONS[attrs.direction], mean)
        # Constant speed: every frame-to-frame step is the mean step, up to drawing error (PIL
        # snaps vertices to the 4x supersampling grid, i.e. to 1/4 pixel) and uint8 rounding.
        assert np.abs(steps - mean).max() < 0.35, (index, steps)
        # The shape stays inside the frame: the border pixels never change.
        border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], 1)
        assert (border == border[:1]).all()
        if attrs.has_distractor:
            assert attrs.distractor_color != attrs.color
    assert seen == set(range(len(ms.DIRECTIONS)))


def test_attribute_sampling_and_held_out_pairs():
    train = [ms.generate_clip("train", i)[2] for i in range(150)]
    assert not any((a.shape, a.color) in HELDOUT_PAIRS for a in train)
    assert {a.direction for a in train} == set(range(8))
    assert 0.2 < np.mean([a.has_distractor for a in train]) < 0.6
    val = [ms.generate_clip("validation", i)[2] for i in range(0, 384, 7)]
    assert any(a.heldout for a in val)
    assert [a.direction for a in val] == [i % 8 for i in range(0, 384, 7)]


def test_captions_name_colour_shape_and_direction_in_both_languages():
    for index in range(0, 384, 11):
        _, caps, a = ms.generate_clip("validation", index)
        assert len(caps) == ms.NUM_EN_CAPTIONS + ms.NUM_ZH_CAPTIONS
        color, shape = COLORS[a.color], SHAPES[a.shape]
        phrase = ms.DIRECTION_PHRASES[a.direction]
        article = "an" if color[0] in "aeiou" else "a"
        assert caps[0] == f"{article} {color} {shape} moving {phrase}" == ms.canonical_caption(a)
        en, zh = caps[: ms.NUM_EN_CAPTIONS], caps[ms.NUM_EN_CAPTIONS :]
        # Every caption but the last English group names the direction; colour and shape
        # together appear in the full descriptions of both languages.
        assert all(phrase in c for c in en[:-1]) and color in en[-1] and shape in en[-1]
        assert all(ms.DIRECTIONS_ZH[a.direction] in c for c in zh)
        assert COLORS_ZH[a.color] in zh[0] and SHAPES_ZH[a.shape] in zh[0]
        assert all(not any(ord(ch) > 127 for ch in c) for c in en)
    _, caps, _ = ms.generate_clip("validation", 0)
    assert caps[0] == "a red circle moving to the left" and caps[5].startswith(("一个向左", "红色"))


def test_video_qa_answers_match_attributes():
    answers = set()
    for index in range(60):
        _, _, a = ms.generate_clip("train", index)
        qa = ms.video_qa(a, np.random.default_rng(index))
        assert qa == ms.video_qa(a, np.random.default_rng(index))  # deterministic given rng
        assert len(qa) == (7 if a.has_distractor else 4)
        for question, answer in qa:
            assert answer in ms.ANSWERS
            answers.add(answer)
            if question.startswith("which way"):
                assert answer == ms.DIRECTIONS[a.direction]
                assert COLORS[a.color] in question or SHAPES[a.shape] in question
            elif "standing still" in question:
                assert answer == COLORS[a.distractor_color]
            elif question.startswith("what colo"):
                assert answer == COLORS[a.color]
            elif "not moving" in question:
                assert answer == SHAPES[a.distractor_shape]
            elif question.startswith(("what shape", "which shape")):
                assert answer == SHAPES[a.shape]
            elif question.startswith("is the moving shape going"):
                truth = question.endswith(f"going {ms.DIRECTION_PHRASES[a.direction]}?")
                assert answer == ("yes" if truth else "no")
            else:
                assert question.startswith("is the") and answer == "no", question
    assert {"yes", "no"} <= answers and len(set(ms.ANSWERS)) == len(ms.ANSWERS)
