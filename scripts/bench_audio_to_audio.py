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
import queue
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from grym_synth.inference.export import audioldm  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402

PROMPT = "warm analog pad, slow attack"
RATE = 16_000


def _inputs(params: dict) -> list:
    import tritonclient.grpc as tc

    types = {"seed": (np.int64, "INT64"), "steps": (np.int32, "INT32"), "duration_s": (np.float32, "FP32"),
             "init_strength": (np.float32, "FP32"), "context_s": (np.float32, "FP32")}
    out = []
    for name, value in params.items():
        if name == "init_audio":
            array, dtype = np.asarray(value, np.float32), "FP32"
        elif name in types:
            array, dtype = np.array([value], dtype=types[name][0]), types[name][1]
        else:
            array, dtype = np.array([str(value).encode()], dtype=object), "BYTES"
        t = tc.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def run_one(url: str, params: dict) -> float:
    import tritonclient.grpc as tc

    responses: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        t0 = time.perf_counter()
        client.async_stream_infer("audioldm", _inputs({"prompt": PROMPT} | params), request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param and not response.outputs:
                return time.perf_counter() - t0
    finally:
        client.stop_stream()
        client.close()


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
