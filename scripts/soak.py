#!/usr/bin/env python3
"""Soak test: mixed load against a real orchestrator for a set time, reporting requests served, errors by
status code, p50/p99 per method, and the orchestrator's RSS over time (to show memory stays bounded).

By default it starts its own Triton + orchestrator (tiny profile) on loopback; ``--target`` uses a running one
(then pass ``--metrics-url`` for RSS). The load is bounded in time and concurrency and stops by itself.

    python scripts/soak.py --minutes 10 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from grym import AsyncClient, GrymError  # noqa: E402
from support import OrchestratorProcess, tone  # noqa: E402


def rss_mb(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[-1]) / 2**20
    return float("nan")


class Mix:
    """One randomly chosen operation per call, weighted like a plausible client population."""

    def __init__(self, client: AsyncClient, rng: random.Random) -> None:
        self.c = client
        self.rng = rng
        self.stored: list[str] = []
        self.repeat_clip = tone(1.0, seed=1)

    async def run_one(self) -> tuple[str, str, float]:
        op = self.rng.choices(["analyze_new", "analyze_repeat", "analyze_store", "stream", "search", "list",
                               "get", "bad"], weights=[30, 15, 10, 5, 15, 5, 10, 10])[0]
        t0 = time.perf_counter()
        try:
            await getattr(self, op)()
            code = "OK"
        except GrymError as err:
            code = err.code.name
        return op, code, time.perf_counter() - t0

    async def analyze_new(self) -> None:
        await self.c.analyze(tone(self.rng.uniform(0.5, 3.0), seed=self.rng.randrange(1 << 30)), sample_rate_hz=16_000)

    async def analyze_repeat(self) -> None:
        await self.c.analyze(self.repeat_clip, sample_rate_hz=16_000)

    async def analyze_store(self) -> None:
        r = await self.c.analyze(tone(1.0, seed=self.rng.randrange(1 << 30)), sample_rate_hz=16_000, store=True,
                                 tags={"soak": "1", "mood": self.rng.choice(["calm", "dark", "bright"])})
        self.stored.append(r.pattern_id)

    async def stream(self) -> None:
        async for _ in self.c.stream_analyze(tone(12.0, seed=self.rng.randrange(1 << 30)), 16_000):
            pass

    async def search(self) -> None:
        if self.stored:
            await self.c.search(pattern_id=self.rng.choice(self.stored), top_k=5)
        else:
            await self.c.analyze(tone(0.5), sample_rate_hz=16_000)

    async def list(self) -> None:
        await self.c.stub.ListPatterns(__import__("grym.v1.orchestrator_pb2", fromlist=["x"]).ListPatternsRequest(
            page_size=20), timeout=30)

    async def get(self) -> None:
        await self.c.get_pattern(self.rng.choice(self.stored) if self.stored else "missing-id")

    async def bad(self) -> None:
        await self.c.analyze(b"RIFF\x00\x00\x00\x00WAVEnot really", timeout_s=10)


async def soak(target: str, metrics_url: str | None, seconds: float, concurrency: int,
               sample_every_s: float) -> dict:
    latencies: dict[str, list[float]] = defaultdict(list)
    codes: Counter[str] = Counter()
    rss: list[tuple[float, float]] = []
    start = time.monotonic()
    stop_at = start + seconds

    async with AsyncClient(target, timeout_s=60) as client:
        async def worker(i: int) -> None:
            mix = Mix(client, random.Random(i))
            while time.monotonic() < stop_at:
                op, code, dt = await mix.run_one()
                codes[code] += 1
                if code == "OK":
                    latencies[op].append(dt)

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                if metrics_url:
                    rss.append((round(time.monotonic() - start, 1), round(await asyncio.to_thread(rss_mb, metrics_url), 1)))
                await asyncio.sleep(sample_every_s)

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        if metrics_url:
            rss.append((round(time.monotonic() - start, 1), round(rss_mb(metrics_url), 1)))

    per_op = {op: {"count": len(v), "p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                   "p99_ms": round(float(np.percentile(v, 99)) * 1000, 1)} for op, v in sorted(latencies.items())}
    return {"seconds": seconds, "concurrency": concurrency, "requests": sum(codes.values()),
            "served_ok": codes["OK"], "by_code": dict(codes), "per_op": per_op, "rss_mb": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="host:port of a running orchestrator (default: start one)")
    parser.add_argument("--metrics-url", help="its /metrics URL, for RSS")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=float, default=15.0, help="RSS sampling period, seconds")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "soak.json")
    args = parser.parse_args()

    orch = None
    target, metrics_url = args.target, args.metrics_url
    if not target:
        orch = OrchestratorProcess(args.data_dir / f"run-{int(time.time())}", ["--profile", "tiny"]).start(timeout_s=900)
        target, metrics_url = orch.target, orch.metrics_url
    try:
        report = asyncio.run(soak(target, metrics_url, args.minutes * 60, args.concurrency, args.sample_every))
    finally:
        if orch:
            report_exit = orch.stop()
            print(f"orchestrator exited with {report_exit}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
