"""Long pieces through the public API on the real server (tiny profile): 90 s and 4 min pieces at the requested
length and loudness, section audio streamed before the summary with whole-piece progress, cancel mid-piece, a
30 s / 25-step Generate, and hostile durations."""

from __future__ import annotations

import io
import math
import time
import uuid

import grpc
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings, strategies as st

from grym import Client
from grym.v1 import orchestrator_pb2 as pb
from grym_synth.compose.mastering import true_peak_db
from grym_synth.inference.triton_process import EmbeddedTriton

RATE = 16_000
TARGET_LUFS = -14.0


def compose(client: Client, request: str, seconds: float, *, tags: dict[str, str] | None = None,
            timeout_s: float = 1200) -> list[pb.ComposeResponse]:
    req = pb.ComposeRequest(request_id=uuid.uuid4().hex, request=request, duration_seconds=seconds, max_tokens=8,
                            tags=tags or {})
    return list(client.stub.Compose(req, timeout=timeout_s))


def decode(data: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="float64")
    assert rate == RATE
    return samples


def piece_audio(events: list[pb.ComposeResponse]) -> bytes:
    return b"".join(e.audio.wav_data for e in events if e.WhichOneof("event") == "audio")


def check_piece(events: list[pb.ComposeResponse], seconds: float) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    summary = events[-1].summary
    assert kinds[-1] == "summary" and summary.state == pb.Workflow.STATE_SUCCEEDED, summary.error
    assert summary.audio_seconds == pytest.approx(seconds, abs=0.1)
    piece = decode(piece_audio(events))
    assert abs(len(piece) / RATE - seconds) <= 0.1
    assert pyloudnorm.Meter(RATE).integrated_loudness(piece) == pytest.approx(TARGET_LUFS, abs=1.0)
    assert true_peak_db(piece, RATE) <= -1.0 + 0.1  # 16-bit rounding of the WAV

    sections = [e.section_audio for e in events if e.WhichOneof("event") == "section_audio"]
    indices = [s.section_index for s in sections]  # a section over 60 s comes in parts with the same index
    assert indices == sorted(indices) and sorted(set(indices)) == list(range(indices[-1] + 1)) and indices[-1] >= 1
    assert sections[0].start_seconds == 0 and sections[-1].end_seconds == pytest.approx(seconds, abs=1e-6)
    for a, b in zip(sections, sections[1:]):
        assert a.end_seconds == b.start_seconds, "sections tile the piece"
    for s in sections:
        assert len(decode(s.data)) / RATE == pytest.approx(s.end_seconds - s.start_seconds, abs=1e-3)
    first_audio = kinds.index("audio")
    section_positions = [i for i, k in enumerate(kinds) if k == "section_audio"]
    assert max(section_positions) < first_audio, "every section is streamed before the piece"
    # The first section arrives while windows of later sections are still rendering.
    assert section_positions[0] < max(i for i, k in enumerate(kinds) if k == "step")
    # Its windows (s1-w*) render first and alone (time to first audio = the first section's generation time): no
    # later window makes denoising progress before every one of them has finished.
    steps = [(i, e.step) for i, e in enumerate(events) if e.WhichOneof("event") == "step"]
    lead_done = max(i for i, s in steps if s.step_id.startswith("s1-") and s.state == pb.ComposeStep.STATE_FINISHED)
    later_started = [i for i, s in steps if s.step_type == "generate" and not s.step_id.startswith("s1-")
                     and s.state == pb.ComposeStep.STATE_PROGRESS]
    assert later_started and min(later_started) > lead_done

    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    done = [p.done for p in progress]
    assert done == sorted(done) and done[-1] == progress[-1].total and len(set(p.total for p in progress)) == 1
    assert progress[-1].elapsed_seconds > 0


@pytest.mark.timeout(1200)
def test_90_second_piece_with_sections(client: Client) -> None:
    events = compose(client, "90 second ambient piece, rain, slow build, 2 steps", 0)
    check_piece(events, 90.0)
    plan = next(e.plan for e in events if e.WhichOneof("event") == "plan")
    names = list(dict.fromkeys(s.section_audio.name for s in events if s.WhichOneof("event") == "section_audio"))
    assert names == ["intro", "build", "climax", "outro"] and '"curve": "rise"' in plan.plan_json


@pytest.mark.timeout(1800)
def test_four_minute_piece(client: Client) -> None:
    events = compose(client, "calm piano piece, fade out, 1 step", 240.0)
    check_piece(events, 240.0)
    parts = [e.section_audio for e in events if e.WhichOneof("event") == "section_audio"]
    assert max(p.end_seconds - p.start_seconds for p in parts) <= 60.0 + 1e-6, "long sections come in parts"


def unet_count(triton: EmbeddedTriton) -> int:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        stats = c.get_inference_statistics("unet", as_json=True)["model_stats"]
    return int(stats[0]["inference_stats"]["success"]["count"])


def test_cancel_mid_piece_stops_the_unet_and_stores_nothing(client: Client, triton: EmbeddedTriton) -> None:
    tag = uuid.uuid4().hex[:12]
    req = pb.ComposeRequest(request_id=uuid.uuid4().hex, request="60 second drone, 20 steps", max_tokens=8,
                            tags={"cancel_test": tag})
    call = client.stub.Compose(req, timeout=600)
    workflow_id = ""
    for event in call:
        workflow_id = event.workflow_id
        if event.WhichOneof("event") == "progress" and event.progress.done >= 2:
            break
    call.cancel()
    deadline = time.monotonic() + 30
    state = None
    while time.monotonic() < deadline:
        state = client.get_workflow(workflow_id).state
        if state == pb.Workflow.STATE_CANCELLED:
            break
        time.sleep(0.2)
    assert state == pb.Workflow.STATE_CANCELLED
    # Every window's generation stops within a step: the UNet goes idle (no new execution for 3 s), soon — the
    # bound allows for the step already queued on a loaded machine.
    idle_by = time.monotonic() + 60
    before = unet_count(triton)
    while True:
        time.sleep(3.0)
        now = unet_count(triton)
        if now == before:
            break
        assert time.monotonic() < idle_by, "the UNet kept working after the piece was cancelled"
        before = now
    record = client.get_workflow(workflow_id)
    assert not record.pattern_ids
    assert not list(client.list_patterns(tag_filter={"cancel_test": tag})), "nothing of the piece was stored"


@pytest.mark.timeout(1800)  # 30 s of audio x 25 steps: about 3 minutes of CPU with the tiny profile
def test_30_second_25_step_generate_succeeds_without_tripping_a_breaker(client: Client) -> None:
    events = list(client.generate("slow ambient pad", seconds=30, steps=25, seed=5, timeout_s=1200))
    result = events[-1].result
    assert result.duration_seconds == pytest.approx(30.0)
    # The breaker still lets a generation through at once (long work is no downstream failure).
    quick = list(client.generate("short blip", seconds=0.5, steps=1, seed=6, timeout_s=120))
    assert quick[-1].result.duration_seconds == pytest.approx(0.5)
    assert client.health("generation") == "SERVING"


HOSTILE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e9, 600.001, 0.49, -0.0001, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not (x == 0 or 0.5 <= x <= 600)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seconds=HOSTILE)
def test_hostile_durations_are_invalid_argument(client: Client, seconds: float) -> None:
    req = pb.ComposeRequest(request="ambient", duration_seconds=seconds)
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Compose(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duration_seconds must be 0.5 to 600" in info.value.details()
