"""Timing shared by the benchmarks: per-call times and their report. numpy only, so a
benchmark that runs where the project's environment is absent (a GPU machine, for
``benchmarks.triton_gpu``) can use it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def timed(call: Callable[[Any], object], rows: list[Any]) -> np.ndarray:
    """Milliseconds of each call on ``rows`` (after 50 unmeasured)."""
    for row in rows[:50]:  # warm-up
        call(row)
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        call(row)
        out[i] = time.perf_counter() - t0
    return out * 1000


def report(name: str, ms: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    print(
        f"    {name:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   {1000 / ms.mean():9,.0f} calls/s"
    )
    return p50, p99
