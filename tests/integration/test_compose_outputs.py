"""What a Compose piece carries besides its plan, through the public gRPC API of the real orchestrator (tiny profile):
section audio and the finished piece in the requested output format."""

from __future__ import annotations

import io
import uuid

import pytest
import soundfile as sf

from grym import Client
from grym.v1 import common_pb2, orchestrator_pb2 as pb

SECONDS = 15.0  # over one model window: a piece of two or more sections
FORMATS = {common_pb2.AUDIO_FORMAT_FLAC: "FLAC", common_pb2.AUDIO_FORMAT_MP3: "MP3"}


def compose(client: Client, request: str, seconds: float, fmt: int = common_pb2.AUDIO_FORMAT_UNSPECIFIED,
            timeout_s: float = 900) -> list[pb.ComposeResponse]:
    req = pb.ComposeRequest(request_id=uuid.uuid4().hex, request=request, duration_seconds=seconds, max_tokens=8,
                            output_format=fmt)
    return list(client.stub.Compose(req, timeout=timeout_s))


def decode(data: bytes, container: str) -> tuple[int, int]:
    """(frames, rate) of a complete file, checking that it is the container asked for."""
    info = sf.info(io.BytesIO(data))
    assert info.format == container, info
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return len(samples), rate


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS.values()))
def test_sections_and_piece_in_the_requested_format(client: Client, fmt: int) -> None:
    events = compose(client, "ambient drone with soft rain, 2 steps", SECONDS, fmt)
    summary = events[-1].summary
    assert events[-1].WhichOneof("event") == "summary" and summary.state == pb.Workflow.STATE_SUCCEEDED, summary.error
    container = FORMATS[fmt]
    sections = [e.section_audio for e in events if e.WhichOneof("event") == "section_audio"]
    assert len(sections) >= 2
    for s in sections:
        assert s.format == fmt
        frames, rate = decode(s.data, container)
        assert rate == s.sample_rate_hz
        assert frames / rate == pytest.approx(s.end_seconds - s.start_seconds, abs=0.1)
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    assert chunks and chunks[-1].last and {c.format for c in chunks} == {fmt}
    frames, rate = decode(b"".join(c.wav_data for c in chunks), container)
    assert rate == chunks[0].sample_rate_hz
    assert abs(frames / rate - SECONDS) <= 0.1
