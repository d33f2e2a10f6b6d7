#!/usr/bin/env python3
"""Benchmark the audio I/O module (server/grym_synth/core/audio.py): encode and decode time, size and fidelity of
every output format, on the kind of audio the server returns (16 kHz mono, AudioLDM's rate) and on a CD-rate
stereo input (44.1 kHz, what users upload).

Fidelity: waveform SNR and correlation of decode(encode(x)) against x (Opus is perceptual: its SNR says little).
Time: best of ``--repeat`` runs, one thread, this machine. Prints a Markdown table.

    python scripts/bench_audio_codecs.py --seconds 30 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "server"))

from grym_synth.core.audio import AudioFormat, decode_file, encode_audio, encoded_rate_hz  # noqa: E402


def music(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Six partials with a slow swell, plus a little noise: music-like, deterministic."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(0.12 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (110, 220, 330, 440, 990, 1500))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t)) + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1) if channels > 1 else x


def best(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the test signal (default 30)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    args = ap.parse_args()
    print(f"| input | format | size kB | kbit/s | encode ms | decode ms | x real time (enc+dec) | SNR dB | corr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate, channels in ((16_000, 1), (44_100, 2)):
        x = music(args.seconds, rate, channels)
        mono = x.mean(axis=1) if x.ndim == 2 else x
        for fmt in AudioFormat:
            enc_s, data = best(lambda: encode_audio(x, rate, fmt), args.repeat)
            dec_s, (y, got_rate) = best(lambda: decode_file(data, max_seconds=args.seconds + 5), args.repeat)
            assert got_rate == encoded_rate_hz(rate, fmt)
            ref = mono if got_rate == rate else np.interp(np.arange(len(y)) / got_rate,
                                                          np.arange(len(mono)) / rate, mono)
            n = min(len(ref), len(y))
            err = np.sum((ref[:n] - y[:n]) ** 2)
            snr = 10 * np.log10(np.sum(ref[:n] ** 2) / max(err, 1e-30))
            corr = float(np.corrcoef(ref[:n], y[:n])[0, 1])
            size = len(data)  # type: ignore[arg-type]
            print(f"| {rate // 1000 if rate % 1000 == 0 else rate / 1000:g} kHz x{channels} | {fmt.name} | "
                  f"{size / 1000:.0f} | {size * 8 / args.seconds / 1000:.0f} | {enc_s * 1000:.0f} | "
                  f"{dec_s * 1000:.0f} | {args.seconds / (enc_s + dec_s):.0f} | "
                  f"{'n/a' if fmt == AudioFormat.OGG_OPUS else f'{snr:.1f}'} | {corr:.4f} |")


if __name__ == "__main__":
    main()
