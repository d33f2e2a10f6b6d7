#!/usr/bin/env python3
"""Write the perf_analyzer ``--input-data`` JSON files for every Triton model of grym-synth.

WHY generated: the tensor shapes follow the size profile (AudioLDM-S latents for "full", the toy shapes for
"tiny"), and perf_analyzer's random data is wrong for these models (random FP32 bytes decode to NaN/Inf, which
wav2vec2 rejects; random token ids overflow the CLAP vocabulary). The dimensions are derived from the exporters'
own profile tables (server/export/audioldm.py PROFILES), so the files cannot drift from what is served.
The values are seeded: same profile -> byte-identical files.

    .venv/bin/python deploy/perf_analyzer/make_inputs.py                 # full profile -> deploy/perf_analyzer/
    .venv/bin/python deploy/perf_analyzer/make_inputs.py --profile tiny --out /tmp/pa   # for the tiny test server
    .venv/bin/python deploy/perf_analyzer/make_inputs.py --check         # exit 1 when the committed files differ

Format (perf_analyzer docs, "input data"): {"data": [{INPUT: {"content"|"b64": ..., "shape": [...]}}]}; the shape
excludes the batch dimension for models with max_batch_size > 0 (perf_analyzer -b N repeats the row N times).
Float tensors are base64 of little-endian float32 to keep the files small; ids, scalars and strings are literal.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 20240607
WAV2VEC2_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Target:
    """One input file: the model it drives and the config variants (under model_repository/<model>/) it fits."""

    model: str
    configs: tuple[str, ...]
    decoupled: bool = False


# File stem -> what it is for. The coordinator has two protocols: the python-backend default (config.pbtxt) and
# Triton's vLLM backend (configs/vllm.pbtxt), whose inputs differ, hence two files.
TARGETS: dict[str, Target] = {
    "wav2vec2": Target("wav2vec2", ("config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")),
    "clap_text_encoder": Target(
        "clap_text_encoder", ("config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")),
    "unet": Target("unet", ("config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")),
    "vae_decoder": Target("vae_decoder", ("config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")),
    "vocoder": Target("vocoder", ("config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")),
    "audioldm": Target("audioldm", ("config.pbtxt",), decoupled=True),
    "coordinator": Target("coordinator", ("config.pbtxt",), decoupled=True),
    "coordinator_vllm": Target("coordinator", ("configs/vllm.pbtxt",), decoupled=True),
    # the trained music models (docs/models.md); no TensorRT variants
    "basic_pitch": Target("basic_pitch", ("config.pbtxt", "configs/onnxruntime.pbtxt")),
    "musicnn": Target("musicnn", ("config.pbtxt", "configs/onnxruntime.pbtxt")),
    "crepe": Target("crepe", ("config.pbtxt", "configs/onnxruntime.pbtxt")),
    "silero_vad": Target("silero_vad", ("config.pbtxt", "configs/onnxruntime.pbtxt")),
}

PROMPT = "a warm analog synth pad with slow filter sweeps"
COORDINATOR_PROMPT = "Plan a 16-bar ambient piece in D minor: sections, instruments and a one-line prompt for each."


@dataclass(frozen=True)
class Dims:
    """The tensor sizes of one profile's default generation (AudioLDMPipeline's default duration)."""

    latent_channels: int
    latent_frames: int
    latent_width: int
    mel_frames: int
    mel_bins: int
    projection_dim: int
    text_length: int
    vocab: int
    duration_s: float
    coordinator_max_tokens: int


def _mel_frames(duration_s: float, seconds_per_frame: float, vae_scale_factor: int) -> int:
    """AudioLDMPipeline's height for a duration: int(d / frame length), rounded up to the VAE scale factor."""
    height = int(duration_s / seconds_per_frame)
    return -(-height // vae_scale_factor) * vae_scale_factor


def dims(profile: str) -> Dims:
    """Derive every dimension from the exporters' profile table, exactly as the pipeline model does."""
    from grym_synth.inference.export import audioldm

    p = audioldm.PROFILES[profile]
    scale = 2 ** (len(p.vae["block_out_channels"]) - 1)  # AudioLDMPipeline.vae_scale_factor
    rates = [int(r) for r in p.vocoder["upsample_rates"]]
    sampling_rate = int(p.vocoder["sampling_rate"])
    hop = int(np.prod(rates))
    # The pipeline's default duration: unet.sample_size * vae_scale_factor * hop / sampling_rate.
    duration_s = p.unet["sample_size"] * scale * hop / sampling_rate
    mel_frames = _mel_frames(duration_s, hop / sampling_rate, scale)
    vocab = min(int(p.tokenizer_vocab_size), int(p.text_encoder["vocab_size"]))
    return Dims(
        latent_channels=int(p.unet["in_channels"]),
        latent_frames=mel_frames // scale,
        latent_width=int(p.vocoder["model_in_dim"]) // scale,
        mel_frames=mel_frames,
        mel_bins=int(p.vocoder["model_in_dim"]),
        projection_dim=int(p.text_encoder["projection_dim"]),
        text_length=int(p.tokenizer_max_length),
        vocab=vocab,
        duration_s=round(duration_s, 6),
        coordinator_max_tokens=128 if profile == "full" else 16,
    )


def _f32(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"b64": base64.b64encode(a.tobytes()).decode("ascii"), "shape": list(a.shape)}


def _ints(values: list[int], shape: list[int]) -> dict[str, Any]:
    return {"content": [int(v) for v in values], "shape": shape}


def _scalar(value: Any) -> dict[str, Any]:
    return {"content": [value], "shape": [1]}


def _token_ids(d: Dims, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A RoBERTa-style padded sequence: <s>=0, 12 word ids, </s>=2, then <pad>=1 up to the model length."""
    words = rng.integers(3, d.vocab, size=min(12, d.text_length - 2)).tolist()
    ids = [0, *words, 2]
    mask = [1] * len(ids) + [0] * (d.text_length - len(ids))
    ids += [1] * (d.text_length - len(ids))
    return ids, mask


def documents(profile: str) -> dict[str, dict[str, Any]]:
    """File stem -> perf_analyzer input-data document for ``profile``."""
    from grym_synth.inference.export import coordinator

    d = dims(profile)
    rng = np.random.default_rng(SEED)
    t = np.arange(WAV2VEC2_SAMPLE_RATE) / WAV2VEC2_SAMPLE_RATE
    # One second of a chord plus a little noise: audio-like statistics, finite everywhere.
    audio = 0.2 * (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 330 * t)) + 0.01 * rng.standard_normal(t.size)
    ids, mask = _token_ids(d, rng)
    latent = rng.standard_normal((d.latent_channels, d.latent_frames, d.latent_width))
    class_labels = rng.standard_normal(d.projection_dim)
    class_labels /= np.linalg.norm(class_labels)  # the pipeline feeds L2-normalised CLAP embeddings
    # Log-mel values in the range AudioLDM's VAE produces (about -11 .. 2).
    mel = rng.uniform(-11.0, 2.0, size=(d.mel_frames, d.mel_bins))
    sampling = {"max_tokens": d.coordinator_max_tokens, "temperature": 0.6, "top_p": 0.95, "seed": 7}
    rendered = coordinator.BOS_TOKEN + coordinator.USER_TOKEN + COORDINATOR_PROMPT + coordinator.GENERATION_PROMPT
    docs: dict[str, dict[str, Any]] = {
        "wav2vec2": {"audio": _f32(audio)},
        "clap_text_encoder": {
            "input_ids": _ints(ids, [d.text_length]),
            "attention_mask": _ints(mask, [d.text_length]),
        },
        "unet": {
            "sample": _f32(latent),
            "timestep": _f32(np.array([981.0])),  # DDIM's first timestep at 10 steps
            "class_labels": _f32(class_labels),
        },
        "vae_decoder": {"latents": _f32(latent)},
        "vocoder": {"mel": _f32(mel)},
        "audioldm": {
            "prompt": _scalar(PROMPT),
            "seed": _scalar(42),
            "steps": _scalar(10),
            "guidance_scale": _scalar(2.5),
            "duration_s": _scalar(d.duration_s),
        },
        "coordinator": {
            "prompt": _scalar(COORDINATOR_PROMPT),
            "max_tokens": _scalar(d.coordinator_max_tokens),
            "temperature": _scalar(0.6),
            "top_p": _scalar(0.95),
            "seed": _scalar(7),
        },
        "coordinator_vllm": {
            "text_input": _scalar(rendered),
            "stream": _scalar(True),
            "sampling_parameters": _scalar(json.dumps(sampling, sort_keys=True)),
            "exclude_input_in_output": _scalar(True),
            "return_finish_reason": _scalar(True),
        },
    }
    docs.update(_music_documents(rng))
    assert set(docs) == set(TARGETS)
    return {stem: {"data": [row]} for stem, row in docs.items()}


def _music_documents(rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Inputs of the trained music models, as their clients cut them (grym_synth.inference.music_models): one
    basic-pitch window (43844 samples at 22050 Hz) of a chord, one musicnn log-mel patch (values in the range of
    log10(10000 x + 1)), one normalised CREPE frame, one silero block of 32 frames with zero LSTM state. Drawn
    after the other models' data so their files do not change."""
    t = np.arange(43844) / 22050
    window = 0.2 * (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 330 * t))
    frame = np.sin(2 * np.pi * 220 * np.arange(1024) / 16000)
    frame = (frame - frame.mean()) / frame.std()
    speech = 0.1 * rng.standard_normal(32 * 576)
    return {
        "basic_pitch": {"audio": _f32(window[:, None])},
        "musicnn": {"patches": _f32(rng.uniform(0.0, 3.0, size=(187, 96)))},
        "crepe": {"frames": _f32(frame)},
        "silero_vad": {"input": _f32(speech.reshape(32, 576)), "h": _f32(np.zeros((1, 1, 128))),
                       "c": _f32(np.zeros((1, 1, 128)))},
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=["tiny", "full"])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for stem, doc in documents(args.profile).items():
        path = args.out / f"{stem}.json"
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("out of date (re-run make_inputs.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
