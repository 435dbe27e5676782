"""Timing and compiled-program statistics shared by the benchmark subcommands."""

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def time_calls(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `fn` after `warmup` untimed ones; every call is waited
    for (`block_until_ready`), so asynchronous dispatch cannot hide work."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def compiled_stats(compiled) -> dict:
    """XLA's FLOP count and per-device memory of a compiled program (bytes; None if unknown)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    get = (lambda name: int(getattr(mem, name))) if mem is not None else (lambda name: None)
    return {
        "xla_flops": float(cost.get("flops", float("nan"))) if cost else None,
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }


def matmul_ceiling(dtype: str, n: int = 2048, steps: int = 10) -> float:
    """Measured FLOP/s of a square [n, n] @ [n, n] GEMM with `dtype` inputs and float32
    accumulation: the best a matmul-bound step can reach on this device (the CPU MFU
    denominator)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    gemm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    seconds = median(time_calls(lambda: gemm(a, b), steps, warmup=2))
    return 2.0 * n**3 / seconds


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")
