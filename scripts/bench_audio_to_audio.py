#!/usr/bin/env python3
"""Benchmark VARY and CONTINUE beside text generation on the Triton ``audioldm`` pipeline model (no orchestrator).

One embedded tritonserver over a repository of the AudioLDM models (built if missing); sequential generations of
``--seconds`` of audio with ``--steps`` steps and distinct seeds: TEXT, VARY at strength 0 (encode + decode only),
0.5 and 1.0, and CONTINUE of a ``--context`` second context. Reports the median and p90 wall time per generation
and what the init audio costs (the vae_encoder call and, for CONTINUE, the longer window). Prints a Markdown table.

    python scripts/bench_audio_to_audio.py --profile tiny --seconds 2 --steps 10 --runs 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import audioldm_stream  # noqa: E402
from grym_synth.inference.export import audioldm  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402

PROMPT = "warm analog pad, slow attack"
RATE = 16_000


def run_one(url: str, params: dict) -> float:
    """Seconds for one generation, submit to final response."""
    t0 = time.perf_counter()
    got = audioldm_stream.generate(url, PROMPT, timeout=600, **params)
    if got.error is not None:
        raise RuntimeError(got.error)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--context", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--repo", type=Path, default=ROOT / "build" / "bench_a2a" / "repo")
    args = ap.parse_args()

    build_repository(args.profile, args.repo, models=audioldm.MODELS, seed=0)
    t = np.arange(int(max(args.seconds, args.context) * RATE)) / RATE
    init = (0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-t)).astype(np.float32)
    cases = {
        "text": {},
        "vary 0.0": {"mode": "vary", "init_audio": init, "init_strength": 0.0},
        "vary 0.5": {"mode": "vary", "init_audio": init, "init_strength": 0.5},
        "vary 1.0": {"mode": "vary", "init_audio": init, "init_strength": 1.0},
        f"continue ({args.context:g} s context)": {"mode": "continue", "init_audio": init,
                                                     "context_s": args.context},
    }
    log = args.repo.parent / "triton.log"
    triton = EmbeddedTriton(args.repo, log, startup_timeout_s=300)
    triton.start()
    rows = []
    try:
        for name, extra in cases.items():
            base = {"steps": args.steps, "duration_s": args.seconds}
            run_one(triton.grpc_url, base | extra | {"seed": 999})  # warm-up
            times = [run_one(triton.grpc_url, base | extra | {"seed": seed}) for seed in range(args.runs)]
            rows.append((name, float(np.median(times)), float(np.percentile(times, 90))))
    finally:
        triton.stop()
    print(f"\nprofile={args.profile} seconds={args.seconds:g} steps={args.steps} runs={args.runs} (sequential)\n")
    print("| mode | median s | p90 s | vs text |\n|---|---|---|---|")
    text = rows[0][1]
    for name, median, p90 in rows:
        print(f"| {name} | {median:.3f} | {p90:.3f} | {median / text:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
