"""core.compute: CPU work has its own bounded pool, so blocking I/O (the stores, the health probes) never waits
for a thread behind it, however many descriptions run."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

from grym_synth.core.compute import MIN_CPU_WORKERS, cpu_executor, cpu_workers, run_cpu

request = contextvars.ContextVar("request", default="")


async def test_run_cpu_keeps_the_callers_context_in_a_named_bounded_pool() -> None:
    request.set("req-7")
    name, value = await run_cpu(lambda: (threading.current_thread().name, request.get()))
    assert name.startswith("grym-cpu") and value == "req-7"
    assert cpu_executor()._max_workers == cpu_workers() >= MIN_CPU_WORKERS


async def test_io_is_not_queued_behind_a_full_cpu_pool() -> None:
    release = threading.Event()
    busy = [asyncio.ensure_future(run_cpu(release.wait, 10)) for _ in range(cpu_workers() + 2)]
    try:
        await asyncio.sleep(0.05)  # every CPU thread now blocked, two jobs queued
        started = time.perf_counter()
        name = await asyncio.wait_for(asyncio.to_thread(lambda: threading.current_thread().name), 5)
        assert not name.startswith("grym-cpu") and time.perf_counter() - started < 1.0
        assert not any(job.done() for job in busy)
    finally:
        release.set()
        assert all(await asyncio.gather(*busy))
