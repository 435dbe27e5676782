"""Model FLOPs of one training step, counted from the jaxpr of the task's objective.

Every task's model and loss reach the trainer as one function, the objective; its jaxpr (traced
on abstract shapes: nothing is compiled or run) lists every matmul and convolution with its
shapes. So one counter serves every task, including a user's own, and stays exact when a model
changes: no per-architecture formula to keep in step with the code.

Convention (the usual MFU numerator, and `mmjax.bench.flops`'s analytic count for two-tower
models): 2 FLOPs per multiply-add of every `dot_general` and convolution of the forward pass;
element-wise work (LayerNorm, GELU, softmax, the optimizer) is not counted. A matmul on the
gradient path (an operand depends on the parameters) counts 3× (forward, and the two backward
matmuls: input and weight gradient); one off it (a frozen teacher, a `stop_gradient` branch)
counts once. Counting the forward jaxpr rather than the compiled step is what excludes
recomputation: a rematerialised block (`remat2`) appears once, and a `scan` body counts
`length` times, unlike XLA's `cost_analysis()`, which counts a loop body once and includes
whatever recomputation and element-wise work the compiler emits.

A program whose matmul count cannot be known from its shapes (a `while` loop of unknown trip
count, `cond` branches of different cost) raises `UncountableError`; the loop then leaves the
MFU metrics out rather than report a wrong number.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

BACKWARD_FACTOR = 3  # forward + gradient w.r.t. the input + gradient w.r.t. the weight


class UncountableError(ValueError):
    """The program's matmul FLOPs depend on run-time values."""


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    shared = math.prod(lhs[d] for d in (*lhs_contract, *lhs_batch))
    # B·M·K × B·K·N / (B·K) = B·M·N·K multiply-adds.
    return 2 * math.prod(lhs) * math.prod(rhs) // max(shared, 1)


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    # Each output element: kernel window × input features of its group.
    return 2 * math.prod(out) * math.prod(kernel) // out_features


def _is_float(var) -> bool:
    aval = getattr(var, "aval", None)
    return aval is not None and jnp.issubdtype(aval.dtype, jnp.floating)


def _sub_jaxpr(value):
    """The open Jaxpr of a jaxpr-valued equation parameter, or None."""
    if isinstance(value, core.ClosedJaxpr):
        return value.jaxpr
    return value if isinstance(value, core.Jaxpr) else None


class _Counter:
    def count(self, jaxpr, differentiable: list[bool]) -> tuple[int, list[bool]]:
        """(matmul FLOPs of one run of `jaxpr` per the convention, which outputs are
        differentiable) given which inputs are."""
        grad = {v: d and _is_float(v) for v, d in zip(jaxpr.invars, differentiable, strict=True)}
        on_path = lambda v: isinstance(v, core.Var) and grad.get(v, False)
        total = 0
        for eqn in jaxpr.eqns:
            ins = [on_path(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in ("dot_general", "conv_general_dilated"):
                flops = _dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
                total += flops * (BACKWARD_FACTOR if any(ins) else 1)
                outs = [any(ins)] * len(eqn.outvars)
            elif name == "stop_gradient":
                outs = [False] * len(eqn.outvars)
            else:
                flops, outs = self._nested(eqn, ins)
                total += flops
            for v, d in zip(eqn.outvars, outs, strict=True):
                grad[v] = d and _is_float(v)
        return total, [on_path(v) for v in jaxpr.outvars]

    def _nested(self, eqn, ins: list[bool]) -> tuple[int, list[bool]]:
        name, params = eqn.primitive.name, eqn.params
        if name == "scan":
            return self._scan(eqn, ins)
        if name == "while":
            raise UncountableError("a while loop runs an unknown number of times")
        if name == "cond":
            branches = [self.count(_sub_jaxpr(b), ins[1:]) for b in params["branches"]]
            if len({flops for flops, _ in branches}) > 1:
                raise UncountableError("lax.cond branches of different matmul cost")
            outs = [any(o) for o in zip(*(outs for _, outs in branches), strict=True)]
            return branches[0][0], outs
        subs = [j for j in map(_sub_jaxpr, params.values()) if j is not None]
        if not subs:  # element-wise, reductions, gathers, collectives: no matmul FLOPs
            return 0, [any(ins)] * len(eqn.outvars)
        body = next((j for j in subs if len(j.invars) == len(eqn.invars)), None)
        if body is None:
            raise UncountableError(f"no rule to count FLOPs inside {name!r}")
        flops, outs = self.count(body, ins)  # jit, remat2, custom_jvp/vjp calls, shard_map
        if name == "shard_map":  # the body runs once per shard of its manual mesh axes
            sizes = dict(params["mesh"].shape)
            flops *= math.prod(sizes[a] for a in params["newly_manual_axes"])
        return flops, outs

    def _scan(self, eqn, ins: list[bool]) -> tuple[int, list[bool]]:
        body = _sub_jaxpr(eqn.params["jaxpr"])
        consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
        flags = list(ins)
        while True:  # a carry joins the gradient path once any iteration puts it there
            flops, outs = self.count(body, flags)
            widened = [
                f or o for f, o in zip(flags[consts : consts + carry], outs[:carry], strict=True)
            ]
            if widened == flags[consts : consts + carry]:
                return flops * eqn.params["length"], outs
            flags[consts : consts + carry] = widened


def jaxpr_train_flops(closed: core.ClosedJaxpr, differentiable: list[bool]) -> int:
    """Training FLOPs of a forward jaxpr whose inputs flagged in `differentiable` are trained."""
    return _Counter().count(closed.jaxpr, differentiable)[0]


def train_step_flops(
    objective, abstract_params, example_batch: dict, batch_size: int, abstract_model_state=None
) -> int:
    """Model FLOPs of one training step of `objective` on a global batch of `batch_size`
    examples shaped like `example_batch` (one example each). Trace it under the run's mesh and
    axis rules. Raises `UncountableError` when the count depends on run-time values. A model
    with state (`abstract_model_state` not empty) is traced through `objective.with_state`."""
    batch = {
        k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)[1:]), np.asarray(v).dtype)
        for k, v in example_batch.items()
    }
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    if abstract_model_state:  # (its state is an input, not trained: after the parameters)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_model_state)
        traced = lambda p, b, s, m: objective.with_state(p, m, b, s)[:2]
        closed = jax.make_jaxpr(traced)(params, batch, step, state)
    else:
        closed = jax.make_jaxpr(objective)(params, batch, step)
    n_params = len(jax.tree.leaves(params))
    differentiable = [i < n_params for i in range(len(closed.jaxpr.invars))]
    return jaxpr_train_flops(closed, differentiable)
