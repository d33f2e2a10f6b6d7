#!/usr/bin/env python3
"""Time to first token (TTFT) and inter-token latency (ITL) of the coordinator LLM's token stream.

Measured paths (all in this one invocation, same checkpoint, greedy decoding, fixed max_tokens):
  * triton/raw     — client (TritonClient) -> Triton gRPC stream -> decoupled python-backend model, one response per token
                     (``TritonCoordinatorBackend.stream_tokens``): the direct served path;
  * triton/events  — the same stream seen as ``TokenEvent``s (thinking/answer split), what the orchestrator consumes;
  * in-process     — the same KV-cached decode loop in this process with plain transformers (no serving), after
                     Triton is stopped, with the stub's thread count: the floor that serving overhead is added to.
Concurrency levels run that many streams at once. Results are printed and written to bench_results/coordinator.json.
To compare with the orchestrator path later, add a target whose ``stream()`` goes through the orchestrator's API
and pass it to ``measure_stream_latency`` with ``raw_tokens=False`` (compare with triton/events).

    python scripts/bench_coordinator.py                       # tiny profile, builds a repository in a temp dir
    python scripts/bench_coordinator.py --grpc-url HOST:8001  # an already running Triton with a coordinator model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grym_synth.coordinator.latency import measure_stream_latency, percentiles  # noqa: E402
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend  # noqa: E402
from grym_synth.inference.triton_client import TritonClient  # noqa: E402

PROMPT = "Plan a two-minute ambient piece: tempo, key, instruments and four sections."


def build_tiny_repository(out_dir: Path, seed: int) -> Path:
    from grym_synth.inference.export import repository

    if "coordinator" in repository.EXPORTERS:
        repository.build_repository("tiny", out_dir, seed=seed, models=["coordinator"])
    else:  # until the exporter is registered: same steps as build_repository
        import shutil

        from grym_synth.inference.export.coordinator import export

        dst = out_dir / "coordinator"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(ROOT / "model_repository" / "coordinator", dst,
                        ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
        export("tiny", dst, None, seed)
    return out_dir


def inprocess_baseline(checkpoint: Path, max_tokens: int, runs: int, threads: int) -> dict:
    """Greedy KV-cached decode with plain transformers: per-token compute without any serving in between."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    prompt_ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    ttfts, gaps = [], []
    for run in range(runs + 1):  # first run is warm-up
        started = time.perf_counter()
        arrivals = []
        with torch.inference_mode():
            out = model(input_ids=prompt_ids, use_cache=True)
            for _ in range(max_tokens):
                token = int(torch.argmax(out.logits[0, -1]))
                arrivals.append(time.perf_counter())
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        if run:
            ttfts.append(arrivals[0] - started)
            gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
    return {"runs": runs, "max_tokens": max_tokens, "threads": threads,
            "ttft_ms": percentiles(ttfts), "itl_ms": percentiles(gaps)}


async def bench_triton(grpc_url: str, args: argparse.Namespace) -> dict:
    triton = TritonClient(grpc_url)
    backend = TritonCoordinatorBackend(triton, args.model, token_timeout_s=60.0)
    results = {}
    try:
        for concurrency in args.concurrency:
            for raw in (True, False):
                key = f"triton/{'raw' if raw else 'events'}/c{concurrency}"
                results[key] = await measure_stream_latency(
                    backend, PROMPT, runs=args.runs, warmup=2, max_tokens=args.max_tokens,
                    concurrency=concurrency, raw_tokens=raw, temperature=0.0,
                )
                print(f"{key}: {json.dumps(results[key])}", flush=True)
    finally:
        await triton.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", help="use a running Triton instead of starting the embedded one")
    parser.add_argument("--model", default="coordinator")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "coordinator.json")
    args = parser.parse_args()

    report: dict = {"prompt": PROMPT, "cpu_count": os.cpu_count(), "started_at": time.time()}
    if args.grpc_url:
        report["results"] = asyncio.run(bench_triton(args.grpc_url, args))
    else:
        from grym_synth.inference.triton_process import EmbeddedTriton

        with tempfile.TemporaryDirectory(prefix="bench_coordinator_") as tmp:
            repo = build_tiny_repository(Path(tmp) / "repo", args.seed)
            with EmbeddedTriton(repo, Path(tmp) / "triton.log") as triton:
                triton.wait_models_ready([args.model], timeout_s=120)
                report["results"] = asyncio.run(bench_triton(triton.grpc_url, args))
            baseline = inprocess_baseline(repo / "coordinator" / "1" / "checkpoint", args.max_tokens, args.runs,
                                          threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
            report["results"]["in-process/c1"] = baseline
            print(f"in-process/c1: {json.dumps(baseline)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'path':<24}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}  (ms)")
    for key, value in report["results"].items():
        t, i = value["ttft_ms"], value["itl_ms"]
        print(f"{key:<24}{t['p50']:>10}{t['p99']:>10}{i['p50']:>10}{i['p99']:>10}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
