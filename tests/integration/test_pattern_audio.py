"""Stored pattern audio and audio-to-audio through the public gRPC API (the shared orchestrator, tiny profile).

Generate / AnalyzeAudio / StreamAnalyze with ``store`` keep the pattern's audio (content-addressed under
``<data_dir>/audio``); ``GetPatternAudio`` streams the stored bytes (their SHA-256 is ``Pattern.audio_sha256``);
Generate varies and continues a stored pattern (``init_pattern_id``) or uploaded audio (``init_audio``); every bad
value is refused with a status a user can act on, never INTERNAL."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid

import grpc
import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc.aio as ta
from hypothesis import HealthCheck, given, settings, strategies as st

from grym import AsyncClient, Client, wav_from_events
from grym.v1 import common_pb2, orchestrator_pb2 as pb

PROMPT = "soft marimba loop"
RATE = 16_000
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def clip(seconds: float = 0.5, freq: float = 330.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-2 * t)).astype(np.float32)


def generate(client: Client, **fields) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(**({"prompt": PROMPT, "steps": 3, "seed": 7} | fields))
    return list(client.stub.Generate(request, timeout=120))


def audio_of(events) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(wav_from_events(events)), dtype="float32")
    assert rate == RATE
    return samples


def pattern_audio(client: Client, pattern_id: str, **fields) -> bytes:
    responses = list(client.stub.GetPatternAudio(pb.GetPatternAudioRequest(pattern_id=pattern_id, **fields),
                                                 timeout=60))
    chunks = [r.audio for r in responses]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks))) and chunks[-1].last
    assert {c.sample_rate_hz for c in chunks} == {RATE}
    return b"".join(c.wav_data for c in chunks)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        list(call()) if callable(call) else None
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def generated(client: Client) -> tuple[str, bytes]:
    """A stored generated pattern: (pattern id, the WAV Generate returned)."""
    events = generate(client, duration_seconds=0.5, store=True, tags={"kind": "a2a"})
    return events[-1].result.pattern_id, wav_from_events(events)


# --- stored audio ---------------------------------------------------------------------------------------------------
def test_generated_pattern_audio_is_stored_and_retrievable(client: Client, generated, orchestrator) -> None:
    pattern_id, returned = generated
    pattern = client.get_pattern(pattern_id)
    assert pattern.has_audio and pattern.audio_sha256 == hashlib.sha256(returned).hexdigest()
    data = pattern_audio(client, pattern_id)
    assert data == returned and hashlib.sha256(data).hexdigest() == pattern.audio_sha256
    sha = pattern.audio_sha256
    assert (orchestrator.data_dir / "audio" / sha[:2] / f"{sha}.wav").read_bytes() == data


def test_analyzed_and_streamed_patterns_keep_their_16k_mono_audio(client: Client) -> None:
    t = np.arange(int(1.0 * 44_100)) / 44_100
    stereo_44k = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, stereo_44k, 44_100, format="WAV", subtype="PCM_16")
    analysis = client.analyze(buf.getvalue(), store=True)
    pattern = client.get_pattern(analysis.pattern_id)
    assert pattern.has_audio
    stored, rate = sf.read(io.BytesIO(pattern_audio(client, pattern.pattern_id)), dtype="float32")
    assert rate == RATE and stored.ndim == 1 and abs(len(stored) - RATE) <= 1  # decoded, mono, 16 kHz
    spectrum = np.abs(np.fft.rfft(stored))
    assert abs(np.argmax(spectrum) * RATE / len(stored) - 440) < 3

    summary = [r for r in client.stream_analyze(clip(1.5), RATE, store=True) if r.is_final][-1]
    streamed = client.get_pattern(summary.pattern_id)
    assert streamed.has_audio
    samples, _ = sf.read(io.BytesIO(pattern_audio(client, streamed.pattern_id)), dtype="float32")
    assert len(samples) == int(1.5 * RATE) and np.max(np.abs(samples - clip(1.5))) < 1e-3


def test_delete_removes_the_audio_only_with_its_last_pattern(client: Client, orchestrator) -> None:
    data = wav_bytes(clip(0.75, 523.0))
    first, second = (client.analyze(data, store=True).pattern_id for _ in range(2))
    sha = client.get_pattern(first).audio_sha256
    assert sha == client.get_pattern(second).audio_sha256  # deduplicated
    path = orchestrator.data_dir / "audio" / sha[:2] / f"{sha}.wav"
    client.delete_pattern(first)
    assert path.exists()
    client.delete_pattern(second)
    assert not path.exists()


def test_lost_or_corrupt_audio_is_data_loss(client: Client, orchestrator) -> None:
    pattern_id = client.analyze(wav_bytes(clip(0.5, 610.0)), store=True).pattern_id
    sha = client.get_pattern(pattern_id).audio_sha256
    path = orchestrator.data_dir / "audio" / sha[:2] / f"{sha}.wav"
    good = path.read_bytes()
    path.write_bytes(good[:-10] + b"\x00" * 10)
    code, details = status_of(lambda: client.stub.GetPatternAudio(pb.GetPatternAudioRequest(pattern_id=pattern_id)))
    assert code == grpc.StatusCode.DATA_LOSS and "corrupt" in details
    code, details = status_of(lambda: client.stub.Generate(pb.GenerateRequest(
        prompt=PROMPT, steps=1, init_pattern_id=pattern_id)))
    assert code == grpc.StatusCode.DATA_LOSS
    os.remove(path)
    code, details = status_of(lambda: client.stub.GetPatternAudio(pb.GetPatternAudioRequest(pattern_id=pattern_id)))
    assert code == grpc.StatusCode.DATA_LOSS and "missing" in details
    path.write_bytes(good)
    assert pattern_audio(client, pattern_id) == good


def test_get_pattern_audio_refusals(client: Client) -> None:
    cases = [
        (pb.GetPatternAudioRequest(pattern_id=""), grpc.StatusCode.INVALID_ARGUMENT, "pattern_id is required"),
        (pb.GetPatternAudioRequest(pattern_id="x' or 1=1"), grpc.StatusCode.INVALID_ARGUMENT, "pattern id"),
        (pb.GetPatternAudioRequest(pattern_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ]
    for request, code, says in cases:
        got, details = status_of(lambda: client.stub.GetPatternAudio(request))
        assert got == code and says in details, (request, got, details)


# --- audio-to-audio through Generate ---------------------------------------------------------------------------------
def test_vary_a_stored_pattern(client: Client, generated) -> None:
    pattern_id, _ = generated
    events = generate(client, mode=pb.GenerateRequest.MODE_VARY, init_pattern_id=pattern_id, init_strength=0.5,
                      steps=4, store=True)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("progress") == 2 and kinds[-1] == "result"  # int(4 x 0.5) steps from the noised init
    result = events[-1].result
    assert result.duration_seconds == pytest.approx(0.5, abs=0.01)  # duration 0: the init's length
    meta = dict(client.get_pattern(result.pattern_id).metadata)
    assert meta["mode"] == "vary" and meta["init_pattern_id"] == pattern_id and meta["init_strength"] == "0.5"


def test_vary_at_strength_one_is_the_text_generation(client: Client) -> None:
    text = generate(client, duration_seconds=0.5, seed=21)
    varied = generate(client, duration_seconds=0.5, seed=21, init_audio=common_pb2.AudioInput(wav=wav_bytes(clip())),
                      init_strength=1.0)
    np.testing.assert_array_equal(audio_of(varied), audio_of(text))


def test_continue_a_stored_pattern_starts_where_it_ends(client: Client, generated) -> None:
    pattern_id, _ = generated
    events = generate(client, mode=pb.GenerateRequest.MODE_CONTINUE, init_pattern_id=pattern_id,
                      duration_seconds=0.512, steps=3)
    audio = audio_of(events)
    assert len(audio) == int(0.512 * RATE) and np.isfinite(audio).all() and np.abs(audio).max() > 0
    code, details = status_of(lambda: client.stub.Generate(pb.GenerateRequest(
        prompt=PROMPT, steps=1, mode=pb.GenerateRequest.MODE_CONTINUE, init_pattern_id=pattern_id,
        duration_seconds=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "continuation" in details


def test_compose_varies_a_recalled_pattern_from_its_stored_audio(client: Client, generated) -> None:
    """'like pattern X' (the rule planner's recall -> vary): the vary step starts from X's stored audio."""
    import json

    pattern_id, _ = generated
    # A token budget too small for any answer: the rule planner (the constrained coordinator writes sections of
    # generate steps only, no vary step; docs/coordinator.md).
    events = list(client.compose(f"1 second piece like pattern {pattern_id}", seed=5, max_tokens=8))
    assert events[-1].summary.state == pb.Workflow.STATE_SUCCEEDED
    vary = [e.step for e in events if e.WhichOneof("event") == "step" and e.step.step_type == "vary"
            and e.step.state == pb.ComposeStep.STATE_FINISHED]
    assert vary, "the plan has no vary step"
    assert json.loads(vary[0].summary_json)["init_pattern_id"] == pattern_id
    stored = [client.get_pattern(p) for p in events[-1].summary.pattern_ids]
    assert stored and all(p.has_audio for p in stored)  # Compose's store steps keep their audio


def test_compose_continues_a_recalled_pattern_from_its_stored_audio(client: Client, generated) -> None:
    """'continue pattern X' (the rule planner's recall -> continue): the new audio carries X's stored audio on, and
    the stored result says where it came from."""
    import json

    pattern_id, _ = generated
    events = list(client.compose(f"continue pattern {pattern_id} for 0.512 seconds, brighter, 3 steps", seed=5,
                                 max_tokens=8))
    summary = events[-1].summary
    assert summary.state == pb.Workflow.STATE_SUCCEEDED, summary.error
    plan = json.loads(next(e.plan.plan_json for e in events if e.WhichOneof("event") == "plan"))
    assert [s["type"] for s in plan["steps"]][:2] == ["recall", "continue"]
    done = [e.step for e in events if e.WhichOneof("event") == "step" and e.step.step_type == "continue"
            and e.step.state == pb.ComposeStep.STATE_FINISHED]
    assert done and json.loads(done[0].summary_json)["init_pattern_id"] == pattern_id
    piece, rate = sf.read(io.BytesIO(b"".join(e.audio.wav_data for e in events if e.WhichOneof("event") == "audio")))
    assert rate == RATE and abs(len(piece) / RATE - 0.512) < 0.01 and np.abs(piece).max() > 0
    stored = [client.get_pattern(p) for p in summary.pattern_ids]
    assert stored and all(p.has_audio and p.tags["continued_from"] == pattern_id for p in stored)
    assert all(p.metadata["continued_from"] == pattern_id for p in stored)


def test_a_pattern_without_audio_is_not_found(client: Client, generated) -> None:
    """Compose's rule plans store patterns with audio too; a pattern without it arises from stores made before
    audio storage: simulated here by deleting a pattern and asking for its audio (NOT_FOUND, pattern gone) —
    the "has no stored audio" path is covered on milvus-lite in tests/unit/test_audio_store.py."""
    gone = client.analyze(wav_bytes(clip(0.5, 700.0)), store=True).pattern_id
    client.delete_pattern(gone)
    code, details = status_of(lambda: client.stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=1,
                                                                              init_pattern_id=gone)))
    assert code == grpc.StatusCode.NOT_FOUND and gone in details


# --- hostile inputs ---------------------------------------------------------------------------------------------------
def refused(client: Client, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    return status_of(lambda: client.stub.Generate(request, timeout=60))


@HYPOTHESIS
@given(strength=st.floats(allow_nan=True, allow_infinity=True, width=32).filter(lambda x: not 0 <= x <= 1))
def test_any_strength_outside_0_1_is_invalid(client: Client, strength: float) -> None:
    code, details = refused(client, pb.GenerateRequest(prompt=PROMPT, steps=1, init_strength=strength,
                                                       init_audio=common_pb2.AudioInput(wav=wav_bytes(clip(0.1)))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "init_strength" in details


@HYPOTHESIS
@given(mode=st.integers(min_value=-(2**31), max_value=2**31 - 1).filter(lambda m: m not in (0, 1, 2, 3)))
def test_undefined_modes_are_invalid(client: Client, mode: int) -> None:
    code, details = refused(client, pb.GenerateRequest(prompt=PROMPT, steps=1, mode=mode))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mode" in details


@HYPOTHESIS
@given(pattern_id=st.text(min_size=1, max_size=80))
def test_bogus_init_pattern_ids_are_invalid_or_not_found(client: Client, pattern_id: str) -> None:
    code, details = refused(client, pb.GenerateRequest(prompt=PROMPT, steps=1, init_pattern_id=pattern_id))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details)
    assert "init_pattern_id" in details or "does not exist" in details


@pytest.mark.parametrize("fields,says", [
    ({"mode": pb.GenerateRequest.MODE_TEXT, "init_audio": common_pb2.AudioInput(wav=b"")}, "audio"),
    ({"mode": pb.GenerateRequest.MODE_TEXT, "init_pattern_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7"},
     "TEXT takes no init audio"),
    ({"init_pattern_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
      "init_audio": common_pb2.AudioInput(wav=b"RIFF")}, "audio"),
    ({"mode": pb.GenerateRequest.MODE_VARY}, "needs init_audio or init_pattern_id"),
    ({"mode": pb.GenerateRequest.MODE_CONTINUE}, "needs init_audio or init_pattern_id"),
    ({"init_audio": common_pb2.AudioInput(wav=b"not a wav")}, "init_audio.wav is text"),
])
def test_bad_init_combinations(client: Client, fields: dict, says: str) -> None:
    code, details = refused(client, pb.GenerateRequest(prompt=PROMPT, steps=1, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details


def test_init_audio_and_pattern_together_are_invalid(client: Client, generated) -> None:
    code, details = refused(client, pb.GenerateRequest(prompt=PROMPT, steps=1, init_pattern_id=generated[0],
                                                       init_audio=common_pb2.AudioInput(wav=wav_bytes(clip(0.2)))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exclusive" in details


# --- cancellation -----------------------------------------------------------------------------------------------------
async def _unet_inferences(triton) -> int:
    c = ta.InferenceServerClient(triton.grpc_url)
    try:
        stats = await c.get_inference_statistics(model_name="unet")
        return int(stats.model_stats[0].inference_count)
    finally:
        await c.close()


async def test_cancel_during_vary_stops_the_denoising_loop(orchestrator, triton) -> None:
    steps = 200
    async with AsyncClient(orchestrator.target, timeout_s=120) as c:
        before = await _unet_inferences(triton)
        call = c.stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=steps, seed=3, duration_seconds=0.5,
                                                  init_audio=common_pb2.AudioInput(wav=wav_bytes(clip())),
                                                  init_strength=1.0))
        seen = 0
        async for event in call:
            if event.WhichOneof("event") == "progress":
                seen += 1
                if seen == 3:
                    break
        call.cancel()
        await asyncio.sleep(2.0)
        mid = await _unet_inferences(triton)
        await asyncio.sleep(1.5)
        after = await _unet_inferences(triton)
    assert after == mid, "UNet still being called after cancellation"
    assert (after - before) // 2 < seen + 20, after - before
