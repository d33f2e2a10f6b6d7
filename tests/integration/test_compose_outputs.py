"""What a Compose piece carries besides its plan, through the public gRPC API of the real orchestrator (tiny profile):
section audio and the finished piece in the requested output format; music descriptions of the piece (kept with
the workflow record) and of its analysed sections; generated and composed patterns stored with their descriptors,
so that a music filter or text finds them."""

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
            timeout_s: float = 900, tags: dict[str, str] | None = None) -> list[pb.ComposeResponse]:
    req = pb.ComposeRequest(request_id=uuid.uuid4().hex, request=request, duration_seconds=seconds, max_tokens=8,
                            output_format=fmt, tags=tags or {})
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


def music_filter(music: common_pb2.MusicDescription) -> pb.MusicFilter:
    """A filter that the described audio matches (whichever descriptors the description has)."""
    if music.key:
        return pb.MusicFilter(key=music.key)
    if music.tempo_bpm > 0:
        return pb.MusicFilter(min_tempo_bpm=music.tempo_bpm - 1, max_tempo_bpm=music.tempo_bpm + 1)
    return pb.MusicFilter(tags=[music.tags[0].label])


def described(music: common_pb2.MusicDescription) -> bool:
    """A summary description with something in it (tiny-profile audio is noise-like: tags or tempo or key)."""
    return "librosa" in music.models and (music.tempo_bpm > 0 or bool(music.key) or bool(music.tags)) \
        and not music.notes and not music.beats_seconds


def test_compose_says_what_the_piece_and_its_sections_are(client: Client) -> None:
    suite = uuid.uuid4().hex
    events = compose(client, "ambient drone with soft rain, 2 steps", SECONDS, tags={"suite": suite})
    summary = events[-1].summary
    assert summary.state == pb.Workflow.STATE_SUCCEEDED, summary.error
    assert summary.HasField("music") and described(summary.music), summary.music
    features = [e.features for e in events if e.WhichOneof("event") == "features"]
    assert features and all(f.HasField("music") and described(f.music) for f in features)
    again = client.stub.GetWorkflow(pb.GetWorkflowRequest(workflow_id=events[-1].workflow_id), timeout=30).workflow
    assert again.music == summary.music
    # The patterns the analyze -> store steps kept carry the step's description, so a music filter finds them.
    assert summary.pattern_ids
    for pid in summary.pattern_ids:
        pattern = client.stub.GetPattern(pb.GetPatternRequest(pattern_id=pid), timeout=60).pattern
        assert pattern.HasField("music") and "librosa" in pattern.music.models
        found = client.stub.ListPatterns(pb.ListPatternsRequest(
            tag_filter={"suite": suite}, music_filter=music_filter(pattern.music)), timeout=60)
        assert pid in {p.pattern_id for p in found.patterns}


def test_generated_patterns_are_stored_with_their_music(client: Client) -> None:
    suite = uuid.uuid4().hex
    events = list(client.stub.Generate(pb.GenerateRequest(prompt="warm pad", duration_seconds=2.0, steps=2, seed=9,
                                                          store=True, tags={"suite": suite}), timeout=300))
    result = [e.result for e in events if e.WhichOneof("event") == "result"][-1]
    assert result.pattern_id and described(result.music)
    pattern = client.stub.GetPattern(pb.GetPatternRequest(pattern_id=result.pattern_id), timeout=60).pattern
    assert pattern.music.key == result.music.key
    assert pattern.music.tempo_bpm == pytest.approx(result.music.tempo_bpm)
    listed = client.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={"suite": suite},
                                                             music_filter=music_filter(result.music)), timeout=60)
    assert [p.pattern_id for p in listed.patterns] == [result.pattern_id]
    if result.music.tags:  # words of its music tags find it by text
        hits = client.stub.SearchPatterns(pb.SearchPatternsRequest(text=result.music.tags[0].label, top_k=50,
                                                                   tag_filter={"suite": suite}), timeout=60)
        assert result.pattern_id in {m.pattern.pattern_id for m in hits.matches}
