"""`bench train --profile`: op time from a real jax.profiler trace, by kind of op and pass."""

import jax
import jax.numpy as jnp
import pytest

from mmjax.bench import profile


def test_hlo_ops_classify_kinds_and_passes():
    """A gradient step's optimized HLO: the matmuls are GEMMs of the forward and backward passes,
    the update under the `optimizer` scope is the optimizer's, control ops are set apart."""

    def step(w, x):
        loss = lambda w: jnp.sum(jax.nn.gelu(x @ w) ** 2)
        g = jax.grad(loss)(w)
        with jax.named_scope("optimizer"):
            return w - 0.1 * g / (jnp.abs(g) + 1.0)

    w, x = jnp.ones((64, 32)), jnp.ones((16, 64))
    ops = profile.hlo_ops(jax.jit(step).lower(w, x).compile().as_text())
    kinds = {(op["pass"], op["kind"]) for op in ops.values()}
    assert ("forward", "gemm") in kinds and ("backward", "gemm") in kinds
    assert ("optimizer", "elementwise") in kinds
    assert profile._kind("conditional", set()) == "control"
    assert profile._kind("fusion", {"parameter", "transpose", "convert"}) == "data movement"
    assert profile._kind("fusion", {"parameter", "reduce", "add"}) == "reduction"
    assert profile._kind("fusion", {"parameter", "dot", "add"}) == "gemm"
    assert profile._pass("jit(f)/transpose(jvp(Model))/dense/dot_general") == "backward"
    assert profile._pass("jit(f)/jvp(Model)/dense/dot_general") == "forward"


def test_profile_counts_the_steps_after_settling_and_sums_by_kind(tmp_path):
    """Every counted op lies inside one of the counted steps; the per-kind and per-pass sums
    are the op time; the trace stays on disk for Perfetto."""
    a = jnp.ones((256, 256))
    f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    f(a).block_until_ready()
    p = profile.profile_variant(lambda: f(a), f.lower(a).compile().as_text(), 3, str(tmp_path))
    assert p["steps"] == 3 and len(p["step_s"]) == 3 and all(s > 0 for s in p["step_s"])
    assert p["by_kind"]["gemm"] > 0
    assert sum(p["by_kind"].values()) == pytest.approx(p["op_s_per_step"])
    assert sum(p["by_pass_kind"].values()) == pytest.approx(p["op_s_per_step"])
    gemms = [op for op in p["top_ops"] if op["kind"] == "gemm"]
    assert gemms and all(op["calls_per_step"] >= 1 for op in gemms)
    ms = [op["s_per_step"] for op in p["top_ops"]]
    assert ms == sorted(ms, reverse=True)
    assert list(tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz"))
