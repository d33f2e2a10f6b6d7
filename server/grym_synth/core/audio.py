"""Audio decoding and normalisation: whatever a caller sends becomes 16 kHz mono float32.

Validation happens here, before any model runs, so that a bad clip costs the server a parse and not a Triton
call, and the caller gets an INVALID_ARGUMENT that names what is wrong.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from grym_synth.core.errors import InvalidArgument, OutOfRange

TARGET_RATE_HZ = 16_000
MIN_RATE_HZ, MAX_RATE_HZ = 1_000, 384_000
MAX_CHANNELS = 32


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples at :data:`TARGET_RATE_HZ`."""

    samples: np.ndarray

    @property
    def duration_s(self) -> float:
        return len(self.samples) / TARGET_RATE_HZ

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Parse WAV bytes into (frames x channels float32, sample rate); non-WAV input is INVALID_ARGUMENT."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise InvalidArgument("audio.wav is not a RIFF/WAVE file (expected the bytes of a .wav file)")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"audio.wav could not be decoded: {exc}") from None
    return samples, int(rate)


def decode_pcm(data: bytes, sample_rate_hz: int, channels: int, encoding: str) -> tuple[np.ndarray, int]:
    """Interpret raw interleaved PCM; ``encoding`` is ``float32`` or ``linear16``."""
    channels = channels or 1
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"audio.pcm.channels must be 1..{MAX_CHANNELS}, got {channels}")
    dtype = np.dtype("<i2") if encoding == "linear16" else np.dtype("<f4")
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise InvalidArgument(
            f"audio.pcm.data has {len(data)} bytes, not a multiple of {frame_bytes} "
            f"({encoding}, {channels} channel(s))"
        )
    samples = np.frombuffer(data, dtype=dtype).reshape(-1, channels)
    if encoding == "linear16":
        samples = samples.astype(np.float32) / 32768.0
    return samples, sample_rate_hz


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mix down to mono and resample with a polyphase filter (exact rational ratio)."""
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise InvalidArgument(f"sample rate must be {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz, got {rate}")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)
    if rate != TARGET_RATE_HZ:
        g = gcd(rate, TARGET_RATE_HZ)
        mono = resample_poly(mono, TARGET_RATE_HZ // g, rate // g).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def validate(samples: np.ndarray, *, min_samples: int, max_seconds: float, what: str = "audio") -> Audio:
    """Reject empty, too short, too long or non-finite audio with a message the caller can act on."""
    if samples.size == 0:
        raise InvalidArgument(f"{what} is empty")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise InvalidArgument(f"{what} contains {bad} NaN or infinite sample(s)")
    if len(samples) < min_samples:
        raise InvalidArgument(
            f"{what} is {len(samples)} samples at 16 kHz; at least {min_samples} "
            f"({min_samples / TARGET_RATE_HZ * 1000:.0f} ms) are needed for one feature frame"
        )
    duration = len(samples) / TARGET_RATE_HZ
    if duration > max_seconds:
        raise OutOfRange(
            f"{what} is {duration:.1f} s; this server accepts at most {max_seconds:.0f} s per AnalyzeAudio call "
            "(use StreamAnalyze for longer audio)"
        )
    return Audio(samples)


def encode_wav(samples: np.ndarray, rate: int = TARGET_RATE_HZ) -> bytes:
    """16-bit PCM WAV bytes (what Generate returns and what clients write to disk)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
