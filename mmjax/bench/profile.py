"""`bench train --profile DIR`: where an mmjax variant's step time goes, by kind of op and pass.

After the timed rounds, each mmjax variant runs `SETTLE_STEPS + steps` more steps under
`jax.profiler.trace(DIR/<dtype>)`; the first `SETTLE_STEPS` are not counted (the steps right
after the profiler starts ran up to 50 % slower here). Every op event of the counted steps is
joined by name with the compiled program's HLO (`compiled.as_text()`), which gives its kind and
its pass:

  kind   gemm (a dot or convolution in it), gather/scatter, reduction, data movement (copies,
         transposes, slices, concatenations, converts, fills: nothing computed), elementwise;
         control ops (conditional, while, call) are not counted, the ops inside them are;
  pass   forward (`jvp(` in its op_name), backward (`transpose(jvp(`), optimizer (the train
         step's `optimizer` scope), other (loss, norms, metrics, and the copies XLA adds for
         layouts, which carry no op_name).

Op time is the sum of op events over all threads, per step: on a CPU a large GEMM also runs on
other cores through XLA's thread pool without an event there, so op time is not CPU time and
the trace cannot tell idle cores (`bench train` reports CPU time per step beside it). The trace
itself stays in DIR for Perfetto (ui.perfetto.dev) or TensorBoard.

The report (`--json`: each mmjax variant's "profile") holds: trace_dir, steps, step_s (each
counted step, wall), op_s_per_step, by_kind {kind: s per step}, by_pass_kind {"pass/kind": s per
step}, top_ops [{name, kind, pass, shape, s_per_step, calls_per_step}] (the 12 largest).
"""

import bisect
import collections
import glob
import gzip
import json
import os
import re

import jax

SETTLE_STEPS = 2
STEP_ANNOTATION = "mmjax_bench_step"
TOP_OPS = 12
MOVEMENT = {
    "parameter", "constant", "copy", "transpose", "bitcast", "reshape", "slice", "concatenate",
    "convert", "broadcast", "pad", "dynamic-slice", "tuple", "get-tuple-element", "iota",
    "copy-start", "copy-done", "reverse",
}  # fmt: skip
CONTROL = {"conditional", "while", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\(")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {kind, pass, shape}} of every instruction of an optimized HLO module
    (a fusion's kind from the opcodes of the computation it calls)."""
    opcodes_of, current, instructions = collections.defaultdict(set), None, []
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, shape, opcode = m.groups()
        opcodes_of[current].add(opcode)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        instructions.append((name, shape, opcode, calls, op_name))
    ops = {}
    for name, shape, opcode, calls, op_name in instructions:
        called = opcodes_of.get(calls.group(1), set()) if calls else set()
        ops[name] = {
            "kind": _kind(opcode, called),
            "pass": _pass(op_name.group(1) if op_name else ""),
            "shape": shape.split("{")[0],
        }
    return ops


def _kind(opcode: str, called_opcodes: set[str]) -> str:
    opcodes = called_opcodes if opcode == "fusion" else called_opcodes | {opcode}
    if opcode in CONTROL:
        return "control"
    if opcodes & {"dot", "convolution"}:
        return "gemm"
    if opcodes & {"gather", "scatter", "dynamic-update-slice"}:
        return "gather/scatter"
    if opcodes & {"reduce", "reduce-window"}:
        return "reduction"
    if opcodes <= MOVEMENT:
        return "data movement"
    return "elementwise"


def _pass(op_name: str) -> str:
    if "/optimizer/" in op_name:
        return "optimizer"
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "other"


def trace_steps(step, steps: int, out_dir: str) -> str:
    """Runs `SETTLE_STEPS + steps` steps under the profiler, each inside a trace annotation;
    returns the trace file (Perfetto JSON)."""
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(SETTLE_STEPS + steps):
            with jax.profiler.TraceAnnotation(STEP_ANNOTATION):
                jax.block_until_ready(step())
    found = sorted(glob.glob(os.path.join(out_dir, "plugins/profile/*/perfetto_trace.json.gz")))
    if not found:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {out_dir}")
    return found[-1]


def summarize(trace_path: str, ops: dict[str, dict], settle: int = SETTLE_STEPS) -> dict:
    """Op time per step of the counted steps (all but the first `settle` annotated ones)."""
    with gzip.open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    annotated = [e for e in events if e["name"] == STEP_ANNOTATION]
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in annotated)[settle:]
    if not windows:
        raise RuntimeError(f"{trace_path}: no step after the first {settle} to count")
    starts = [a for a, _ in windows]
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        op = ops.get(e["name"])
        if op is None or op["kind"] == "control":
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1  # the last step starting at or before it
        if i >= 0 and e["ts"] < windows[i][1]:
            per_op[e["name"]] += e["dur"] * 1e-6
            calls[e["name"]] += 1
    n = len(windows)
    by_kind, by_pass_kind = collections.Counter(), collections.Counter()
    for name, s in per_op.items():
        by_kind[ops[name]["kind"]] += s / n
        by_pass_kind[f"{ops[name]['pass']}/{ops[name]['kind']}"] += s / n
    top = [
        {"name": name, **ops[name], "s_per_step": s / n, "calls_per_step": calls[name] / n}
        for name, s in per_op.most_common(TOP_OPS)
    ]
    return {
        "steps": n,
        "step_s": [(b - a) * 1e-6 for a, b in windows],
        "op_s_per_step": sum(per_op.values()) / n,
        "by_kind": dict(by_kind.most_common()),
        "by_pass_kind": dict(by_pass_kind.most_common()),
        "top_ops": top,
    }


def profile_variant(step, hlo_text: str, steps: int, out_dir: str) -> dict:
    trace = trace_steps(step, steps, out_dir)
    return {"trace_dir": out_dir, **summarize(trace, hlo_ops(hlo_text))}


def print_profile(label: str, p: dict) -> None:
    step_ms = 1e3 * sum(p["step_s"]) / p["steps"]
    print(
        f"profile of {label}: {p['steps']} steps, {step_ms:.1f} ms each; op time "
        f"{p['op_s_per_step'] * 1e3:.1f} ms per step over all threads (trace: {p['trace_dir']})"
    )
    for key, s in p["by_pass_kind"].items():
        print(f"  {key:<28}{s * 1e3:>8.1f} ms {s / p['op_s_per_step']:>6.1%}")
    print("  largest ops:")
    for op in p["top_ops"]:
        print(
            f"    {op['s_per_step'] * 1e3:>7.2f} ms  {op['calls_per_step']:>4.1f}x  "
            f"{op['pass'] + '/' + op['kind']:<26}{op['shape']:<22}{op['name']}"
        )
