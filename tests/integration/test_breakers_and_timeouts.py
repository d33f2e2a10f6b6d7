"""Issue 11 "Trust": breakers count only downstream faults, timeouts mean what they say, errors leak nothing.

On the real processes: the session's tritonserver and private orchestrators with small breaker thresholds and
timeouts, so a wrong classification shows as an open breaker within a few requests. The pure logic (classify, the
breaker's exclusions, the message scrubber, validation against the model's limits) is in tests/unit.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import orchestrator_args
from grym import Client, GrymError
from grym.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.generation.service import ModelLimits, load_limits
from grym_synth.inference.triton_client import ClientError
from grym_synth.inference.triton_process import EmbeddedTriton
from support import OrchestratorProcess, assert_clean, tone

C = grpc.StatusCode
PROMPT = "warm analog synth pad"


# --------------------------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_limits() -> ModelLimits:
    return load_limits("tiny")


def test_seeded_limits_equal_the_exported_repository(tiny_repository: Path, tiny_limits: ModelLimits) -> None:
    """The orchestrator without the repository on disk (external Triton) counts tokens exactly as the model does."""
    exported = load_limits("tiny", tiny_repository)
    assert exported.source.endswith("audioldm/1")
    assert exported == tiny_limits  # every bound (the tokenizer is not compared)
    for text in (PROMPT, "synth " * 100, "café ☕ \x00 ünïcode", "Trance anthem with a soaring lead " * 3):
        assert exported.count_tokens(text) == tiny_limits.count_tokens(text)


TRITON_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def orch(triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    """A private orchestrator whose breakers open after 2 failures and whose per-call Triton timeout is 1 s."""
    proc = OrchestratorProcess(tmp_path_factory.mktemp("orch-breakers"), orchestrator_args(
        triton, "--breaker-fail-max", "2", "--breaker-reset-s", "30", "--retry-attempts", "1",
        "--cache-max-entries", "0", "--triton-timeout-s", str(TRITON_TIMEOUT_S), "--triton-idle-timeout-s", "30",
        # the music models run beside wav2vec2 on the same 2 CPU cores: with them a 1 s per-call timeout is a
        # load test, not the breaker behaviour this module checks
        "--no-music-analysis",
    )).start()
    yield proc
    proc.stop()


def metrics(proc: OrchestratorProcess) -> str:
    return urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()


def assert_no_breaker_opened(proc: OrchestratorProcess) -> None:
    text = metrics(proc)
    states = [line for line in text.splitlines() if line.startswith("grym_breaker_state{")]
    opened = [line for line in states if 'state="closed"' not in line]
    assert states and opened and all(line.endswith(" 0.0") for line in opened), states
    trips = [line for line in text.splitlines() if line.startswith("grym_breaker_trips_total{")]
    assert all(line.endswith(" 0.0") for line in trips), trips


def _generate(**fields: object) -> tuple[str, pb.GenerateRequest]:
    return "Generate", pb.GenerateRequest(**({"prompt": PROMPT, "duration_seconds": 0.5, "steps": 2} | fields))


def invalid_requests() -> list[tuple[str, object, set[C], str]]:
    """(rpc, request, acceptable codes, what the message must name): cheap requests a hostile client repeats."""
    nan_audio = tone(0.5)
    nan_audio[100] = np.nan
    return [
        (*_generate(duration_seconds=1e-9), {C.INVALID_ARGUMENT}, "duration_seconds"),
        (*_generate(guidance_scale=float("nan")), {C.INVALID_ARGUMENT}, "guidance_scale"),
        (*_generate(prompt="synth " * 100), {C.INVALID_ARGUMENT}, "tokens"),
        (*_generate(negative_prompt="noise " * 40), {C.INVALID_ARGUMENT}, "negative_prompt"),
        (*_generate(duration_seconds=float("inf")), {C.INVALID_ARGUMENT}, "duration_seconds"),
        # Tag filters: any Unicode value filters (OK) or is refused; never INTERNAL or UNAVAILABLE.
        ("ListPatterns", pb.ListPatternsRequest(tag_filter={"mood": "café"}), {C.OK, C.INVALID_ARGUMENT}, ""),
        ("ListPatterns", pb.ListPatternsRequest(tag_filter={"mood": "a\x00b"}), {C.OK, C.INVALID_ARGUMENT}, ""),
        ("GetPattern", pb.GetPatternRequest(pattern_id=uuid.uuid4().hex), {C.NOT_FOUND, C.INVALID_ARGUMENT},
         "pattern"),
        ("DeletePattern", pb.DeletePatternRequest(pattern_id="x'] or not id in ['"), {C.NOT_FOUND, C.INVALID_ARGUMENT},
         "pattern_id"),
        ("AnalyzeAudio", pb.AnalyzeAudioRequest(audio=common_pb2.AudioInput(pcm=common_pb2.PcmAudio(
            data=nan_audio.astype("<f4").tobytes(), sample_rate_hz=16_000, channels=1,
            encoding=common_pb2.PcmAudio.ENCODING_FLOAT32))), {C.INVALID_ARGUMENT}, "NaN"),
    ]


def call(client: Client, rpc: str, request: object, timeout_s: float = 30.0) -> tuple[C, str]:
    method = getattr(client.stub, rpc)
    try:
        result = method(request, timeout=timeout_s)
        if rpc == "Generate":
            list(result)
        return C.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def test_fifty_invalid_requests_open_no_breaker(orch: OrchestratorProcess) -> None:
    """50 invalid requests in a row, against breakers that open after 2 failures: each gets its own status naming
    the field, no breaker opens, and valid Generate and AnalyzeAudio calls still succeed."""
    cases = invalid_requests()
    with Client(orch.target, timeout_s=60) as c:
        for i in range(50):
            rpc, request, codes, says = cases[i % len(cases)]
            code, message = call(c, rpc, request)
            assert code in codes, (rpc, request, code, message)
            assert says in message, (rpc, code, message)
            assert_clean(message)
        assert_no_breaker_opened(orch)
        events = list(c.generate(PROMPT, seconds=0.5, steps=2, seed=3))
        assert events[-1].WhichOneof("event") == "result"
        assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
    assert_no_breaker_opened(orch)


def test_generation_longer_than_the_per_call_timeout_succeeds(orch: OrchestratorProcess) -> None:
    """The stream is bounded per response (idle timeout), not as a whole by the 1 s per-call timeout."""
    with Client(orch.target, timeout_s=120) as c:
        t0 = time.perf_counter()
        events = list(c.generate(PROMPT, seconds=4.0, steps=200, seed=11))
        elapsed = time.perf_counter() - t0
    assert events[-1].WhichOneof("event") == "result", events[-1]
    assert sum(e.WhichOneof("event") == "progress" for e in events) == 200
    assert elapsed > TRITON_TIMEOUT_S * 1.5, f"the generation took only {elapsed:.2f} s: it proves nothing"
    assert_no_breaker_opened(orch)


def test_client_deadline_shorter_than_the_work(orch: OrchestratorProcess) -> None:
    """The client's deadline ends the call with DEADLINE_EXCEEDED; repeated, it leaves the breaker closed."""
    with Client(orch.target, timeout_s=60) as c:
        for i in range(4):
            t0 = time.perf_counter()
            with pytest.raises(GrymError) as err:
                list(c.generate(PROMPT, seconds=4.0, steps=200, seed=20 + i, timeout_s=0.6))
            assert err.value.code == C.DEADLINE_EXCEEDED
            assert_clean(err.value.message)
            assert time.perf_counter() - t0 < 3.0
        assert_no_breaker_opened(orch)
        events = list(c.generate(PROMPT, seconds=0.5, steps=2, seed=4))
        assert events[-1].WhichOneof("event") == "result"
    assert_no_breaker_opened(orch)


async def test_a_request_the_model_refuses_is_a_client_error(triton: EmbeddedTriton) -> None:
    """What slips past the orchestrator's validation: the audioldm model refuses it (its stream error carries the
    "invalid request:" marker, as 2.41's stream responses have no status code) and TritonClient maps it to
    INVALID_ARGUMENT, which leaves the model's breaker closed however often it is repeated."""
    from grym_synth.inference.triton_client import TritonClient

    client = TritonClient(triton.grpc_url, breaker_fail_max=1, headers=triton.auth_headers or None)
    try:
        for _ in range(5):
            with pytest.raises(ClientError) as err:
                async for _ in client.stream("audioldm", {"prompt": np.array([PROMPT.encode()], dtype=np.object_),
                                                          "duration_s": np.array([1e-9], dtype=np.float32)}, ()):
                    pass
            assert "triton:audioldm rejected the request: 'duration_s' must be in" in err.value.message
            assert err.value.code == C.INVALID_ARGUMENT
        assert client.breaker("audioldm").state == "closed"
    finally:
        await client.close()


def test_idle_timeout_is_deadline_exceeded_logged_with_the_request_id(triton: EmbeddedTriton, tmp_path: Path) -> None:
    """A Triton stream that sends nothing for triton_idle_timeout_s ends with DEADLINE_EXCEEDED naming the model
    and the setting (not UNAVAILABLE), the detail is logged with the request id, and no breaker counts it."""
    proc = OrchestratorProcess(tmp_path / "orch", orchestrator_args(
        triton, "--breaker-fail-max", "1", "--cache-max-entries", "0", "--triton-idle-timeout-s", "0.001",
    )).start()
    try:
        with Client(proc.target, timeout_s=60) as c:
            for i in range(3):
                rid = f"idle-{i}-{uuid.uuid4().hex[:8]}"
                with pytest.raises(GrymError) as err:
                    list(c.generate(PROMPT, seconds=1.0, steps=4, seed=i, request_id=rid))
                assert err.value.code == C.DEADLINE_EXCEEDED, err.value
                assert "triton:audioldm" in err.value.message and "triton_idle_timeout_s" in err.value.message
                assert rid in err.value.message
                assert_clean(err.value.message)
            assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24  # unary calls are not affected
        assert_no_breaker_opened(proc)
        logged = [line for line in proc.log().splitlines() if "sent no response" in line]
        assert any(rid in line for line in logged), logged[-3:]
    finally:
        proc.stop()
