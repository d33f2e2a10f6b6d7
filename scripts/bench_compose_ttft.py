#!/usr/bin/env python3
"""Time to first token and inter-token latency of the coordinator: through the orchestrator's Compose beside a
direct Triton stream of the same model, the same prompt and the same sampling parameters and seed.

The orchestrator path includes everything it does before the coordinator starts (pattern recall from Milvus,
prompt building) and the extra gRPC hop; the pattern store holds ``--patterns`` stored patterns so recall is not
free. Runs alternate between the two paths. Each Compose call is cancelled after its last token (the workflow
that would follow is not part of this measurement).

    python scripts/bench_compose_ttft.py --runs 30 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from grym import AsyncClient  # noqa: E402
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend  # noqa: E402
from grym_synth.inference.triton_client import TritonClient  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym.v1 import orchestrator_pb2 as pb  # noqa: E402
from grym_synth.compose.service import cluster_context, compose_prompt  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402
from support import OrchestratorProcess, tone  # noqa: E402

REQUEST = "90 second ambient piece, rain, slow build"


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else float("nan")


async def timed(tokens, t0: float) -> tuple[float, list[float], int]:  # type: ignore[no-untyped-def]
    """Time to the first item of ``tokens`` (from ``t0``), the gaps between items, and their count."""
    first, last, gaps, n = None, None, [], 0
    async for _ in tokens:
        now = time.perf_counter()
        if first is None:
            first = now - t0
        elif last is not None:
            gaps.append(now - last)
        last, n = now, n + 1
    return first or float("nan"), gaps, n


async def via_orchestrator(client: AsyncClient, max_tokens: int, seed: int) -> tuple[float, list[float], int]:
    t0 = time.perf_counter()
    stream = client.compose(REQUEST, max_tokens=max_tokens, seed=seed)

    async def tokens():  # type: ignore[no-untyped-def]
        async for event in stream:
            if event.WhichOneof("event") != "token":
                return  # the plan: every token has arrived
            yield event

    try:
        return await timed(tokens(), t0)
    finally:
        await stream.aclose()


async def direct(backend: TritonCoordinatorBackend, prompt: str, max_tokens: int,
                 seed: int) -> tuple[float, list[float], int]:
    t0 = time.perf_counter()

    async def tokens():  # type: ignore[no-untyped-def]
        async for event in backend.stream(prompt, max_tokens=max_tokens, temperature=0.6, top_p=0.95, seed=seed):
            if event.text:
                yield event

    return await timed(tokens(), t0)


async def run(orch: OrchestratorProcess, triton: EmbeddedTriton, runs: int, max_tokens: int, patterns: int) -> dict:
    async with AsyncClient(orch.target, timeout_s=120) as client:
        for i in range(patterns):  # pattern memory with content, so that recall does real work
            await client.analyze(tone(0.5, seed=i), sample_rate_hz=16_000, store=True,
                                 tags={"mood": ["calm", "dark", "bright"][i % 3]})
        triton_client = TritonClient(triton.grpc_url, headers=triton.auth_headers or None)
        backend = TritonCoordinatorBackend(triton_client, "coordinator")
        for warm in range(3):  # also lets the orchestrator compute its cluster context in the background
            await via_orchestrator(client, max_tokens, warm)
        await asyncio.sleep(2.0)
        clusters = (await client.stub.ListPatternClusters(pb.ListPatternClustersRequest(), timeout=60)).clusters
        # Exactly what Compose sends: the request words match no stored tag (nothing recalled) + cluster context.
        prompt = compose_prompt(REQUEST, [], cluster_context([(c.label, c.size, c.mean_rating) for c in clusters]))
        results: dict[str, dict[str, list]] = {"orchestrator Compose": {"ttft": [], "itl": [], "tokens": []},
                                               "direct Triton stream": {"ttft": [], "itl": [], "tokens": []}}
        for warm in range(3):
            await via_orchestrator(client, max_tokens, warm)
            await direct(backend, prompt, max_tokens, warm)
        for i in range(runs):
            for name in (("orchestrator Compose", "direct Triton stream") if i % 2 == 0
                         else ("direct Triton stream", "orchestrator Compose")):
                ttft, gaps, n = await (via_orchestrator(client, max_tokens, 100 + i) if name.startswith("orch")
                                       else direct(backend, prompt, max_tokens, 100 + i))
                results[name]["ttft"].append(ttft)
                results[name]["itl"].extend(gaps)
                results[name]["tokens"].append(n)
        await triton_client.close()
    return {name: {"runs": runs, "tokens_per_run": int(np.median(r["tokens"])),
                   "ttft_p50_ms": pct(r["ttft"], 50), "ttft_p99_ms": pct(r["ttft"], 99),
                   "itl_p50_ms": pct(r["itl"], 50), "itl_p99_ms": pct(r["itl"], 99)} for name, r in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--patterns", type=int, default=50, help="patterns stored before measuring")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()
    repo = args.data_dir / "model_repository" / "tiny"
    build_repository("tiny", repo, models=["wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder",
                                           "audioldm", "coordinator"])
    bench = args.data_dir / "bench"
    triton = EmbeddedTriton(repo, bench / "tritonserver-ttft.log", extra_args=[
        "--model-control-mode=explicit", "--load-model=wav2vec2", "--load-model=coordinator"])
    triton.start()
    orch = OrchestratorProcess(bench / f"orchestrator-ttft-{int(time.time())}", [
        "--triton-url", triton.grpc_url, "--profile", "tiny"])
    try:
        orch.start(timeout_s=600)
        rows = asyncio.run(run(orch, triton, args.runs, args.max_tokens, args.patterns))
    finally:
        orch.stop()
        triton.stop()
    o, d = rows["orchestrator Compose"], rows["direct Triton stream"]
    added = round(o["ttft_p50_ms"] - d["ttft_p50_ms"], 2)
    header = (f"Coordinator (tiny seeded Qwen2) token stream, {args.runs} runs per path, max_tokens {args.max_tokens}, "
              f"temperature 0.6 / top_p 0.95, same seeds; {args.patterns} patterns in memory")
    lines = ["| path | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tokens/run |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | "
                     f"{r['tokens_per_run']} |")
    md = f"{header}\n\n" + "\n".join(lines) + f"\n\nOrchestrator adds {added} ms to the p50 time to first token.\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compose_ttft.md").write_text(md)
    (args.out / "compose_ttft.json").write_text(json.dumps({"header": header, "rows": rows, "added_p50_ms": added},
                                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
