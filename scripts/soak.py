#!/usr/bin/env python3
"""Soak test: mixed load against a real orchestrator for a set time, good requests and hostile ones mixed.

It reports requests served, status codes per operation, p50/p99 per operation and the orchestrator's RSS over
time (to show memory plateaus), and checks the invariants of issue "Trust" while the load runs:

* a hostile request (injection payloads, sub-minimum durations, NaN, control characters, corrupt bytes) gets a
  client-error status, never INTERNAL, UNKNOWN or UNAVAILABLE;
* a valid request never gets INTERNAL, UNKNOWN or UNAVAILABLE (RESOURCE_EXHAUSTED at a limit is fine);
* every pattern the soak stored and did not delete itself is still there at the end.

By default it starts its own embedded Triton + orchestrator (tiny profile) on loopback; ``--target`` uses a
running one (then pass ``--metrics-url`` for RSS). The load is bounded in time and concurrency and stops by
itself. Exit status 1 when an invariant was broken.

    python scripts/soak.py --minutes 30 --concurrency 8
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

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from grym import AsyncClient, GrymError  # noqa: E402
from grym.v1 import orchestrator_pb2 as pb  # noqa: E402
from support import OrchestratorProcess, tone  # noqa: E402

# Statuses that mean the server (not the client) failed; no request of the mix may get them.
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
INJECTION = "x'] or not id in ['"
GOOD_OPS = {"analyze_new": 25, "analyze_repeat": 10, "analyze_store": 8, "stream": 4, "search": 10, "list": 4,
            "list_unicode": 3, "get": 8, "generate": 4, "generate_cancel": 2, "compose": 1}
BAD_OPS = {"bad_wav": 2, "inject_delete": 2, "inject_get": 2, "tag_nul_filter": 2, "ctrl_tag_key": 2,
           "tiny_duration": 2, "nan_guidance": 2, "corrupt_bytes": 2}


def rss_mb(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[-1]) / 2**20
    return float("nan")


class Mix:
    """One randomly chosen operation per call, weighted like a plausible (and partly hostile) population."""

    def __init__(self, client: AsyncClient, rng: random.Random, stored: list[str]) -> None:
        self.c = client
        self.rng = rng
        self.stored = stored
        self.repeat_clip = tone(1.0, seed=1)
        ops = {**GOOD_OPS, **BAD_OPS}
        self.names, self.weights = list(ops), list(ops.values())

    async def run_one(self) -> tuple[str, str, float]:
        op = self.rng.choices(self.names, weights=self.weights)[0]
        t0 = time.perf_counter()
        try:
            await getattr(self, op)()
            code = "OK"
        except GrymError as err:
            code = err.code.name
        except grpc.RpcError as err:
            code = err.code().name
        return op, code, time.perf_counter() - t0

    # --- valid requests -----------------------------------------------------------------------------------------
    async def analyze_new(self) -> None:
        await self.c.analyze(tone(self.rng.uniform(0.5, 3.0), seed=self.rng.randrange(1 << 30)), sample_rate_hz=16_000)

    async def analyze_repeat(self) -> None:
        await self.c.analyze(self.repeat_clip, sample_rate_hz=16_000)

    async def analyze_store(self) -> None:
        r = await self.c.analyze(tone(1.0, seed=self.rng.randrange(1 << 30)), sample_rate_hz=16_000, store=True,
                                 tags={"soak": "1", "mood": self.rng.choice(["calm", "dark", "café", "雨"])})
        self.stored.append(r.pattern_id)

    async def stream(self) -> None:
        async for _ in self.c.stream_analyze(tone(12.0, seed=self.rng.randrange(1 << 30)), 16_000):
            pass

    async def search(self) -> None:
        if self.stored:
            await self.c.search(pattern_id=self.rng.choice(self.stored), top_k=5, tag_filter={"soak": "1"})
        else:
            await self.c.analyze(tone(0.5), sample_rate_hz=16_000)

    async def list(self) -> None:
        await self.c.stub.ListPatterns(pb.ListPatternsRequest(page_size=20), timeout=30)

    async def list_unicode(self) -> None:
        await self.c.stub.ListPatterns(pb.ListPatternsRequest(page_size=20, tag_filter={"mood": "café"}), timeout=30)

    async def get(self) -> None:
        if self.stored:
            await self.c.get_pattern(self.rng.choice(self.stored))

    async def generate(self) -> None:
        async for _ in self.c.generate("soft rain on a window", seconds=1.0, steps=4,
                                       seed=self.rng.randrange(1 << 30)):
            pass

    async def generate_cancel(self) -> None:
        """Start a longer generation and walk away after its first progress message (a client cancel)."""
        async for _ in self.c.generate("a slow string swell", seconds=2.0, steps=20,
                                       seed=self.rng.randrange(1 << 30)):
            break

    async def compose(self) -> None:
        async for _ in self.c.compose("5 second calm piano piece", max_tokens=32, seed=self.rng.randrange(1 << 30)):
            pass

    # --- hostile requests ---------------------------------------------------------------------------------------
    async def bad_wav(self) -> None:
        await self.c.analyze(b"RIFF\x00\x00\x00\x00WAVEnot really", timeout_s=10)

    async def inject_delete(self) -> None:
        await self.c.delete_pattern(INJECTION)

    async def inject_get(self) -> None:
        await self.c.get_pattern(INJECTION)

    async def tag_nul_filter(self) -> None:
        await self.c.stub.ListPatterns(pb.ListPatternsRequest(page_size=5, tag_filter={"mood": "a\x00b"}), timeout=30)

    async def ctrl_tag_key(self) -> None:
        await self.c.analyze(tone(0.5), sample_rate_hz=16_000, store=True, tags={"bad\x01key": "v"})

    async def tiny_duration(self) -> None:
        async for _ in self.c.generate("x", seconds=1e-9, steps=4):
            pass

    async def nan_guidance(self) -> None:
        async for _ in self.c.generate("x", seconds=1.0, steps=4, guidance_scale=float("nan")):
            pass

    async def corrupt_bytes(self) -> None:
        call = self.c.channel.unary_unary("/grym.v1.Orchestrator/GetPattern")
        await call(b"\xff\xff\xff\xff\x0f garbage", timeout=10)


def _violations(by_op: dict[str, Counter[str]]) -> list[str]:
    out = []
    for op, codes in sorted(by_op.items()):
        for code, n in codes.items():
            if code in SERVER_FAULTS:
                out.append(f"{op}: {n} x {code}")
            elif op in BAD_OPS and code == "OK":
                out.append(f"{op}: {n} x OK for a hostile request")
    return out


def _plateau(rss: list[tuple[float, float]]) -> dict[str, float]:
    """Peak RSS in the first and the last fifth of the run: a leak shows as a growing last fifth."""
    if len(rss) < 5:
        return {}
    fifth = max(1, len(rss) // 5)
    return {"first_fifth_max_mb": max(v for _, v in rss[:fifth]), "last_fifth_max_mb": max(v for _, v in rss[-fifth:]),
            "max_mb": max(v for _, v in rss)}


async def soak(target: str, metrics_url: str | None, seconds: float, concurrency: int,
               sample_every_s: float) -> dict:
    latencies: dict[str, list[float]] = defaultdict(list)
    by_op: dict[str, Counter[str]] = defaultdict(Counter)
    rss: list[tuple[float, float]] = []
    stored: list[str] = []
    start = time.monotonic()
    stop_at = start + seconds

    async with AsyncClient(target, timeout_s=120) as client:
        async def worker(i: int) -> None:
            mix = Mix(client, random.Random(i), stored)
            while time.monotonic() < stop_at:
                op, code, dt = await mix.run_one()
                by_op[op][code] += 1
                if code == "OK":
                    latencies[op].append(dt)

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                if metrics_url:
                    rss.append((round(time.monotonic() - start, 1),
                                round(await asyncio.to_thread(rss_mb, metrics_url), 1)))
                await asyncio.sleep(sample_every_s)

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        if metrics_url:
            rss.append((round(time.monotonic() - start, 1), round(rss_mb(metrics_url), 1)))
        missing = []
        for pid in sorted(set(stored)):
            try:
                await client.get_pattern(pid)
            except GrymError as err:
                missing.append(f"{pid}: {err.code.name}")

    codes: Counter[str] = Counter()
    for c in by_op.values():
        codes.update(c)
    per_op = {op: {"count": len(v), "p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                   "p99_ms": round(float(np.percentile(v, 99)) * 1000, 1)} for op, v in sorted(latencies.items())}
    violations = _violations(by_op) + [f"stored pattern lost: {m}" for m in missing]
    return {"seconds": seconds, "concurrency": concurrency, "requests": sum(codes.values()),
            "served_ok": codes["OK"], "by_code": dict(codes), "by_op": {k: dict(v) for k, v in sorted(by_op.items())},
            "per_op": per_op, "patterns_stored": len(set(stored)), "patterns_missing": len(missing),
            "violations": violations, "rss_plateau": _plateau(rss), "rss_mb": rss}


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
            print(f"orchestrator exited with {orch.stop()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb"}, indent=2, ensure_ascii=False))
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
