"""One bounded thread pool for CPU-heavy work, apart from asyncio's default executor.

Why: ``asyncio.to_thread`` uses the default executor (``min(32, cpus + 4)`` threads, 6 on 2 cores), which the
pattern store, the audio store and the health probes also use for their blocking calls, and one music description
queues four CPU jobs there (signal analysis, basic-pitch windows, musicnn patches, silero blocks). With compute in
its own pool, no number of concurrent descriptions can make a store call or a health probe wait for a thread.
Measured (3 clients describing 10 s renders in a loop, 2-core machine): health and store latency under that load
were the same with and without this pool (p99 24-35 ms and 61-64 ms), so this bounds heavier load; it is not the
fix of a stall that was observed.

Use :func:`run_cpu` for work that computes (decode/encode audio, resampling, feature extraction, note creation,
mastering, clustering) and ``asyncio.to_thread`` for work that waits (databases, files, processes).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# At least 4: one music description runs four CPU steps at once (signal analysis, basic-pitch windows, musicnn
# patches, silero blocks), and much of them is numpy or compiled code that releases the GIL; with 2 threads on the
# 2-core machine the description measured 28.4-29.0x real time against 30.8x with 4 (scripts/bench_music.py).
MIN_CPU_WORKERS = 4

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def cpu_workers() -> int:
    """Threads of the CPU pool: the cores this process may use, at least :data:`MIN_CPU_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(MIN_CPU_WORKERS, cores)


def cpu_executor() -> ThreadPoolExecutor:
    """The process's CPU pool, created on first use (threads named ``grym-cpu``)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(cpu_workers(), thread_name_prefix="grym-cpu")
        return _executor


async def run_cpu(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``await run_cpu(fn, *args)``: ``fn`` in the CPU pool, with the caller's context variables (log request ids),
    like ``asyncio.to_thread``."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(cpu_executor(), call)
