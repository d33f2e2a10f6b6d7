"""The one audio I/O module: decoding what callers send, encoding what the server returns.

Input: WAV, FLAC, OGG (Vorbis, Opus) and MP3, detected from the content (magic bytes, never a file name) and
decoded by libsndfile through soundfile; everything else is refused with an INVALID_ARGUMENT that names the
format that was found, so a user sending an .m4a learns why, not just that it failed. Decoding is bounded by
duration before the samples are materialised: a small compressed file cannot expand into gigabytes.

Output: :func:`encode_audio` writes the formats of :class:`AudioFormat` (the proto ``grym.v1.AudioFormat``
numbers; the api layer converts). Validation happens here, before any model runs, so that a bad clip costs the
server a parse and not a Triton call.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import IntEnum
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


class AudioFormat(IntEnum):
    """Encodings the server returns; the values are the proto ``grym.v1.AudioFormat`` numbers (0, unset, is the
    api layer's business: it means :attr:`WAV_PCM16`)."""

    WAV_PCM16 = 1
    WAV_PCM24 = 2
    FLAC = 3
    OGG_OPUS = 4
    OGG_VORBIS = 5
    MP3 = 6


@dataclass(frozen=True)
class _Codec:
    """How libsndfile writes one :class:`AudioFormat`: container, subtype, quality and the rates it accepts."""

    container: str
    subtype: str
    extension: str
    compression_level: float | None = None  # libsndfile's 0 (best quality) .. 1 (smallest); None: lossless
    rates_hz: tuple[int, ...] = ()  # empty: any rate


# MPEG-1/2/2.5 Layer III sample rates; Opus codes at 8/12/16/24/48 kHz only. Quality levels were chosen by
# measurement on a six-partial test tone at 16 kHz (docs/observability.md has the audio table): Vorbis 0.3 and
# MP3 0.3 keep waveform SNR > 30 dB at ~22-25 kbit/s; Opus is perceptual (phase is not kept, SNR says little),
# 0.7 keeps correlation > 0.99 at ~84 kbit/s.
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
CODECS: dict[AudioFormat, _Codec] = {
    AudioFormat.WAV_PCM16: _Codec("WAV", "PCM_16", "wav"),
    AudioFormat.WAV_PCM24: _Codec("WAV", "PCM_24", "wav"),
    AudioFormat.FLAC: _Codec("FLAC", "PCM_16", "flac"),
    AudioFormat.OGG_OPUS: _Codec("OGG", "OPUS", "opus", 0.7, _OPUS_RATES),
    AudioFormat.OGG_VORBIS: _Codec("OGG", "VORBIS", "ogg", 0.3),
    AudioFormat.MP3: _Codec("MP3", "MPEG_LAYER_III", "mp3", 0.3, _MP3_RATES),
}
SUPPORTED_INPUTS = "WAV, FLAC, OGG (Vorbis, Opus), MP3"
# Samples (frames x channels) decoded per read: 16 MB of float32. Most uploads decode in one read; libmpg123 prints
# harmless resync notes when a low-rate MP3 is read in many small blocks.
_DECODE_BLOCK_SAMPLES = 1 << 22
# Formats whose header states the exact length (an MP3's or Ogg's length is an estimate or needs a scan).
_EXACT_LENGTH = frozenset({"WAV", "FLAC"})


# --- format detection -------------------------------------------------------------------------------------------
# Signatures of formats we refuse, so the refusal can name what was sent. Checked after the supported ones.
_FOREIGN_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "an AAC/MP4 (M4A) file"),
    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM file"),
    (0, b"#!AMR", "an AMR file"),
    (0, b"MAC ", "a Monkey's Audio (APE) file"),
    (0, b"wvpk", "a WavPack file"),
    (0, b"0&\xb2u\x8ef\xcf\x11", "a WMA/ASF file"),
    (0, b".snd", "an AU file"),
    (0, b"caff", "a CAF file"),
    (0, b"MThd", "a MIDI file (notes, not audio)"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"\x7fELF", "an ELF executable"),
)


def _mpeg_frame(head: bytes) -> str | None:
    """Name of the MPEG audio stream whose frame header starts ``head`` (sync word and layer bits), if any."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    if layer == 0:
        return "an AAC (ADTS) stream" if head[1] & 0xF6 == 0xF0 else "an unknown MPEG stream"
    if version == 1:  # reserved
        return None
    return {1: "MP3", 2: "an MPEG Layer II stream", 3: "an MPEG Layer I stream"}[layer]


def _skip_id3(data: bytes) -> bytes:
    """The bytes after a leading ID3v2 tag (MP3 files often start with one; its size is a 28-bit syncsafe int)."""
    if len(data) >= 10 and data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        return data[10 + size + (10 if data[5] & 0x10 else 0):]
    return data


def _ogg_codec(data: bytes) -> str:
    """The codec of an Ogg stream, from the first packet of its first page."""
    if len(data) < 27:
        return "a truncated OGG file"
    segments = data[26]
    payload = data[27 + segments: 27 + segments + 16]
    for marker, name in ((b"\x01vorbis", "OGG/Vorbis"), (b"OpusHead", "OGG/Opus"), (b"\x7fFLAC", "an OGG/FLAC file"),
                         (b"Speex   ", "an OGG/Speex file"), (b"\x80theora", "an OGG/Theora video")):
        if payload.startswith(marker):
            return name
    return "an OGG file with an unknown codec"


def detect_format(data: bytes) -> str:
    """Name the audio format of ``data`` from its content: one of :data:`DECODABLE` for what this module decodes,
    otherwise a phrase saying what it is ("an AAC/MP4 (M4A) file"), which the refusal message quotes."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return _ogg_codec(data)
    if len(data) >= 12 and data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "an AIFF file"
    if data[:4] == b"RIFF":
        return f"a RIFF file of type {data[8:12]!r} (not WAVE)" if len(data) >= 12 else "a truncated RIFF file"
    body = _skip_id3(data)
    if body is not data:
        if not body:
            return "an ID3 tag without audio"
        if body[:4] == b"fLaC":
            return "FLAC"
    mpeg = _mpeg_frame(body)
    if mpeg is not None:
        return mpeg
    for offset, magic, name in _FOREIGN_SIGNATURES:
        if data[offset: offset + len(magic)] == magic:
            return name
    if not data:
        return "empty"
    if _looks_like_text(data[:512]):
        return "text, not audio"
    return "not in a recognised audio format"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


DECODABLE = frozenset({"WAV", "FLAC", "OGG/Vorbis", "OGG/Opus", "MP3"})


def decode_file(data: bytes, *, max_seconds: float, what: str = "audio.file") -> tuple[np.ndarray, int]:
    """Decode an audio file into (mono float32 samples, sample rate); refuse unsupported content by name.

    The duration is checked from the header where it is exact (WAV, FLAC) and again while reading blocks, so decoding
    stops at ``max_seconds`` plus one block whatever the file claims; channels are mixed down per block.
    """
    found = detect_format(data)
    if found not in DECODABLE:
        raise InvalidArgument(f"{what} is {found}; supported: {SUPPORTED_INPUTS}")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            _check_layout(rate, channels, what)
            limit = int(max_seconds * rate) + 1
            if found in _EXACT_LENGTH and f.frames > limit:
                raise OutOfRange(f"{what} is {f.frames / rate:.1f} s, longer than {max_seconds:.0f} s, the most this "
                                 "call accepts")
            block_frames = max(_DECODE_BLOCK_SAMPLES // channels, 1)
            blocks, total = [], 0
            while total <= limit:
                block = f.read(block_frames, dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(block.mean(axis=1, dtype=np.float32))
                total += len(block)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError, AssertionError) as exc:
        # LibsndfileError's str() names the BytesIO object (an address); its error_string is the reason alone.
        reason = getattr(exc, "error_string", "") or str(exc)
        raise InvalidArgument(f"{what} looks like {found} but could not be decoded: {reason}") from None
    if total > limit:
        raise OutOfRange(f"{what} is longer than {max_seconds:.0f} s, the most this call accepts")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return samples, rate


def _check_layout(rate: int, channels: int, what: str) -> None:
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise InvalidArgument(f"{what} has a sample rate of {rate} Hz; supported: {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"{what} has {channels} channels; supported: 1..{MAX_CHANNELS}")


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


def encoded_rate_hz(rate: int, fmt: AudioFormat) -> int:
    """The sample rate ``fmt`` stores audio of ``rate`` at: the rate itself where the codec takes it, else the
    smallest rate the codec takes that is not lower (the highest it has, past its top)."""
    rates = CODECS[fmt].rates_hz
    if not rates or rate in rates:
        return rate
    return next((r for r in rates if r >= rate), rates[-1])


def encode_audio(samples: np.ndarray, sample_rate_hz: int, fmt: AudioFormat = AudioFormat.WAV_PCM16) -> bytes:
    """Encode mono (n) or multichannel (n x channels) float samples as one complete file in ``fmt``.

    Samples are clipped to [-1, 1]. Where the codec does not take ``sample_rate_hz`` (Opus, MP3), the audio is
    resampled to :func:`encoded_rate_hz` first, so a decoder restores exactly that rate and the same duration.
    """
    codec = CODECS[AudioFormat(fmt)]
    data = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    rate = encoded_rate_hz(sample_rate_hz, fmt)
    if rate != sample_rate_hz:
        g = gcd(rate, sample_rate_hz)
        data = np.clip(resample_poly(data, rate // g, sample_rate_hz // g, axis=0), -1.0, 1.0).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=codec.container, subtype=codec.subtype,
             compression_level=codec.compression_level)
    return buf.getvalue()


def encode_wav(samples: np.ndarray, rate: int = TARGET_RATE_HZ) -> bytes:
    """16-bit PCM WAV bytes (the default output format)."""
    return encode_audio(samples, rate, AudioFormat.WAV_PCM16)
