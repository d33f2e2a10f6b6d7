#!/usr/bin/env python3
"""Benchmark Generate through the orchestrator beside diffusers' AudioLDMPipeline in-process, in one run.

Served: client -> orchestrator -> Triton `audioldm` pipeline model (BLS: CLAP, UNet per step, VAE, vocoder, all
ONNX Runtime with dynamic batching) at concurrency 1 and 4, distinct seeds, result cache off. Baseline: diffusers'
AudioLDMPipeline over the same seeded weights, run sequentially in this process after the servers stopped, with
the same thread count. Reports generations per minute and p50/p99 latency; writes bench_results/generate_*.md.

    python scripts/bench_generate.py --profile tiny --steps 10 --seconds 5 --generations 12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from grym import AsyncClient  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402
from support import OrchestratorProcess  # noqa: E402

PROMPT = "warm analog pad, slow attack"
MODELS = ["wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder", "audioldm"]


def stats(latencies: list[float], wall: float) -> dict[str, float]:
    return {"generations": len(latencies), "per_minute": round(len(latencies) / wall * 60, 2),
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_s": round(float(np.percentile(latencies, 99)), 3), "wall_s": round(wall, 1)}


async def served(target: str, concurrency: int, n: int, steps: int, seconds: float, seed0: int) -> dict[str, float]:
    latencies: list[float] = []
    seeds = iter(range(seed0, seed0 + n))

    async with AsyncClient(target, timeout_s=3600) as c:
        async def worker() -> None:
            for seed in seeds:
                t0 = time.perf_counter()
                events = [e async for e in c.generate(PROMPT, seconds=seconds, steps=steps, seed=seed)]
                assert events[-1].WhichOneof("event") == "result" and not events[-1].result.cached
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return stats(latencies, time.perf_counter() - start)


async def warm_up(target: str, concurrency: int, steps: int, seconds: float, seed: int) -> None:
    """``concurrency`` generations at once, outside the measurement, so that the measured row starts with every
    batch shape it will see already run once (onnxruntime grows its memory arena per new shape)."""
    async with AsyncClient(target, timeout_s=3600) as c:
        async def one(s: int) -> None:
            [e async for e in c.generate(PROMPT, seconds=seconds, steps=steps, seed=s)]

        await asyncio.gather(*(one(seed - i) for i in range(concurrency)))


async def triton_stats(url: str) -> dict[str, dict[str, int]]:
    """Cumulative Triton statistics per model: inferences, executions, and queue / compute nanoseconds."""
    import tritonclient.grpc.aio as ta

    c = ta.InferenceServerClient(url)
    try:
        out = {}
        for model in MODELS:
            s = (await c.get_inference_statistics(model, as_json=True))["model_stats"][0]
            stats_ = s.get("inference_stats", {})
            out[model] = {
                "inferences": int(s.get("inference_count", 0)), "executions": int(s.get("execution_count", 0)),
                "queue_ns": int(stats_.get("queue", {}).get("ns", 0)),
                "requests": int(stats_.get("success", {}).get("count", 0)),
                "compute_ns": sum(int(stats_.get(k, {}).get("ns", 0))
                                  for k in ("compute_input", "compute_infer", "compute_output")),
            }
        return out
    finally:
        await c.close()


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per model over one row: counts (inferences = batch rows), and per request the mean queue and compute time
    (ms). Triton adds a batched execution's duration to each of its requests, so ``compute_ms_per_request`` is
    the mean duration of the executions requests rode in. The decoupled ``audioldm`` model's execute() only
    hands the request to a worker thread, so its compute is not the generation's time."""
    out = {}
    for model, a in after.items():
        d = {k: a[k] - before[model][k] for k in a}
        if d["requests"]:
            out[model] = {"inferences": d["inferences"], "requests": d["requests"], "executions": d["executions"],
                          "queue_ms_per_request": round(d["queue_ns"] / d["requests"] / 1e6, 2),
                          "compute_ms_per_request": round(d["compute_ns"] / d["requests"] / 1e6, 2)}
    return out


def diffusers_sequential(profile: str, weights: Path | None, seed: int, n: int, steps: int, seconds: float,
                         threads: int) -> dict[str, float]:
    import torch

    from grym_synth.inference.export.audioldm import build_components, reference_pipeline

    torch.set_num_threads(threads)
    pipe = reference_pipeline(build_components(profile, weights, seed))

    def run(s: int) -> None:
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=2.5, audio_length_in_s=seconds,
                 generator=torch.Generator().manual_seed(s))

    run(0)  # warm-up
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        run(10_000 + i)
        latencies.append(time.perf_counter() - t0)
    return stats(latencies, time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio duration per generation")
    parser.add_argument("--generations", type=int, default=12, help="generations per measured configuration")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()

    repo = args.data_dir / "model_repository" / args.profile
    print(f"building/reusing the {args.profile} repository at {repo}", flush=True)
    build_repository(args.profile, repo, weights={"audioldm": args.weights_dir}, seed=args.seed, models=MODELS)
    bench_dir = args.data_dir / "bench"
    triton = EmbeddedTriton(repo, bench_dir / f"tritonserver-generate-{args.profile}.log", startup_timeout_s=900)
    triton.start()
    orch = OrchestratorProcess(bench_dir / f"orchestrator-generate-{args.profile}-{int(time.time())}", [
        "--triton-url", triton.grpc_url, "--profile", args.profile, "--cache-max-entries", "0",
        "--triton-timeout-s", "3600"])
    rows: dict[str, dict[str, float]] = {}
    try:
        orch.start(timeout_s=900)
        for c in args.concurrency:
            asyncio.run(warm_up(orch.target, c, args.steps, args.seconds, 1000 * c - 1))
            before = asyncio.run(triton_stats(triton.grpc_url))
            res = asyncio.run(served(orch.target, c, args.generations, args.steps, args.seconds, 1000 * c))
            res["triton"] = stats_delta(before, asyncio.run(triton_stats(triton.grpc_url)))
            res["unet_inferences"] = res["triton"]["unet"]["inferences"]
            res["unet_executions"] = res["triton"]["unet"]["executions"]
            rows[f"served, concurrency {c}"] = res
            print(json.dumps({f"served c={c}": res}), flush=True)
    finally:
        orch.stop()
        triton.stop()
    print("servers stopped; running diffusers in-process", flush=True)
    base = diffusers_sequential(args.profile, args.weights_dir, args.seed, args.generations, args.steps,
                                args.seconds, args.threads)
    rows["diffusers AudioLDMPipeline, sequential"] = base
    header = (f"Generate, profile {args.profile}, {args.steps} steps, {args.seconds:g} s audio, guidance 2.5, DDIM, "
              f"{args.generations} generations per row, {os.cpu_count()} CPU cores, {args.threads} threads")
    lines = ["| path | generations/min | p50 s | p99 s | vs diffusers | UNet executions/inferences |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        batching = f"{r['unet_executions']}/{r['unet_inferences']}" if "unet_inferences" in r else ""
        lines.append(f"| {name} | {r['per_minute']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{r['per_minute'] / base['per_minute']:.2f}x | {batching} |")
    lines += ["", "Triton statistics per model (per request: the batched execution's duration, queue wait)", "",
              "| row | model | requests | executions | queue ms | compute ms |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for model, m in r.get("triton", {}).items():
            lines.append(f"| {name} | {model} | {m['requests']} | {m['executions']} | "
                         f"{m['queue_ms_per_request']} | {m['compute_ms_per_request']} |")
    md = header + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generate_{args.profile}.md").write_text(md)
    (args.out / f"generate_{args.profile}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
