"""Graph reasoning fusion: relabelling nodes changes nothing (text nodes among themselves, image
nodes together with their edges), padded text nodes never matter, the segment_sum and dense
adjacency paths agree (every readout), the count readout's gated sum, the grid's edges.
Sharded = single device: test_graph_fusion_sharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.graph_fusion import GraphFusion, gated_sum, grid_edges, square_grid

B, N, L, DV, DT = 2, 6, 5, 12, 16  # image tokens on a 2x3 grid
GRID = (2, 3)
# The text tower's pooled output: only readout="question" reads it.
TEXT_POOLED = jnp.asarray(np.random.default_rng(9).normal(size=(B, DT)), jnp.float32)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    it = jnp.asarray(rng.normal(size=(B, N, DV)), jnp.float32)
    tt = jnp.asarray(rng.normal(size=(B, L, DT)), jnp.float32)
    valid = jnp.asarray(np.arange(L)[None] < np.array([[L], [3]]))
    return it, tt, valid


def model(**kw):
    return GraphFusion(**{"width": 16, "depth": 2, "num_heads": 2, "grid": GRID, **kw})


@functools.cache
def params(readout="attention"):
    it, tt, valid = inputs()
    init = jax.jit(model(readout=readout).init)
    return init(jax.random.key(0), None, it, TEXT_POOLED, tt, valid)


@functools.cache
def _apply(**kw):
    return jax.jit(model(**kw).apply)


def apply(it, tt, valid, readout="attention", **kw):
    return _apply(readout=readout, **kw)(params(readout), None, it, TEXT_POOLED, tt, valid)


def test_grid_edges_join_axis_neighbours_both_ways():
    edges = {tuple(e) for e in grid_edges((2, 3)).tolist()}
    # 0 1 2 / 3 4 5: 3 vertical and 4 horizontal neighbour pairs, each both ways.
    expected = {(0, 3), (1, 4), (2, 5), (0, 1), (1, 2), (3, 4), (4, 5)}
    assert edges == expected | {(b, a) for a, b in expected}
    assert square_grid(16) == (4, 4) and square_grid(6) == (6,)


READOUTS = pytest.mark.parametrize("readout", ["attention", "question", "count"])


@READOUTS
def test_relabelling_nodes_changes_nothing(readout):
    it, tt, valid = inputs()
    run = functools.partial(apply, readout=readout)
    ref = run(it, tt, valid)
    # Text nodes: permute the real tokens of each row among themselves.
    perm_text = np.array([[4, 2, 0, 3, 1], [2, 0, 1, 3, 4]])
    tt_p = jnp.take_along_axis(tt, perm_text[..., None], axis=1)
    out = run(it, tt_p, valid)
    np.testing.assert_allclose(out.pooled_BD, ref.pooled_BD, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out.text_tokens_BLD,
        jnp.take_along_axis(ref.text_tokens_BLD, perm_text[..., None], axis=1),
        rtol=1e-5,
        atol=1e-6,
    )
    # Image nodes: new labels, the grid's edges relabelled alike.
    perm = np.array([4, 0, 5, 2, 1, 3])  # new node j is old node perm[j]
    new_label = np.argsort(perm)
    edges = tuple(map(tuple, new_label[grid_edges(GRID)].tolist()))
    out = run(it[:, perm], tt, valid, image_edges=edges)
    np.testing.assert_allclose(out.pooled_BD, ref.pooled_BD, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out.image_tokens_BND, ref.image_tokens_BND[:, perm], rtol=1e-5, atol=1e-6
    )
    # ... but the edges matter: the permuted nodes on the unpermuted grid give another output.
    other = run(it[:, perm], tt, valid)
    assert np.abs(np.asarray(other.pooled_BD - ref.pooled_BD)).max() > 1e-3


@READOUTS
def test_padded_text_nodes_never_matter_and_both_edge_paths_agree(readout):
    it, tt, valid = inputs()
    run = functools.partial(apply, readout=readout)
    ref = run(it, tt, valid)
    noise = jnp.asarray(100 * np.random.default_rng(1).normal(size=tt.shape), jnp.float32)
    out = run(it, jnp.where(valid[..., None], tt, noise), valid)
    for a, b in zip(ref[:3], out[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.all(np.asarray(out.text_tokens_BLD)[1, 3:] == 0)
    # More padding (longer rows) changes nothing either.
    longer = run(it, jnp.pad(tt, ((0, 0), (0, 3), (0, 0))), jnp.pad(valid, ((0, 0), (0, 3))))
    np.testing.assert_allclose(longer.pooled_BD, ref.pooled_BD, rtol=1e-5, atol=1e-6)
    segment = run(it, tt, valid, edges="segment")
    for a, b in zip(ref[:3], segment[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_question_readout_reads_the_text_towers_pooled_output():
    it, tt, valid = inputs()
    other = 2.0 * TEXT_POOLED[::-1]
    for readout, changes in (("attention", False), ("question", True), ("count", True)):
        ref = apply(it, tt, valid, readout=readout)
        out = _apply(readout=readout)(params(readout), None, it, other, tt, valid)
        moved = np.abs(np.asarray(out.pooled_BD - ref.pooled_BD)).max()
        assert (moved > 1e-3) if changes else (moved == 0.0), (readout, moved)
    for readout in ("question", "count"):
        with pytest.raises(ValueError, match="pooled output"):
            _apply(readout=readout)(params(readout), None, it, None, tt, valid)


def test_gated_sum_counts_the_matching_tokens():
    """The count readout's pooling: sigmoid gates summed, not normalised over the tokens, so
    the gate mass grows with the number of matching tokens (a softmax's stays 1); padded tokens
    weigh nothing. Against a numpy reference."""
    rng = np.random.default_rng(4)
    values = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)  # B, N, H, K
    scores = rng.normal(size=(2, 3, 5)).astype(np.float32)  # B, H, N
    valid = np.array([[True] * 5, [True, True, False, True, False]])
    summed, count = gated_sum(jnp.asarray(scores), jnp.asarray(values), jnp.asarray(valid))
    gates = np.where(valid[:, None], 1 / (1 + np.exp(-scores)), 0.0)
    np.testing.assert_allclose(count, gates.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(summed, np.einsum("bhn,bnhk->bhk", gates, values), rtol=1e-5)
    # Tokens that match (score +12) or not (-12): the gate mass is their number, 0, 1 or 2,
    # within 4 σ(-12) ≈ 2.5e-5.
    for matches in (0, 1, 2):
        s = np.full((1, 1, 4), -12.0, np.float32)
        s[..., :matches] = 12.0
        _, c = gated_sum(jnp.asarray(s), jnp.ones((1, 4, 1, 1)), jnp.ones((1, 4), bool))
        np.testing.assert_allclose(c, [[matches]], atol=3e-5)


def test_vqa_reads_the_default_runs_towers(tmp_path):
    """configs/vqa.py starts from the default run (`init_towers_from`): its towers must be
    mmjax/default_recipe.py's, or the checkpoint does not fit, and without that run it is
    refused before anything is built, saying to train it."""
    from configs import vqa
    from mmjax import default_recipe
    from mmjax.errors import ConfigError
    from mmjax.tasks import get_task
    from mmjax.train.validate import validate_config

    c, pretrained = vqa.get_config(), default_recipe.get_config().model
    assert c.model.image.to_dict() == pretrained.image.to_dict()
    assert c.model.text.to_dict() == pretrained.text.to_dict()
    assert c.model.fusion.kind == "graph" and c.model.fusion.readout == "count"
    assert c.optim.frozen_prefixes == ("image/", "text/")
    assert c.init_towers_from == "workdirs/default"  # where `python train.py` writes
    c.init_towers_from = str(tmp_path / "default")
    with pytest.raises(ConfigError, match=r"does not exist; train that run first .* python train"):
        validate_config(c, get_task(c.task))
    (tmp_path / "default").mkdir()
    validate_config(c, get_task(c.task))


def test_question_readout_on_another_fusion_is_an_error():
    from configs import vqa
    from mmjax.errors import ConfigError
    from mmjax.models.fusion_classifier import fusion_kwargs

    c = vqa.get_config()
    c.model.fusion.update(kind="cross_attention", readout="question")
    with pytest.raises(ConfigError, match="graph fusion's"):
        fusion_kwargs(c)
    c.model.fusion.kind = "graph"
    assert fusion_kwargs(c)["readout"] == "question"
