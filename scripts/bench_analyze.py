#!/usr/bin/env python3
"""Benchmark AnalyzeAudio end to end, beside in-process ONNX Runtime and eager PyTorch, in one run.

Served = client -> orchestrator (grpc.aio) -> Triton (python backend, ONNX Runtime) and back, at concurrency 1, 4
and 16 with 1-second clips. Baselines run after the servers are stopped, on the same clip and the same ONNX file
(ORT) or the same seeded weights (PyTorch), sequentially with the same thread count. Each figure is measured in
this one invocation; the table and the ratios are printed and written to bench_results/analyze.{json,md}.

    python scripts/bench_analyze.py --profile base --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from loadgen import AnalyzeTarget, LevelResult, TritonTarget, clip, measure, summarise  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402
from support import OrchestratorProcess  # noqa: E402


def sequential(fn, seconds: float, warmup: int = 3) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return lat, time.perf_counter() - start


def bench_ort(onnx_path: Path, samples: np.ndarray, seconds: float, threads: int) -> LevelResult:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = samples[None, :]
    lat, dur = sequential(lambda: sess.run(["embedding"], {"audio": x}), seconds)
    return summarise("in-process ONNX Runtime", 1, lat, 0, dur)


def bench_torch(profile: str, weights: Path | None, seed: int, samples: np.ndarray, seconds: float,
                threads: int) -> LevelResult:
    import torch

    from grym_synth.inference.export.wav2vec2 import _wrapper, build_model

    torch.set_num_threads(threads)
    model = _wrapper(build_model(profile, weights, seed))
    x = torch.from_numpy(samples[None, :])

    def run() -> None:
        with torch.inference_mode():
            model(x)

    lat, dur = sequential(run, seconds)
    return summarise("eager PyTorch", 1, lat, 0, dur)


async def bench_served(orch: OrchestratorProcess, triton: EmbeddedTriton, samples: np.ndarray,
                       levels: list[int], seconds: float) -> list[LevelResult]:
    served = AnalyzeTarget(orch.target, samples)
    direct = TritonTarget(triton.grpc_url, "wav2vec2", {"audio": samples[None, :]}, ["embedding"])
    try:
        results = await measure(served, "served AnalyzeAudio", levels, seconds, 3.0, triton_stats=direct)
        results += await measure(direct, "Triton direct (no orchestrator)", levels, seconds, 3.0,
                                 triton_stats=direct)
    finally:
        await served.close()
        await direct.close()
    return results


def table(rows: list[LevelResult], ort_rps: float, torch_rps: float) -> str:
    lines = ["| path | concurrency | throughput (clips/s) | p50 ms | p90 ms | p99 ms | vs ORT | vs PyTorch | "
             "Triton queue ms | Triton compute ms | batches/inferences |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        batches = f"{r.server_batches}/{r.server_inferences}" if r.server_batches is not None else ""
        q = "" if r.server_queue_ms is None else r.server_queue_ms
        c = "" if r.server_compute_ms is None else r.server_compute_ms
        lines.append(f"| {r.target} | {r.concurrency} | {r.throughput_rps:.2f} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | "
                     f"{r.p99_ms:.1f} | {r.throughput_rps / ort_rps:.2f}x | {r.throughput_rps / torch_rps:.2f}x | "
                     f"{q} | {c} | {batches} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="base", choices=["tiny", "base"])
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per level and baseline")
    parser.add_argument("--clip-seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ORT/PyTorch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()

    repo = args.data_dir / "model_repository" / args.profile
    print(f"building/reusing the {args.profile} repository at {repo}", flush=True)
    manifest = build_repository(args.profile, repo, weights={"wav2vec2": args.weights_dir}, seed=args.seed, models=["wav2vec2"])
    samples = clip(args.clip_seconds)

    bench_dir = args.data_dir / "bench"
    triton = EmbeddedTriton(repo, bench_dir / "tritonserver.log", startup_timeout_s=600,
                            extra_args=["--model-control-mode=explicit", "--load-model=wav2vec2"])
    triton.start()
    orch = OrchestratorProcess(bench_dir / f"orchestrator-{args.profile}-{int(time.time())}", [
        "--triton-url", triton.grpc_url, "--profile", args.profile,
        # every request sends the same clip: the result cache would answer all but the first
        "--cache-max-entries", "0"])
    try:
        orch.start(timeout_s=600)
        served = asyncio.run(bench_served(orch, triton, samples, args.concurrency, args.seconds))
    finally:
        orch.stop()
        triton.stop()

    print("servers stopped; running the in-process baselines", flush=True)
    ort_res = bench_ort(repo / "wav2vec2" / "1" / "model.onnx", samples, args.seconds, args.threads)
    torch_res = bench_torch(args.profile, args.weights_dir, args.seed, samples, args.seconds, args.threads)
    rows = served + [ort_res, torch_res]
    md = table(rows, ort_res.throughput_rps, torch_res.throughput_rps)
    header = (f"AnalyzeAudio, profile {args.profile} ({manifest['models']['wav2vec2'].get('parameters', '?')} "
              f"parameters), {args.clip_seconds:g} s clips, {args.seconds:g} s per level, {os.cpu_count()} CPU cores, "
              f"{args.threads} threads")
    print("\n" + header + "\n\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"analyze_{args.profile}.md").write_text(header + "\n\n" + md + "\n")
    (args.out / f"analyze_{args.profile}.json").write_text(json.dumps(
        {"header": header, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
