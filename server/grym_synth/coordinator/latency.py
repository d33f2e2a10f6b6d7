"""Time to first token and inter-token latency of a coordinator backend (scripts/bench_coordinator.py, tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np

from grym_synth.coordinator.base import CoordinatorBackend


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values) * 1000.0
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "mean": round(float(arr.mean()), 3),
    }


async def measure_stream_latency(
    backend: CoordinatorBackend,
    prompt: str,
    *,
    runs: int = 5,
    warmup: int = 1,
    max_tokens: int = 64,
    concurrency: int = 1,
    raw_tokens: bool = True,
    **sampling: Any,
) -> dict[str, Any]:
    """Time to first token and inter-token latency (ms, p50/p99/mean) over ``runs`` streams.

    ``raw_tokens=True`` times every Triton response (``stream_tokens``: the direct per-token path);
    ``False`` times :class:`TokenEvent` arrivals (first event per token index) — the view any orchestrator layer
    on top gets, so the two can be compared. ``concurrency`` streams run at once per run."""
    use_raw = raw_tokens and hasattr(backend, "stream_tokens")

    async def one() -> tuple[float | None, list[float], int]:
        started = time.perf_counter()
        arrivals: list[float] = []
        seen: set[int] = set()
        source = (backend.stream_tokens if use_raw else backend.stream)(prompt, max_tokens=max_tokens, **sampling)
        async with contextlib.aclosing(source) as items:
            async for item in items:
                now = time.perf_counter()
                if use_raw:
                    if item.token_id >= 0:
                        arrivals.append(now)
                elif item.finish_reason is None and item.token_index not in seen:
                    seen.add(item.token_index)
                    arrivals.append(now)
        ttft = arrivals[0] - started if arrivals else None
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return ttft, gaps, len(arrivals)

    for _ in range(warmup):
        await one()
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0
    wall_started = time.perf_counter()
    for _ in range(runs):
        for ttft, run_gaps, n in await asyncio.gather(*(one() for _ in range(concurrency))):
            if ttft is not None:
                ttfts.append(ttft)
            gaps.extend(run_gaps)
            tokens += n
    wall = time.perf_counter() - wall_started
    return {
        "runs": runs,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "mode": "raw_tokens" if use_raw else "token_events",
        "ttft_ms": percentiles(ttfts),
        "itl_ms": percentiles(gaps),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
    }
