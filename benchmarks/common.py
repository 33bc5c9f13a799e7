"""Timing, FLOP and memory helpers shared by the benchmarks."""
from __future__ import annotations

import platform
import resource
import statistics
import time

import jax


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_jax(fn, *args, **kwargs):
    """(compiled executable, compile seconds, GFLOPs from cost_analysis or nan)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, gflops(compiled)


def gflops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) / 1e9


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A markdown table of ``rows`` restricted to ``columns``."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
