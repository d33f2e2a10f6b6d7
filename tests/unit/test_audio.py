"""The audio I/O module (core/audio.py): every output format round-trips through the input decoder, formats are
detected from the content, and everything else is refused with a message that names what was sent.

Bounds per codec, on a six-partial tone with a slow amplitude swell (music-like, not a single sine):
- WAV 16/24-bit, FLAC: lossless up to quantisation: SNR > 80 dB (16-bit; 86.7 measured at this -14 dBFS RMS
  level), > 120 dB (24-bit; 129.6 measured); exact length.
- OGG/Vorbis, MP3 (libsndfile quality 0.3): waveform SNR > 25 dB, correlation > 0.995; exact length (libsndfile
  honours the Vorbis granule position and the LAME gapless header).
- OGG/Opus (quality 0.7): a perceptual codec that does not keep phase exactly: correlation > 0.99 only; exact
  length at Opus rates (pre-skip honoured), within one sample after resampling from other rates.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings, strategies as st

from grym_synth.api import convert
from grym_synth.api.v1 import common_pb2
from grym_synth.core.audio import (CODECS, DECODABLE, AudioFormat, decode_file, detect_format, encode_audio,
                                   encode_wav, encoded_rate_hz)
from grym_synth.core.errors import GrymError, InvalidArgument, OutOfRange
from grym_synth.generation.service import AudioData

RATE = 16_000
MIN_SNR_DB = {AudioFormat.WAV_PCM16: 80.0, AudioFormat.WAV_PCM24: 120.0, AudioFormat.FLAC: 80.0,
              AudioFormat.OGG_VORBIS: 25.0, AudioFormat.MP3: 25.0, AudioFormat.OGG_OPUS: None}
MIN_CORRELATION = {AudioFormat.OGG_OPUS: 0.99, AudioFormat.OGG_VORBIS: 0.995, AudioFormat.MP3: 0.995}
DETECTED = {AudioFormat.WAV_PCM16: "WAV", AudioFormat.WAV_PCM24: "WAV", AudioFormat.FLAC: "FLAC",
            AudioFormat.OGG_OPUS: "OGG/Opus", AudioFormat.OGG_VORBIS: "OGG/Vorbis", AudioFormat.MP3: "MP3"}


def music(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    partials = sum(0.15 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220, 330, 440, 660, 990, 1500))
    return (partials * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - out) ** 2), 1e-30)))


@pytest.mark.parametrize("fmt", list(AudioFormat), ids=lambda f: f.name)
def test_every_format_round_trips(fmt: AudioFormat) -> None:
    x = music(3.0)
    data = encode_audio(x, RATE, fmt)
    assert detect_format(data) == DETECTED[fmt]
    y, rate = decode_file(data, max_seconds=60)
    assert rate == RATE
    assert len(y) == len(x)
    corr = float(np.corrcoef(x, y)[0, 1])
    assert corr > MIN_CORRELATION.get(fmt, 0.9999), corr
    if MIN_SNR_DB[fmt] is not None:
        assert snr_db(x, y) > MIN_SNR_DB[fmt], snr_db(x, y)


@pytest.mark.parametrize("fmt", list(AudioFormat), ids=lambda f: f.name)
@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_decoded_output_has_the_stated_rate_and_duration(fmt: AudioFormat, rate: int) -> None:
    """Opus and MP3 take only some rates: the file is written at encoded_rate_hz, which the chunk states, and a
    decoder restores that rate and the same duration (within one sample of resampling)."""
    x = music(1.3, rate)
    y, got = decode_file(encode_audio(x, rate, fmt), max_seconds=60)
    stated = encoded_rate_hz(rate, fmt)
    assert got == stated
    assert abs(len(y) / stated - len(x) / rate) <= 1.0 / stated + 1e-9


def test_encoded_rates() -> None:
    assert encoded_rate_hz(22_050, AudioFormat.OGG_OPUS) == 24_000
    assert encoded_rate_hz(44_100, AudioFormat.OGG_OPUS) == 48_000
    assert encoded_rate_hz(96_000, AudioFormat.OGG_OPUS) == 48_000
    assert encoded_rate_hz(96_000, AudioFormat.MP3) == 48_000
    assert encoded_rate_hz(96_000, AudioFormat.FLAC) == 96_000
    assert encoded_rate_hz(16_000, AudioFormat.MP3) == 16_000


def test_format_numbers_mirror_the_proto() -> None:
    """One Python enum; the api layer's table maps the proto numbers onto it and unset onto WAV 16-bit."""
    for fmt in AudioFormat:
        assert common_pb2.AudioFormat.Value(f"AUDIO_FORMAT_{fmt.name}") == int(fmt)
    assert set(common_pb2.AudioFormat.values()) == {0, *map(int, AudioFormat)}
    assert convert.audio_format(0) == AudioFormat.WAV_PCM16
    assert set(CODECS) == set(AudioFormat)
    with pytest.raises(InvalidArgument, match="output_format 99 is not a known AudioFormat"):
        convert.audio_format(99)


def test_multichannel_files_are_mixed_down() -> None:
    x = music(1.0)
    stereo = np.stack([x, -0.5 * x], axis=1)
    for fmt in (AudioFormat.FLAC, AudioFormat.OGG_VORBIS):
        y, _ = decode_file(encode_audio(stereo, RATE, fmt), max_seconds=60)
        assert np.corrcoef(0.25 * x, y)[0, 1] > 0.99


def test_decoding_is_bounded_by_duration_before_materialising() -> None:
    """A FLAC of 10 minutes of silence is a few kB: decoding stops after the limit instead of expanding it."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(600 * 8_000, np.float32), 8_000, format="FLAC")
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(OutOfRange, match="longer than 60 s"):
        decode_file(buf.getvalue(), max_seconds=60)


# --- refusals ------------------------------------------------------------------------------------------------------

def _ogg_page(payload: bytes) -> bytes:
    return b"OggS" + bytes(22) + bytes([1, len(payload)]) + payload


FOREIGN = {
    "AAC/MP4": b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(64),
    "AAC (ADTS)": b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(64),
    "PNG": b"\x89PNG\r\n\x1a\n" + bytes(64),
    "JPEG": b"\xff\xd8\xff\xe0" + bytes(64),
    "AIFF": b"FORM\x00\x00\x00\x40AIFFCOMM" + bytes(64),
    "Matroska/WebM": b"\x1aE\xdf\xa3" + bytes(64),
    "MIDI": b"MThd\x00\x00\x00\x06\x00\x01" + bytes(64),
    "OGG/FLAC": _ogg_page(b"\x7fFLAC\x01\x00" + bytes(20)),
    "OGG/Speex": _ogg_page(b"Speex   1.2" + bytes(20)),
    "text": b"hello, this is not audio at all\n",
    "empty": b"",
    "not in a recognised audio format": bytes(range(1, 200)),
    "RIFF file of type b'AVI '": b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(32),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_other_content_is_refused_by_name(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_file(FOREIGN[name], max_seconds=60)
    assert name in err.value.message
    assert "supported: WAV, FLAC, OGG (Vorbis, Opus), MP3" in err.value.message


def test_id3_tagged_mp3_is_detected_behind_the_tag() -> None:
    mp3 = encode_audio(music(1.0), RATE, AudioFormat.MP3)
    tag = b"ID3\x03\x00\x00" + bytes([0, 0, 0, 20]) + bytes(20)  # ID3v2.3, 20 bytes (syncsafe size)
    assert detect_format(tag + mp3) == "MP3"
    y, _ = decode_file(tag + mp3, max_seconds=60)
    assert abs(len(y) - RATE) < 1200  # the decoder may count the tag's frame; the audio is there
    assert detect_format(tag) == "an ID3 tag without audio"


def test_truncated_supported_file_names_the_format() -> None:
    flac = encode_audio(music(1.0), RATE, AudioFormat.FLAC)
    with pytest.raises(InvalidArgument, match="looks like FLAC but could not be decoded") as err:
        decode_file(flac[:60], max_seconds=60)
    assert "0x" not in err.value.message  # no object address from libsndfile's message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(list(AudioFormat)), cut=st.floats(0, 1), flips=st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=12), tail=st.binary(max_size=256))
def test_damaged_files_decode_or_are_refused_never_crash(fmt: AudioFormat, cut: float,
                                                         flips: list[tuple[float, int]], tail: bytes) -> None:
    data = bytearray(ENCODED[fmt])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    damaged = bytes(data[: int(cut * len(data))]) + tail
    try:
        samples, rate = decode_file(damaged, max_seconds=60)
    except GrymError as exc:
        assert isinstance(exc, (InvalidArgument, OutOfRange))
    else:
        assert samples.dtype == np.float32 and samples.ndim == 1 and rate > 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_or_decoded(data: bytes) -> None:
    try:
        decode_file(data, max_seconds=60)
    except GrymError as exc:
        assert isinstance(exc, (InvalidArgument, OutOfRange))
    found = detect_format(data)
    assert isinstance(found, str) and found


ENCODED = {fmt: encode_audio(music(0.5), RATE, fmt) for fmt in AudioFormat}


# --- the api layer's conversions -----------------------------------------------------------------------------------

def test_audio_input_reads_wav_and_file_alike() -> None:
    data = encode_audio(music(0.5), RATE, AudioFormat.OGG_VORBIS)
    a, ra = convert.audio_input(common_pb2.AudioInput(wav=data), max_seconds=60)
    b, rb = convert.audio_input(common_pb2.AudioInput(file=data), max_seconds=60)
    assert ra == rb == RATE and np.array_equal(a, b)
    with pytest.raises(InvalidArgument, match="init_audio.file is a PNG image"):
        convert.audio_input(common_pb2.AudioInput(file=FOREIGN["PNG"]), max_seconds=60, field="init_audio")
    with pytest.raises(InvalidArgument, match="audio is required"):
        convert.audio_input(common_pb2.AudioInput(), max_seconds=60)
    with pytest.raises(InvalidArgument, match="sample_rate_hz is required"):
        convert.audio_input(common_pb2.AudioInput(pcm=common_pb2.PcmAudio(data=b"\0" * 8)), max_seconds=60)
    with pytest.raises(InvalidArgument, match="unknown PCM encoding"):
        convert.audio_input(common_pb2.AudioInput(pcm=common_pb2.PcmAudio(data=b"\0" * 8, sample_rate_hz=8000,
                                                                          encoding=9)), max_seconds=60)


@pytest.mark.parametrize("fmt", list(AudioFormat), ids=lambda f: f.name)
def test_chunks_concatenate_to_one_file_in_the_format(fmt: AudioFormat) -> None:
    x = music(2.0)
    chunks = convert.audio_chunks(x, RATE, fmt, chunk_bytes=4096)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.format for c in chunks} == {int(fmt)} and {c.sample_rate_hz for c in chunks} == {RATE}
    y, rate = decode_file(b"".join(c.wav_data for c in chunks), max_seconds=60)
    assert rate == RATE and len(y) == len(x)
    # a service's AudioData (16-bit WAV chunks) converts to the same format
    from_service = convert.audio_data_chunks(AudioData([encode_wav(x, RATE)], RATE), fmt)
    z, _ = decode_file(b"".join(c.wav_data for c in from_service), max_seconds=60)
    assert len(z) == len(x) and from_service[-1].format == int(fmt)


def test_decodable_names_are_the_documented_inputs() -> None:
    assert DECODABLE == {"WAV", "FLAC", "OGG/Vorbis", "OGG/Opus", "MP3"}


def test_detection_edge_cases() -> None:
    flac = encode_audio(music(0.2), RATE, AudioFormat.FLAC)
    id3 = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 4]) + bytes(4)
    assert detect_format(id3 + flac) == "FLAC"  # FLAC behind an ID3 tag
    assert detect_format(b"OggS" + bytes(10)) == "a truncated OGG file"
    assert detect_format(_ogg_page(b"\x01unknown" + bytes(16))) == "an OGG file with an unknown codec"
    assert detect_format(b"\xff\xeb\x00\x00" + bytes(8)) == "not in a recognised audio format"  # reserved version
    assert detect_format(b"\xff\xfd\x90\x00" + bytes(8)) == "an MPEG Layer II stream"
    assert detect_format(b"\xff\xff\x90\x00" + bytes(8)) == "an MPEG Layer I stream"


def test_out_of_range_layouts_are_refused() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((100, 1), np.float32), 500, format="WAV")  # 500 Hz: below MIN_RATE_HZ
    with pytest.raises(InvalidArgument, match="sample rate of 500 Hz"):
        decode_file(buf.getvalue(), max_seconds=60)
    buf = io.BytesIO()
    sf.write(buf, np.zeros((10, 40), np.float32), 16_000, format="WAV", subtype="FLOAT")
    with pytest.raises(InvalidArgument, match="has 40 channels"):
        decode_file(buf.getvalue(), max_seconds=60)


def test_decoding_of_estimated_lengths_stops_at_the_limit() -> None:
    """Ogg's length is not in a header: the block loop stops the decode (at most one block past the limit)."""
    ogg = encode_audio(np.zeros(200 * 8_000, np.float32), 8_000, AudioFormat.OGG_VORBIS)
    with pytest.raises(OutOfRange, match="longer than 10 s"):
        decode_file(ogg, max_seconds=10)
    y, _ = decode_file(ogg, max_seconds=300)
    assert len(y) == 200 * 8_000
