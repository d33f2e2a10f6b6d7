"""Mastering a composed piece: integrated loudness to a target (ITU-R BS.1770 via pyloudnorm), true peak under a
ceiling (4x oversampled peak estimate, look-ahead limiter), and fades at the ends.

Why here and not per window: loudness is a property of the whole piece (a quiet intro and a loud climax must keep
their difference), so windows are only level-matched at their joins (:mod:`grym_synth.compose.longform`) and the
piece gets one gain. Sections streamed before the piece is finished use a *provisional* gain predicted from the
sections so far and the planned levels of the rest (:func:`predicted_gain_db`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyloudnorm
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

OVERSAMPLE = 4  # BS.1770-4 true peak: at least 4x oversampling at 48 kHz and below
LIMITER_LOOKAHEAD_S = 0.005
SAFETY_DB = 0.1  # the limiter aims this far under the ceiling, so the oversampled estimate stays below it
MAX_GAIN_DB = 40.0  # near-silence is not amplified into noise beyond this
MIN_LOUDNESS_BLOCK_S = 0.05


@dataclass(frozen=True)
class MasterSettings:
    """What the master aims for (server settings compose_target_lufs, compose_true_peak_dbtp)."""

    target_lufs: float = -14.0
    true_peak_dbtp: float = -1.0
    fade_in_s: float = 0.02
    fade_out_s: float = 1.5


@dataclass(frozen=True)
class MasterReport:
    gain_db: float
    loudness_lufs: float
    true_peak_dbtp: float


def integrated_loudness(samples: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS (-inf for silence). Audio shorter than pyloudnorm's 400 ms block is measured with
    one block of its own length (0.5 s pieces are allowed)."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    seconds = len(x) / rate
    if seconds < MIN_LOUDNESS_BLOCK_S or not np.any(x):
        return -math.inf
    meter = pyloudnorm.Meter(rate, block_size=min(0.4, seconds))
    return float(meter.integrated_loudness(x))


def short_term_loudness(samples: np.ndarray, rate: int, at: int, window_s: float = 0.4) -> float:
    """Loudness (LUFS, K-weighted) of ``window_s`` of audio starting at sample ``at``."""
    n = int(window_s * rate)
    return integrated_loudness(samples[max(0, at): max(0, at) + n], rate)


def true_peak_db(samples: np.ndarray, rate: int = 16_000) -> float:
    """Peak of the 4x oversampled signal in dBTP (inter-sample peaks included)."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if not len(x):
        return -math.inf
    peak = float(np.max(np.abs(resample_poly(x, OVERSAMPLE, 1))))
    peak = max(peak, float(np.max(np.abs(x))))
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def limit(samples: np.ndarray, rate: int, ceiling_db: float) -> np.ndarray:
    """Look-ahead peak limiter: per-sample gain never above what keeps the (oversampled) peak under the ceiling,
    smoothed so it ramps over ``LIMITER_LOOKAHEAD_S`` instead of clipping."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if not len(x):
        return x.astype(np.float32)
    ceiling = 10 ** ((ceiling_db - SAFETY_DB) / 20)
    over = np.abs(resample_poly(x, OVERSAMPLE, 1))[: len(x) * OVERSAMPLE]
    over = np.pad(over, (0, len(x) * OVERSAMPLE - len(over)))
    peaks = np.maximum(over.reshape(len(x), OVERSAMPLE).max(axis=1), np.abs(x))
    if peaks.max() <= ceiling:
        return x.astype(np.float32)
    needed = np.minimum(1.0, ceiling / np.maximum(peaks, 1e-12))
    half = max(1, int(LIMITER_LOOKAHEAD_S * rate))
    # A centred moving average (width <= half) of a minimum over +-half never exceeds the need at any sample.
    gain = uniform_filter1d(minimum_filter1d(needed, size=2 * half + 1, mode="nearest"), size=half, mode="nearest")
    return (x * np.minimum(gain, needed)).astype(np.float32)


def fades(length: int, rate: int, settings: MasterSettings) -> np.ndarray:
    """Gain of each sample from the fade in at the start and the fade out at the end (each at most a quarter of the
    piece), raised-cosine shaped."""
    env = np.ones(length, dtype=np.float64)
    for seconds, at_end in ((settings.fade_in_s, False), (settings.fade_out_s, True)):
        n = min(int(seconds * rate), length // 4)
        if n <= 0:
            continue
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, n))
        if at_end:
            env[length - n:] *= ramp[::-1]
        else:
            env[:n] *= ramp
    return env


def gain_for(loudness: float, settings: MasterSettings) -> float:
    if not math.isfinite(loudness):
        return 0.0
    return float(min(MAX_GAIN_DB, settings.target_lufs - loudness))


def apply_gain(samples: np.ndarray, rate: int, gain_db: float, settings: MasterSettings) -> np.ndarray:
    """The master chain with a known gain: gain, then the true-peak limiter."""
    x = np.asarray(samples, dtype=np.float64) * 10 ** (gain_db / 20)
    return limit(x, rate, settings.true_peak_dbtp)


def master(samples: np.ndarray, rate: int, settings: MasterSettings) -> tuple[np.ndarray, MasterReport]:
    """Normalise to the target loudness with peaks under the ceiling. The limiter lowers loudness where it works, so
    the gain is corrected from the limited result (a few rounds converge well within 0.1 LU)."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    loudness = integrated_loudness(x, rate)
    gain = gain_for(loudness, settings)
    out = apply_gain(x, rate, gain, settings)
    for _ in range(4):
        measured = integrated_loudness(out, rate)
        if not math.isfinite(measured) or abs(measured - settings.target_lufs) < 0.05:
            break
        gain = min(MAX_GAIN_DB, gain + settings.target_lufs - measured)
        out = apply_gain(x, rate, gain, settings)
    return out, MasterReport(gain_db=gain, loudness_lufs=integrated_loudness(out, rate),
                             true_peak_dbtp=true_peak_db(out, rate))


def predicted_gain_db(sofar: np.ndarray, rate: int, planned_sofar_db: float, planned_total_db: float,
                      settings: MasterSettings) -> float:
    """The gain a piece will probably get, from the audio so far: the piece's loudness is predicted as that of the
    sections so far shifted by how much louder the whole plan is than its part so far (``planned_*_db``: energy
    means of the planned level envelope), assuming the model renders every window at a similar raw level."""
    loudness = integrated_loudness(sofar, rate)
    if not math.isfinite(loudness):
        return 0.0
    return gain_for(loudness + planned_total_db - planned_sofar_db, settings)
