#!/usr/bin/env python3
"""Write a few synthesised WAV clips for the demo (no audio files are committed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 44_100


def chord(freqs: list[float], seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    env = np.minimum(1.0, t / 0.8) * np.exp(-t / (seconds * 2))  # slow attack pad
    x = sum(np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t) for f in freqs)
    return (0.2 * env * x / len(freqs)).astype(np.float32)


def pulse(bpm: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    beat = (t * bpm / 60) % 1.0
    return (0.5 * np.exp(-beat * 30) * np.sin(2 * np.pi * 60 * t)).astype(np.float32)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clips = {
        "pad_c_major.wav": chord([261.6, 329.6, 392.0], 4.0),
        "pad_a_minor.wav": chord([220.0, 261.6, 329.6], 4.0),
        "pulse_120bpm.wav": pulse(120, 4.0),
    }
    for name, x in clips.items():
        sf.write(out / name, np.stack([x, x], axis=1), RATE, subtype="PCM_16")  # stereo 44.1 kHz, like a DAW
    print(f"wrote {', '.join(clips)} to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
