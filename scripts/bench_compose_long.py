#!/usr/bin/env python3
"""Benchmark long-form Compose: a 90 s piece through the orchestrator beside diffusers generating the same windows
sequentially in-process, plus time to first section audio and join measurements.

Served: client -> orchestrator (rule planner: intro/build/climax/outro laid out as overlapping windows) -> Triton
``audioldm`` (every window of the piece submitted at once, sharing the generation slots; UNet steps batched),
joined with equal-power, loudness-matched crossfades and mastered to -14 LUFS. One piece at a time (concurrency 1)
and two pieces at once (concurrency 2), distinct seeds, result cache off. Baseline: diffusers' AudioLDMPipeline over
the same seeded weights rendering the same windows one after another, after the servers stopped.

Join measurements (compose.longform.measure_joins) on the decoded piece: mean largest sample-to-sample jump within
+-5 ms and mean short-term (400 ms) loudness step, at the joins versus at the middle of the windows.

    python scripts/bench_compose_long.py --profile tiny --steps 5 --seconds 90
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import grpc  # noqa: E402

from grym.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc  # noqa: E402
from grym_synth.compose.longform import measure_joins, place_windows  # noqa: E402
from grym_synth.compose.mastering import integrated_loudness, true_peak_db  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402
from grym_synth.planning.sections import WindowSpec  # noqa: E402
from grym_synth.planning.validation import validate_plan  # noqa: E402
from support import OrchestratorProcess  # noqa: E402

REQUEST = "ambient piece, rain, slow build"
MODELS = ["wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder", "audioldm", "coordinator"]
RATE = 16_000


async def one_piece(target: str, seconds: float, steps: int, seed: int) -> dict[str, Any]:
    req = pb.ComposeRequest(request_id=uuid.uuid4().hex, request=f"{REQUEST}, {steps} steps, seed {seed}",
                            duration_seconds=seconds, max_tokens=8)
    first_section = None
    audio, plan_json, state = b"", "", None
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        t0 = time.perf_counter()
        async for event in pb_grpc.OrchestratorStub(ch).Compose(req, timeout=3600):
            kind = event.WhichOneof("event")
            if kind == "section_audio" and first_section is None:
                first_section = time.perf_counter() - t0
            elif kind == "audio":
                audio += event.audio.wav_data
            elif kind == "plan":
                plan_json = event.plan.plan_json
            elif kind == "summary":
                state = event.summary.state
        wall = time.perf_counter() - t0
    assert state == pb.Workflow.STATE_SUCCEEDED, state
    return {"wall_s": wall, "first_section_s": first_section, "audio": audio, "plan_json": plan_json}


async def served(target: str, concurrency: int, seconds: float, steps: int, seed: int) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(one_piece(target, seconds, steps, seed + i) for i in range(concurrency))))


def join_report(result: dict[str, Any], window: WindowSpec) -> dict[str, float]:
    piece, rate = sf.read(io.BytesIO(result["audio"]), dtype="float64")
    plan = validate_plan(json.loads(result["plan_json"]), window=window)
    placed, _ = place_windows(plan, rate)
    joins = [w.start for w in placed[1:]]
    stats = measure_joins(piece, rate, joins, int(round(plan.overlap_s * rate)))
    return {"length_s": len(piece) / rate, "lufs": integrated_loudness(piece, rate),
            "true_peak_dbtp": true_peak_db(piece, rate), "joins": stats.joins,
            "join_jump": stats.join_jump, "inside_jump": stats.inside_jump,
            "join_step_lu": stats.join_loudness_step_lu, "inside_step_lu": stats.inside_loudness_step_lu,
            "windows": len(placed), "plan": plan}


def diffusers_sequential(profile: str, weights: Path | None, seed: int, plan: Any, threads: int) -> dict[str, float]:
    """The same windows (prompts, lengths, steps, seeds) rendered one after another by diffusers in-process."""
    import torch

    from grym_synth.inference.export.audioldm import build_components, reference_pipeline

    torch.set_num_threads(threads)
    pipe = reference_pipeline(build_components(profile, weights, seed))
    windows = [s for s in plan.steps if s.type == "generate"]
    first_section_ids = {w.step_id for w in plan.sections[0].windows}

    def run(p: dict[str, Any]) -> None:
        with torch.inference_mode():
            pipe(p["prompt"], negative_prompt=p["negative_prompt"] or None, num_inference_steps=p["steps"],
                 guidance_scale=p["guidance_scale"], audio_length_in_s=p["duration_s"],
                 generator=torch.Generator().manual_seed(p["seed"]))

    run(windows[0].params)  # warm-up
    start = time.perf_counter()
    first = None
    for step in windows:
        run(step.params)
        first_section_ids.discard(step.id)
        if not first_section_ids and first is None:
            first = time.perf_counter() - start
    return {"wall_s": time.perf_counter() - start, "first_section_s": first or 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--overlap-s", type=float, default=1.0)
    parser.add_argument("--windows-in-flight", type=int, default=4, help="--compose-windows-in-flight (0: all)")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()
    window = WindowSpec(args.window_s, args.overlap_s)

    repo = args.data_dir / "model_repository" / args.profile
    print(f"building/reusing the {args.profile} repository at {repo}", flush=True)
    build_repository(args.profile, repo, weights={"audioldm": args.weights_dir}, seed=args.seed, models=MODELS)
    bench_dir = args.data_dir / "bench"
    triton = EmbeddedTriton(repo, bench_dir / f"tritonserver-compose-{args.profile}.log", startup_timeout_s=900)
    triton.start()
    orch = OrchestratorProcess(bench_dir / f"orchestrator-compose-{args.profile}-{int(time.time())}", [
        "--triton-url", triton.grpc_url, "--profile", args.profile, "--cache-max-entries", "0",
        "--compose-window-s", str(args.window_s), "--compose-overlap-s", str(args.overlap_s),
        "--compose-windows-in-flight", str(args.windows_in_flight)])
    rows: dict[str, dict[str, Any]] = {}
    sample: dict[str, Any] = {}
    try:
        orch.start(timeout_s=900)
        asyncio.run(served(orch.target, 1, 2.0, 1, 999))  # warm-up outside the measurement
        for c in args.concurrency:
            results = asyncio.run(served(orch.target, c, args.seconds, args.steps, args.seed + 100 * c))
            wall = max(r["wall_s"] for r in results)
            rows[f"served, {c} piece(s) at once, {args.windows_in_flight or 'all'} windows in flight"] = {
                "wall_s": wall, "rtf": wall / (args.seconds * c),
                "first_section_s": float(np.mean([r["first_section_s"] for r in results]))}
            sample = sample or join_report(results[0], window)
            print(json.dumps({f"c={c}": rows[next(reversed(rows))]}), flush=True)
    finally:
        orch.stop()
        triton.stop()
    plan = sample.pop("plan")
    if not args.skip_diffusers:
        print("servers stopped; running diffusers in-process", flush=True)
        base = diffusers_sequential(args.profile, args.weights_dir, args.seed, plan, args.threads)
        rows["diffusers AudioLDMPipeline, same windows sequentially"] = {
            "wall_s": base["wall_s"], "rtf": base["wall_s"] / args.seconds, "first_section_s": base["first_section_s"]}
    header = (f"Compose of a {args.seconds:g} s piece ({REQUEST!r}), profile {args.profile}, {args.steps} steps, "
              f"{sample['windows']} windows of <= {args.window_s:g} s with {args.overlap_s:g} s crossfades, "
              f"{os.cpu_count()} CPU cores")
    lines = ["| path | wall s | real-time factor (wall / audio s) | time to first section audio s |",
             "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['rtf']:.3f} | {r['first_section_s']:.1f} |")
    lines += ["", "Joins of the served piece (mean over its joins; 'inside': the middle of each following window)", "",
              "| joins | jump at joins | jump inside | 400 ms loudness step at joins LU | inside LU | length s | "
              "LUFS | true peak dBTP |", "|---|---|---|---|---|---|---|---|",
              f"| {sample['joins']} | {sample['join_jump']:.4f} | {sample['inside_jump']:.4f} | "
              f"{sample['join_step_lu']:.2f} | {sample['inside_step_lu']:.2f} | {sample['length_s']:.3f} | "
              f"{sample['lufs']:.2f} | {sample['true_peak_dbtp']:.2f} |"]
    md = header + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compose_long_{args.profile}_{args.windows_in_flight}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
