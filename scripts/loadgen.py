#!/usr/bin/env python3
"""Closed-loop load generator: perf_analyzer's figures without its binary.

For each concurrency level it keeps N requests in flight for a fixed time (after a warm-up) and reports
throughput, latency p50/p90/p95/p99, and, for Triton targets, Triton's own server-side split of each request
into queue and compute time (from the statistics API, as perf_analyzer prints it). Results go to a CSV and a
PNG of latency vs concurrency.

    # a Triton model directly (what `perf_analyzer -m wav2vec2 -i grpc --concurrency-range 1:16` measures)
    python scripts/loadgen.py triton --url 127.0.0.1:8001 --model wav2vec2 --concurrency 1 4 16 --seconds 1
    # the orchestrator's AnalyzeAudio
    python scripts/loadgen.py analyze --target 127.0.0.1:50051 --concurrency 1 4 16 --seconds 1
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Call = Callable[[int], Awaitable[None]]


@dataclass
class LevelResult:
    target: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    server_queue_ms: float | None = None
    server_compute_ms: float | None = None
    server_batches: int | None = None
    server_inferences: int | None = None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def run_level(call: Call, concurrency: int, *, seconds: float, warmup_s: float,
                    max_requests: int | None = None) -> tuple[list[float], int, float]:
    """Keep ``concurrency`` calls in flight; returns latencies (s) measured after warm-up, errors, duration."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds
    count = 0

    async def worker(wid: int) -> None:
        nonlocal errors, count
        i = 0
        while time.perf_counter() < stop_at and (max_requests is None or count < max_requests):
            t0 = time.perf_counter()
            try:
                await call(wid * 1_000_000 + i)
                ok = True
            except Exception:
                ok = False
            t1 = time.perf_counter()
            if t0 >= measure_from:
                if ok:
                    latencies.append(t1 - t0)
                    count += 1
                else:
                    errors += 1
            i += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, errors, time.perf_counter() - measure_from


def summarise(target: str, concurrency: int, lat: list[float], errors: int, duration: float) -> LevelResult:
    ms = [x * 1000 for x in lat]
    return LevelResult(
        target=target, concurrency=concurrency, requests=len(lat), errors=errors, duration_s=round(duration, 2),
        throughput_rps=round(len(lat) / duration, 2) if duration > 0 else 0.0,
        p50_ms=round(percentile(ms, 50), 2), p90_ms=round(percentile(ms, 90), 2),
        p95_ms=round(percentile(ms, 95), 2), p99_ms=round(percentile(ms, 99), 2),
        mean_ms=round(statistics.fmean(ms), 2) if ms else float("nan"),
    )


# --- targets ------------------------------------------------------------------------------------------------------
def clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


class TritonTarget:
    """Direct KServe v2 gRPC inference on one Triton model (same path perf_analyzer -i grpc measures)."""

    def __init__(self, url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> None:
        import tritonclient.grpc.aio as ta

        self.url, self.model, self.inputs, self.outputs = url, model, inputs, outputs
        self.client = ta.InferenceServerClient(url)

    async def call(self, _i: int) -> None:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import np_to_triton_dtype

        ins = []
        for name, arr in self.inputs.items():
            inp = InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr)
            ins.append(inp)
        await self.client.infer(self.model, ins, outputs=[InferRequestedOutput(o) for o in self.outputs])

    async def stats(self) -> dict[str, float]:
        s = (await self.client.get_inference_statistics(self.model, as_json=True))["model_stats"][0]
        inf = s.get("inference_stats", {})
        return {"queue_ns": float(inf.get("queue", {}).get("ns", 0)),
                "compute_ns": sum(float(inf.get(k, {}).get("ns", 0)) for k in
                                  ("compute_input", "compute_infer", "compute_output")),
                "success": float(inf.get("success", {}).get("count", 0)),
                "inferences": float(s.get("inference_count", 0)), "executions": float(s.get("execution_count", 0))}

    async def close(self) -> None:
        await self.client.close()


class AnalyzeTarget:
    """The orchestrator's AnalyzeAudio with a PCM clip (the same clip every call, like perf_analyzer's input)."""

    def __init__(self, target: str, samples: np.ndarray) -> None:
        from grym import AsyncClient

        self.client = AsyncClient(target, timeout_s=120)
        self.samples = samples

    async def call(self, _i: int) -> None:
        await self.client.analyze(self.samples, sample_rate_hz=16_000)

    async def close(self) -> None:
        await self.client.close()


async def measure(target: object, name: str, levels: list[int], seconds: float, warmup_s: float,
                  triton_stats: TritonTarget | None = None) -> list[LevelResult]:
    results = []
    for c in levels:
        before = await triton_stats.stats() if triton_stats else None
        lat, errors, duration = await run_level(target.call, c, seconds=seconds, warmup_s=warmup_s)  # type: ignore[attr-defined]
        res = summarise(name, c, lat, errors, duration)
        if triton_stats and before:
            after = await triton_stats.stats()
            n = max(after["success"] - before["success"], 1)
            res.server_queue_ms = round((after["queue_ns"] - before["queue_ns"]) / n / 1e6, 2)
            res.server_compute_ms = round((after["compute_ns"] - before["compute_ns"]) / n / 1e6, 2)
            res.server_batches = int(after["executions"] - before["executions"])
            res.server_inferences = int(after["inferences"] - before["inferences"])
        print(json.dumps(asdict(res)), flush=True)
        results.append(res)
    return results


def write_csv(results: list[LevelResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(r.target for r in results):
        rows = [r for r in results if r.target == target]
        xs = [r.concurrency for r in rows]
        ax1.plot(xs, [r.p50_ms for r in rows], "o-", label=f"{target} p50")
        ax1.plot(xs, [r.p99_ms for r in rows], "x--", label=f"{target} p99")
        ax2.plot(xs, [r.throughput_rps for r in rows], "o-", label=target)
    ax1.set(xlabel="concurrency", ylabel="latency (ms)", title="latency vs concurrency", xscale="log", xticks=xs)
    ax2.set(xlabel="concurrency", ylabel="requests / s", title="throughput vs concurrency", xscale="log", xticks=xs)
    for ax in (ax1, ax2):
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def _main(args: argparse.Namespace) -> list[LevelResult]:
    samples = clip(args.clip_seconds)
    if args.mode == "triton":
        target = TritonTarget(args.url, args.model, {"audio": samples[None, :]}, ["embedding"])
        try:
            return await measure(target, f"triton:{args.model}", args.concurrency, args.seconds, args.warmup,
                                 triton_stats=target)
        finally:
            await target.close()
    analyze = AnalyzeTarget(args.target, samples)
    stats = TritonTarget(args.triton_url, "wav2vec2", {}, []) if args.triton_url else None
    try:
        return await measure(analyze, "orchestrator:AnalyzeAudio", args.concurrency, args.seconds, args.warmup,
                             triton_stats=stats)
    finally:
        await analyze.close()
        if stats:
            await stats.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["triton", "analyze"])
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC URL (mode triton)")
    parser.add_argument("--model", default="wav2vec2")
    parser.add_argument("--target", default="127.0.0.1:50051", help="orchestrator host:port (mode analyze)")
    parser.add_argument("--triton-url", help="with mode analyze: also report Triton's queue/compute split")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clip-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "loadgen")
    args = parser.parse_args()
    results = asyncio.run(_main(args))
    stem = f"{args.mode}_{args.model if args.mode == 'triton' else 'AnalyzeAudio'}"
    write_csv(results, args.out / f"{stem}.csv")
    plot(results, args.out / f"{stem}.png", f"{results[0].target}: {args.clip_seconds:g}s clips")
    print(f"wrote {args.out / (stem + '.csv')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
