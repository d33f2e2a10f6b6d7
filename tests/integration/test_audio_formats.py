"""Audio in any common format, out in the chosen one, through the public gRPC API of the real orchestrator (the
client package's stubs, the session's orchestrator and Triton).

Tolerances (stated here, measured on the session's tiny wav2vec2 profile with seeded weights):
- AnalyzeAudio: every input format gives the same number of frames as the WAV; the embedding's cosine
  similarity to the WAV one is > 0.9999 for lossless formats (FLAC, 24-bit WAV) and > 0.99 for lossy codecs
  (Vorbis, MP3, Opus).
- Generate: every output format decodes to the requested duration (exactly, at the chunk's stated rate) and
  correlates with the same seed's 16-bit WAV at > 0.999 (lossless) or > 0.95 (lossy; Opus keeps no exact phase).
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings, strategies as st

from grym import Client
from grym.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.core.audio import AudioFormat, decode_file, encode_audio
from support import tone

C = grpc.StatusCode
LOSSLESS = {AudioFormat.WAV_PCM16, AudioFormat.WAV_PCM24, AudioFormat.FLAC}
RATE_IN = 22_050  # not the model's rate, and stereo: every input is resampled and mixed down


def _input(fmt: AudioFormat) -> bytes:
    x = tone(2.0, rate=RATE_IN, channels=2, seed=5)
    return encode_audio(x, RATE_IN, fmt)


def _analyze(client: Client, audio: common_pb2.AudioInput) -> pb.AnalyzeAudioResponse:
    return client.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(audio=audio), timeout=60)


def _cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture(scope="module")
def wav_reference(client: Client) -> pb.AnalyzeAudioResponse:
    return _analyze(client, common_pb2.AudioInput(file=_input(AudioFormat.WAV_PCM16)))


@pytest.mark.parametrize("fmt", list(AudioFormat), ids=lambda f: f.name)
@pytest.mark.parametrize("field", ["file", "wav"])
def test_analyze_accepts_every_input_format(client: Client, wav_reference: pb.AnalyzeAudioResponse,
                                            fmt: AudioFormat, field: str) -> None:
    got = _analyze(client, common_pb2.AudioInput(**{field: _input(fmt)}))
    assert got.frames == wav_reference.frames
    assert abs(got.duration_seconds - wav_reference.duration_seconds) < 1e-3
    bound = 0.9999 if fmt in LOSSLESS else 0.99
    assert _cosine(got.embedding, wav_reference.embedding) > bound


@pytest.fixture(scope="module")
def generated_wav(client: Client) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(_generate(client, common_pb2.AUDIO_FORMAT_UNSPECIFIED)[0]), dtype="float32")
    assert rate == 16_000
    return samples


def _generate(client: Client, fmt: int, seconds: float = 1.5) -> tuple[bytes, list[pb.AudioChunk]]:
    events = list(client.stub.Generate(pb.GenerateRequest(prompt="soft rain on a tin roof", duration_seconds=seconds,
                                                          steps=2, seed=77, output_format=fmt), timeout=120))
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    assert events[-1].WhichOneof("event") == "result"
    return b"".join(c.wav_data for c in chunks), chunks


@pytest.mark.parametrize("fmt", list(AudioFormat), ids=lambda f: f.name)
def test_generate_returns_the_chosen_output_format(client: Client, generated_wav: np.ndarray,
                                                   fmt: AudioFormat) -> None:
    data, chunks = _generate(client, int(fmt))
    assert {c.format for c in chunks} == {int(fmt)} and chunks[-1].last
    samples, rate = decode_file(data, max_seconds=60)
    assert rate == chunks[0].sample_rate_hz == 16_000
    assert len(samples) == round(1.5 * 16_000)
    bound = 0.999 if fmt in LOSSLESS else 0.95
    assert np.corrcoef(samples, generated_wav)[0, 1] > bound


def test_unset_output_format_is_16_bit_wav(client: Client) -> None:
    data, chunks = _generate(client, common_pb2.AUDIO_FORMAT_UNSPECIFIED, seconds=0.5)
    assert data[:4] == b"RIFF" and sf.info(io.BytesIO(data)).subtype == "PCM_16"
    assert {c.format for c in chunks} == {common_pb2.AUDIO_FORMAT_WAV_PCM16}


def test_compose_returns_the_chosen_output_format(client: Client) -> None:
    req = pb.ComposeRequest(request="2 second calm piano", max_tokens=8, seed=1,
                            output_format=common_pb2.AUDIO_FORMAT_OGG_VORBIS)
    events = list(client.stub.Compose(req, timeout=300))
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    assert chunks and {c.format for c in chunks} == {common_pb2.AUDIO_FORMAT_OGG_VORBIS}
    samples, rate = decode_file(b"".join(c.wav_data for c in chunks), max_seconds=600)
    assert rate == chunks[0].sample_rate_hz and len(samples) > 0


@pytest.mark.parametrize("data, says", [
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "is a PNG image"),
    (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(200), "is an AAC/MP4 (M4A) file"),
    (b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(200), "is an AAC (ADTS) stream"),
    (bytes(np.random.default_rng(3).integers(1, 256, 3000, dtype=np.uint8)), "not in a recognised audio format"),
    (b"", "audio.file is empty"),
])
def test_other_content_is_refused_naming_the_format(client: Client, data: bytes, says: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _analyze(client, common_pb2.AudioInput(file=data))
    assert err.value.code() == C.INVALID_ARGUMENT
    assert says in err.value.details() and "supported: WAV, FLAC, OGG (Vorbis, Opus), MP3" in err.value.details()


def test_unknown_output_format_is_invalid_argument(client: Client) -> None:
    for call, req in (("Generate", pb.GenerateRequest(prompt="x", duration_seconds=0.5, steps=1, output_format=42)),
                      ("Compose", pb.ComposeRequest(request="2 second piano", output_format=42))):
        with pytest.raises(grpc.RpcError) as err:
            list(getattr(client.stub, call)(req, timeout=60))
        assert err.value.code() == C.INVALID_ARGUMENT, call
        assert "output_format 42 is not a known AudioFormat" in err.value.details()


ENCODED = {fmt: encode_audio(tone(0.6, seed=9), 16_000, fmt) for fmt in AudioFormat}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(fmt=st.sampled_from(list(AudioFormat)), cut=st.floats(0, 1), flips=st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8), tail=st.binary(max_size=128),
    field=st.sampled_from(["file", "wav"]))
def test_damaged_or_random_files_never_fail_inside_the_server(client: Client, fmt: AudioFormat, cut: float,
                                                             flips: list[tuple[float, int]], tail: bytes,
                                                             field: str) -> None:
    data = bytearray(ENCODED[fmt])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    damaged = bytes(data[: int(cut * len(data))]) + tail
    try:
        _analyze(client, common_pb2.AudioInput(**{field: damaged}))
    except grpc.RpcError as err:
        assert err.code() in (C.INVALID_ARGUMENT, C.OUT_OF_RANGE), (err.code(), err.details())


KNOWN_FORMATS = set(common_pb2.AudioFormat.values())


@pytest.fixture(scope="module")
def stored_with_audio(client: Client) -> tuple[str, bytes]:
    """A pattern with stored audio, and its bytes as GetPatternAudio returns them in WAV."""
    pattern_id = client.analyze(tone(0.6, seed=4), sample_rate_hz=16_000, store=True).pattern_id
    chunks = list(client.stub.GetPatternAudio(pb.GetPatternAudioRequest(pattern_id=pattern_id), timeout=60))
    return pattern_id, b"".join(c.audio.wav_data for c in chunks)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(value=st.integers(-2**31, 2**31 - 1).filter(lambda v: v not in KNOWN_FORMATS))
def test_any_unknown_format_number_is_refused_before_any_work(client: Client, stored_with_audio: tuple[str, bytes],
                                                              value: int) -> None:
    """proto3 enums are open: every number a client can put in output_format/format that the API does not define
    is INVALID_ARGUMENT naming the field, on every RPC that returns audio, and the stored audio is untouched."""
    pattern_id, wav = stored_with_audio
    calls = (("Generate", pb.GenerateRequest(prompt="x", duration_seconds=0.5, steps=1, output_format=value),
              "output_format"),
             ("Compose", pb.ComposeRequest(request="2 second piano", output_format=value), "output_format"),
             ("GetPatternAudio", pb.GetPatternAudioRequest(pattern_id=pattern_id, format=value), "format"))
    for call, req, field in calls:
        with pytest.raises(grpc.RpcError) as err:
            list(getattr(client.stub, call)(req, timeout=60))
        assert err.value.code() == C.INVALID_ARGUMENT, (call, value, err.value.details())
        assert f"{field} {value} is not a known AudioFormat" in err.value.details()
    again = list(client.stub.GetPatternAudio(pb.GetPatternAudioRequest(pattern_id=pattern_id), timeout=60))
    assert b"".join(c.audio.wav_data for c in again) == wav
