#!/usr/bin/env python
"""Served (Triton, through MusicModels) vs in-process speed of the four trained music models.

Builds (or reuses) a repository with only the music models, starts an embedded tritonserver on it, and times each
model on the same clip both ways, alternating, ``--repeats`` times each; prints a markdown table (median wall
time, real-time factor = clip seconds / wall seconds, served/in-process ratio of speeds).

In-process means each package's own inference on this CPU: basic-pitch's ``predict`` (its ONNX model on
onnxruntime, from a wav file as the package takes it), ``torchcrepe.predict(model="tiny")``, silero-vad's
``get_speech_timestamps`` with the streaming ONNX model (the package's default ONNX path) and, for musicnn, the
same ONNX graph on onnxruntime in-process after the same preprocessing (musicnn's own TensorFlow extractor cannot
be imported beside this project's protobuf).

    .venv/bin/python scripts/bench_music_models.py --seconds 30 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from grym_synth.inference.export.repository import MUSIC_MODELS, build_repository
from grym_synth.inference.music_models import MusicModels, musicnn_patches, resample
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import EmbeddedTriton


def clip(seconds: float, rate: int) -> np.ndarray:
    """Plucked-string melody with chords (what the tests use), looped to ``seconds``."""
    t = np.arange(int(0.5 * rate)) / rate
    env = np.exp(-3.0 * t)
    out = np.zeros(int(seconds * rate), np.float32)
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, out.size - t.size, t.size)):
        for midi in rng.choice([60, 62, 64, 65, 67, 69, 71, 72], size=1 + (i % 3), replace=False):
            f = 440 * 2 ** ((midi - 69) / 12)
            out[start:start + t.size] += 0.2 * env * sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 5))
    return out


def in_process(repo: Path, audio: np.ndarray, rate: int, tmp: Path) -> dict[str, callable]:
    import onnxruntime as ort
    import torch
    from basic_pitch import ICASSP_2022_MODEL_PATH
    from basic_pitch.inference import Model, predict
    from silero_vad import get_speech_timestamps, load_silero_vad

    from grym_synth.inference.export.music import import_torchcrepe

    torchcrepe = import_torchcrepe()
    wav = tmp / "clip.wav"
    sf.write(wav, audio, rate, subtype="FLOAT")
    bp_model = Model(Path(str(ICASSP_2022_MODEL_PATH)).with_suffix(".onnx"))
    silero = load_silero_vad(onnx=True)
    musicnn = ort.InferenceSession(str(repo / "musicnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    tensor = torch.from_numpy(audio)[None]
    return {
        "basic_pitch": lambda: predict(wav, bp_model),
        "musicnn": lambda: musicnn.run(None, {"patches": musicnn_patches(resample(audio, rate, 16_000))}),
        "crepe": lambda: torchcrepe.predict(tensor, rate, rate // 100, 50.0, 2006.0, "tiny", return_periodicity=True,
                                            batch_size=None, device="cpu"),
        "silero_vad": lambda: get_speech_timestamps(torch.from_numpy(resample(audio, rate, 16_000)), silero),
    }


async def served(models: MusicModels, name: str, audio: np.ndarray, rate: int) -> None:
    call = {"basic_pitch": models.transcribe, "musicnn": models.tag, "crepe": models.pitch,
            "silero_vad": models.voice}[name]
    await call(audio, rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=22_050)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=Path("data/model_repository/music-bench"))
    args = parser.parse_args()
    build_repository("tiny", args.repo, models=MUSIC_MODELS, seed=0)
    audio = clip(args.seconds, args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedTriton(args.repo, Path(tmp) / "triton.log", startup_timeout_s=300)
        started = time.perf_counter()
        server.start()
        server.wait_models_ready(list(MUSIC_MODELS), timeout_s=300)
        print(f"tritonserver with the 4 music models ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        try:
            rows = asyncio.run(_measure(server, args, audio, Path(tmp)))
        finally:
            server.stop()
    print("| model | clip | in-process median s | served median s | in-process x real time | "
          "served x real time | served / in-process speed |")
    print("|---|---|---|---|---|---|---|")
    for name, local, remote in rows:
        print(f"| {name} | {args.seconds:.0f} s | {local:.3f} | {remote:.3f} | {args.seconds / local:.0f} | "
              f"{args.seconds / remote:.0f} | {local / remote:.2f} |")
    return 0


async def _measure(server: EmbeddedTriton, args: argparse.Namespace, audio: np.ndarray, tmp: Path
                   ) -> list[tuple[str, float, float]]:
    client = TritonClient(server.grpc_url, headers=server.auth_headers or None, timeout_s=300)
    models = MusicModels(client)
    local_calls = in_process(args.repo, audio, args.rate, tmp)
    rows = []
    for name in MUSIC_MODELS:
        await served(models, name, audio, args.rate)  # warm-up both paths
        local_calls[name]()
        local, remote = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            local_calls[name]()
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            await served(models, name, audio, args.rate)
            remote.append(time.perf_counter() - started)
        rows.append((name, statistics.median(local), statistics.median(remote)))
        print(f"{name}: in-process {rows[-1][1]:.3f} s, served {rows[-1][2]:.3f} s", file=sys.stderr)
    await client.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
