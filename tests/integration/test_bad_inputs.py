"""Every malformed or oversized request gets the right status with an actionable message, the server keeps
serving, and the pattern store is unchanged."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from conftest import MAX_AUDIO_SECONDS, MAX_MESSAGE_BYTES
from grym import Client
from grym.v1 import common_pb2, orchestrator_pb2 as pb
from support import tone, wav_bytes

C = grpc.StatusCode
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"  # a well-formed pattern id that no pattern has


def pcm(samples: np.ndarray, rate: int = 16_000, channels: int = 1, enc: int = 1) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(pcm=common_pb2.PcmAudio(data=np.asarray(samples, "<f4").tobytes(),
                                                         sample_rate_hz=rate, channels=channels, encoding=enc))


def wav_with_nan() -> bytes:
    x = tone(0.5)
    x[100] = np.nan
    return wav_bytes(x, 16_000, "FLOAT")


def truncated_wav() -> bytes:
    return wav_bytes(tone(0.5), 16_000)[:30]


@dataclass
class Case:
    name: str
    call: Callable[[Client], object]
    code: grpc.StatusCode
    says: str  # a fragment the message must contain, so the user knows what to fix


def analyze(**kw: object) -> Callable[[Client], object]:
    return lambda c: c.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(**kw), timeout=30)


def search(**kw: object) -> Callable[[Client], object]:
    return lambda c: c.stub.SearchPatterns(pb.SearchPatternsRequest(**kw), timeout=30)


def stream(*msgs: pb.StreamAnalyzeRequest) -> Callable[[Client], object]:
    return lambda c: list(c.stub.StreamAnalyze(iter(msgs), timeout=30))


CFG = pb.StreamAnalyzeRequest(config=pb.StreamAnalyzeConfig(sample_rate_hz=16_000))

CASES = [
    Case("no audio", analyze(), C.INVALID_ARGUMENT, "audio is required"),
    Case("empty wav bytes", analyze(audio=common_pb2.AudioInput(wav=b"")), C.INVALID_ARGUMENT, "audio.wav is empty"),
    Case("not audio", analyze(audio=common_pb2.AudioInput(wav=b"ID3\x03 this is an mp3")), C.INVALID_ARGUMENT,
         "supported: WAV, FLAC"),
    Case("truncated wav", analyze(audio=common_pb2.AudioInput(wav=truncated_wav())), C.INVALID_ARGUMENT, "wav"),
    Case("empty pcm", analyze(audio=pcm(np.zeros(0))), C.INVALID_ARGUMENT, "empty"),
    Case("NaN sample (pcm)", analyze(audio=pcm(np.array([0.1, np.nan] * 1000))), C.INVALID_ARGUMENT, "NaN"),
    Case("Inf sample (pcm)", analyze(audio=pcm(np.array([0.1, np.inf] * 1000))), C.INVALID_ARGUMENT, "infinite"),
    Case("NaN sample (wav)", analyze(audio=common_pb2.AudioInput(wav=wav_with_nan())), C.INVALID_ARGUMENT, "NaN"),
    Case("too short", analyze(audio=pcm(tone(0.01))), C.INVALID_ARGUMENT, "at least 400"),
    Case("too long", analyze(audio=pcm(tone(MAX_AUDIO_SECONDS + 1, 8_000), rate=8_000)), C.OUT_OF_RANGE,
         "StreamAnalyze"),
    Case("message over the size limit", analyze(audio=pcm(np.zeros(MAX_MESSAGE_BYTES // 4 + 1000))),
         C.RESOURCE_EXHAUSTED, ""),
    Case("missing sample rate", analyze(audio=pcm(tone(0.5), rate=0)), C.INVALID_ARGUMENT, "sample_rate_hz"),
    Case("absurd sample rate", analyze(audio=pcm(tone(0.5), rate=10_000_000)), C.INVALID_ARGUMENT, "sample rate"),
    Case("pcm bytes not whole samples", analyze(audio=common_pb2.AudioInput(pcm=common_pb2.PcmAudio(
        data=b"\x00" * 4001, sample_rate_hz=16_000))), C.INVALID_ARGUMENT, "multiple of"),
    Case("too many channels", analyze(audio=pcm(tone(0.5), channels=64)), C.INVALID_ARGUMENT, "channels"),
    Case("unknown encoding", analyze(audio=pcm(tone(0.5), enc=9)), C.INVALID_ARGUMENT, "encoding"),
    Case("bad tag key", analyze(audio=pcm(tone(0.5)), store=True, tags={"bad key!": "x"}), C.INVALID_ARGUMENT,
         "key"),
    Case("too many tags", analyze(audio=pcm(tone(0.5)), store=True, tags={f"k{i}": "v" for i in range(40)}),
         C.INVALID_ARGUMENT, "at most 32"),
    Case("bad request id", analyze(request_id="has space", audio=pcm(tone(0.5))), C.INVALID_ARGUMENT,
         "request_id"),
    Case("search without query", search(), C.INVALID_ARGUMENT, "query is required"),
    Case("search vector of wrong dimension", search(embedding=common_pb2.Embedding(values=[0.1] * 7)),
         C.INVALID_ARGUMENT, "dimensions"),
    Case("search vector with NaN", search(embedding=common_pb2.Embedding(values=[float("nan")] * 32)),
         C.INVALID_ARGUMENT, "NaN"),
    Case("search zero vector", search(embedding=common_pb2.Embedding(values=[0.0] * 32)), C.INVALID_ARGUMENT,
         "zeros"),
    Case("search unknown pattern", search(pattern_id="00000000-0000-0000-0000-000000000000"), C.NOT_FOUND,
         "does not exist"),
    Case("search top_k too large", search(embedding=common_pb2.Embedding(values=[0.1] * 32), top_k=1000),
         C.INVALID_ARGUMENT, "top_k"),
    Case("get unknown pattern", lambda c: c.stub.GetPattern(pb.GetPatternRequest(pattern_id=UNKNOWN_ID)), C.NOT_FOUND,
         "does not exist"),
    Case("get malformed pattern id", lambda c: c.stub.GetPattern(pb.GetPatternRequest(pattern_id="nope")),
         C.INVALID_ARGUMENT, "a UUID"),
    Case("get without id", lambda c: c.stub.GetPattern(pb.GetPatternRequest()), C.INVALID_ARGUMENT, "required"),
    Case("delete unknown pattern", lambda c: c.stub.DeletePattern(pb.DeletePatternRequest(pattern_id=UNKNOWN_ID)),
         C.NOT_FOUND, "does not exist"),
    Case("list page_size too large", lambda c: c.stub.ListPatterns(pb.ListPatternsRequest(page_size=5000)),
         C.INVALID_ARGUMENT, "page_size"),
    Case("list forged page token", lambda c: c.stub.ListPatterns(pb.ListPatternsRequest(
        page_token=base64.urlsafe_b64encode(json.dumps({"o": 1, "f": "x"}).encode()).decode())),
         C.INVALID_ARGUMENT, "page_token"),
    Case("list garbage page token", lambda c: c.stub.ListPatterns(pb.ListPatternsRequest(page_token="%%%")),
         C.INVALID_ARGUMENT, "page_token"),
    Case("stream without config", stream(pb.StreamAnalyzeRequest(audio_content=b"\x00" * 64)), C.INVALID_ARGUMENT,
         "config"),
    Case("stream with two configs", stream(CFG, CFG), C.INVALID_ARGUMENT, "only the first"),
    Case("stream with no audio", stream(CFG), C.INVALID_ARGUMENT, "no audio"),
    Case("stream with NaN chunk", stream(CFG, pb.StreamAnalyzeRequest(
        audio_content=struct.pack("<4f", 0.1, float("nan"), 0.1, 0.1))), C.INVALID_ARGUMENT, "NaN"),
    Case("stream config without rate", stream(pb.StreamAnalyzeRequest(config=pb.StreamAnalyzeConfig())),
         C.INVALID_ARGUMENT, "sample_rate_hz"),
]


@pytest.fixture(scope="module")
def baseline(client: Client) -> list[str]:
    client.analyze(tone(0.5, seed=77), sample_rate_hz=16_000, store=True, tags={"test": "bad-inputs"})
    return sorted(p.pattern_id for p in client.list_patterns(page_size=1000))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(client: Client, baseline: list[str], case: Case) -> None:
    with pytest.raises(grpc.RpcError) as err:
        case.call(client)
    assert err.value.code() == case.code, err.value.details()
    assert case.says.lower() in (err.value.details() or "").lower(), err.value.details()


def test_server_still_serving_and_store_unchanged(client: Client, baseline: list[str]) -> None:
    """Runs after the table (same module, declared later): nothing was written or lost."""
    assert client.health() == "SERVING"
    assert sorted(p.pattern_id for p in client.list_patterns(page_size=1000)) == baseline
    assert client.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
