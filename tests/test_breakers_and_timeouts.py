"""Issue 11 "Trust": breakers count only downstream faults, timeouts mean what they say, errors leak nothing.

Unit tests cover the pure logic (classify, the breaker's exclusions, the message scrubber, validation against the
model's limits); the rest runs on the real processes: the session's tritonserver and private orchestrators with
small breaker thresholds and timeouts, so a wrong classification shows as an open breaker within a few requests.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import orchestrator_args
from grym import Client, GrymError
from grym.v1 import common_pb2, orchestrator_pb2 as pb
from server.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    public_message,
)
from server.generation import ModelLimits, load_limits, validate
from server.resilience import AsyncBreaker, is_downstream_fault
from server.triton_client import ClientError, classify
from server.triton_process import EmbeddedTriton
from support import OrchestratorProcess, tone

C = grpc.StatusCode
PROMPT = "warm analog synth pad"
# What no status message may carry: peer addresses, gRPC dumps, exception class names, reprs.
LEAK = re.compile(r"127\.0\.0\.1|ipv4|ipv6|localhost:\d|debug_error_string|grpc_status|\b[A-Z]\w*(?:Error|Exception)\b"
                  r"|object at 0x|Traceback")


def assert_clean(message: str) -> None:
    assert not LEAK.search(message), f"status message leaks internals: {message!r}"


# --------------------------------------------------------------------------------------------------------------
# Pure logic
# --------------------------------------------------------------------------------------------------------------
def _aio_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details,
                                debug_error_string=f'UNKNOWN:Error received from peer ipv4:127.0.0.1:41234 '
                                                   f'{{grpc_message:"{details}", grpc_status:{code.value[0]}}}')


CLASSIFY = [
    # (failure, client_bound, expected type, must say)
    (InferenceServerException(msg="invalid request: 'duration_s' must be in [0.008, 30] seconds, got 1e-09"),
     False, ClientError, "duration_s"),
    (InferenceServerException(msg="unexpected shape for input 'x'", status="StatusCode.INVALID_ARGUMENT"), False,
     ClientError, "unexpected shape"),
    (InferenceServerException(msg="failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41234: "
                                  "Connection refused", status="StatusCode.UNAVAILABLE"), False, Unavailable,
     "triton:m"),
    (InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), False,
     DeadlineExceeded, "triton_timeout_s"),
    (InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), True,
     DeadlineExceeded, "deadline passed"),
    (asyncio.TimeoutError(), False, DeadlineExceeded, "triton:m"),
    (_aio_error(C.UNAVAILABLE, "Socket closed"), False, Unavailable, "triton:m"),
    (_aio_error(C.DEADLINE_EXCEEDED, "Deadline Exceeded"), True, DeadlineExceeded, "deadline"),
    (_aio_error(C.CANCELLED, "Locally cancelled"), False, Cancelled, "cancelled"),
    (InferenceServerException(msg="Exceeds maximum queue size", status="StatusCode.RESOURCE_EXHAUSTED"), False,
     ResourceExhausted, "overloaded"),
    (InferenceServerException(msg="Request for unknown model: 'm' is not found", status="StatusCode.UNAVAILABLE"),
     False, Unavailable, "not loaded"),
    (InferenceServerException(msg="audioldm generation failed: <Foo object at 0x7f00deadbeef> RuntimeError: x"),
     False, DownstreamError, "triton:m failed"),
    (RuntimeError("socket at 10.1.2.3:8001 exploded"), False, Unavailable, "triton:m"),
]


@pytest.mark.parametrize("exc,client_bound,kind,says", CLASSIFY, ids=[f"{type(c[0]).__name__}-{c[2].__name__}-{i}"
                                                                     for i, c in enumerate(CLASSIFY)])
def test_classify(exc: BaseException, client_bound: bool, kind: type, says: str) -> None:
    err = classify("m", exc, client_bound=client_bound, timeout_s=30.0)
    assert type(err) is kind, (type(err), err.message)
    assert says in err.message
    assert_clean(err.message)
    # Only a downstream's own failure counts against its breaker.
    assert is_downstream_fault(err) == isinstance(err, (Unavailable, DownstreamError)), err


def test_breaker_ignores_client_errors_cancellations_and_deadlines() -> None:
    async def scenario() -> None:
        breaker = AsyncBreaker("triton:m", fail_max=2, reset_timeout_s=0.2)

        async def fail(exc: BaseException) -> None:
            raise exc

        for _ in range(20):
            for exc in (InvalidArgument("x"), ClientError("x"), NotFound("x"), DeadlineExceeded("x"),
                        Cancelled("x"), ResourceExhausted("x")):
                with pytest.raises(type(exc)):
                    await breaker.call(lambda: fail(exc))
            with pytest.raises(asyncio.CancelledError):
                await breaker.call(lambda: fail(asyncio.CancelledError()))
        assert breaker.state == "closed" and breaker.breaker.fail_counter == 0

        for _ in range(2):
            with pytest.raises(Unavailable):
                await breaker.call(lambda: fail(Unavailable("triton:m", "down")))
        assert breaker.state == "open"
        await asyncio.sleep(0.25)
        # A probe that ends in the client's own error proves nothing: still half-open, the next call probes again.
        with pytest.raises(InvalidArgument):
            await breaker.call(lambda: fail(InvalidArgument("bad")))
        assert breaker.state == "half-open"

        async def ok() -> int:
            return 1

        assert await breaker.call(ok) == 1
        assert breaker.state == "closed"

    asyncio.run(scenario())


def test_public_message_scrubs_addresses_dumps_reprs_and_class_names() -> None:
    raw = ("triton:m is unavailable: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41234: "
           "ConnectionRefusedError: refused by [::1]:8001 and http://10.0.0.7:8000/v2 for <a.B object at 0x7f12345678>")
    clean = public_message(raw)
    assert_clean(clean)
    assert clean.startswith("triton:m is unavailable: failed to connect")
    dump = public_message('x <AioRpcError of RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE\n\t'
                          'debug_error_string = "UNKNOWN:ipv4:127.0.0.1:1 {grpc_status:14}"\n>')
    assert dump == "x (details in the server log)"
    field_message = "duration_seconds must be in [0.008, 30] seconds, got 1e-09"
    assert public_message(field_message) == field_message


class _AbortContext:
    """The part of grpc.aio.ServicerContext that rpc_scope uses."""

    def __init__(self) -> None:
        self.status: tuple[C, str] | None = None

    async def abort(self, code: C, details: str) -> None:
        self.status = (code, details)
        raise grpc.aio.AbortError()


@pytest.mark.parametrize("raised,code,says", [
    (OverflowError("Python int too large to convert to C long"), C.INVALID_ARGUMENT,
     "out of range for its field [request_id=rid-1]"),
    (KeyError("secret-internal-key"), C.INTERNAL, "internal error; quote request_id=rid-1"),
    (Unavailable("milvus", "cannot reach http://10.0.0.9:19530: ConnectionRefusedError: refused"), C.UNAVAILABLE,
     "milvus is unavailable: cannot reach <internal> refused [request_id=rid-1]"),
])
def test_rpc_scope_answers_without_internals(raised: BaseException, code: C, says: str) -> None:
    from server.metrics import Metrics
    from server.resilience import AdmissionControl
    from server.service import Gate, OrchestratorService

    gate = Gate()
    gate.ready = True
    service = OrchestratorService(None, None, AdmissionControl(4), gate, Metrics(),  # type: ignore[arg-type]
                                  None, None)
    context = _AbortContext()

    async def handler() -> None:
        async with service.rpc_scope("Generate", context, "rid-1"):  # type: ignore[arg-type]
            raise raised

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(handler())
    assert context.status is not None and context.status[0] == code, context.status
    assert says in context.status[1], context.status[1]
    assert_clean(context.status[1])
    assert "secret-internal-key" not in context.status[1]


@pytest.fixture(scope="module")
def tiny_limits() -> ModelLimits:
    return load_limits("tiny")


@pytest.mark.parametrize("fields,says", [
    (dict(duration_s=1e-9), "duration_seconds must be in [0.008, 30]"),
    (dict(duration_s=0.0079), "duration_seconds"),
    (dict(duration_s=math.inf), "duration_seconds"),
    (dict(duration_s=math.nan), "duration_seconds"),
    (dict(duration_s=1e300), "duration_seconds"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=-math.inf), "guidance_scale"),
    (dict(prompt="synth " * 100), "prompt is 10"),  # 600 characters but over 64 tokens
    (dict(negative_prompt="noise " * 40), "negative_prompt is"),  # over min(64, projection_dim 32) tokens
    (dict(steps=10**12), "steps"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-1), "seed"),
    (dict(scheduler="warp"), "scheduler"),
    (dict(prompt="\ud800 lone surrogate"), "prompt"),
])
def test_validate_refuses_what_the_model_would(tiny_limits: ModelLimits, fields: dict, says: str) -> None:
    args = dict(prompt=PROMPT, negative_prompt="", duration_s=1.0, steps=2, guidance_scale=None, seed=None,
                scheduler="ddim") | fields
    with pytest.raises(InvalidArgument) as err:
        validate(**args, max_duration_s=30.0, limits=tiny_limits)
    assert says in err.value.message


def test_validate_accepts_the_model_bounds(tiny_limits: ModelLimits) -> None:
    for duration in (tiny_limits.min_duration_s, 30.0):
        assert validate(PROMPT, "", duration, 1, 0.0, 2**63 - 1, "pndm", 30.0, tiny_limits).duration_s == duration
    longest = " ".join(["a"] * (tiny_limits.max_prompt_tokens - 2))  # tokens: <s> + text + </s>
    assert tiny_limits.count_tokens(longest) == tiny_limits.max_prompt_tokens
    validate(longest, "", 1.0, 2, None, None, "ddim", 30.0, tiny_limits)
    # The full profile's minimum (0.04 s) is below 0.04 as a float32; it is still accepted, as by the model.
    full = load_limits("full")
    assert full.min_duration_s == 0.04 and validate(PROMPT, "", 0.04, 2, None, None, "ddim", 30.0, full)


def test_seeded_limits_equal_the_exported_repository(tiny_repository: Path, tiny_limits: ModelLimits) -> None:
    """The orchestrator without the repository on disk (external Triton) counts tokens exactly as the model does."""
    exported = load_limits("tiny", tiny_repository)
    assert exported.source.endswith("audioldm/1")
    assert exported == tiny_limits  # every bound (the tokenizer is not compared)
    for text in (PROMPT, "synth " * 100, "café ☕ \x00 ünïcode", "Trance anthem with a soaring lead " * 3):
        assert exported.count_tokens(text) == tiny_limits.count_tokens(text)


def test_limits_from_a_checkpoint_directory(tmp_path: Path) -> None:
    """--audioldm-weights-dir: the checkpoint's own tokenizer and configs (AudioLDM-S shapes) set the limits."""
    import json

    from server.export.audioldm_tokenizer import save_tokenizer

    save_tokenizer(tmp_path / "tokenizer", model_max_length=512)
    for name, config in {"vocoder": {"upsample_rates": [5, 4, 2, 2, 2], "sampling_rate": 16000},
                         "vae": {"block_out_channels": [128, 256, 512]},
                         "text_encoder": {"projection_dim": 512}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    limits = load_limits("tiny", None, tmp_path)
    assert (limits.min_duration_s, limits.max_prompt_tokens, limits.max_negative_tokens) == (0.04, 512, 512)
    with pytest.raises(InvalidArgument, match="duration_seconds"):
        validate(PROMPT, "", 0.02, 2, None, None, "ddim", 30.0, limits)  # valid for tiny, not for this checkpoint


# --------------------------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------------------------
TRITON_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def orch(triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    """A private orchestrator whose breakers open after 2 failures and whose per-call Triton timeout is 1 s."""
    proc = OrchestratorProcess(tmp_path_factory.mktemp("orch-breakers"), orchestrator_args(
        triton, "--breaker-fail-max", "2", "--breaker-reset-s", "30", "--retry-attempts", "1",
        "--cache-max-entries", "0", "--triton-timeout-s", str(TRITON_TIMEOUT_S), "--triton-idle-timeout-s", "30",
    )).start()
    yield proc
    proc.stop()


def metrics(proc: OrchestratorProcess) -> str:
    return urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()


def assert_no_breaker_opened(proc: OrchestratorProcess) -> None:
    text = metrics(proc)
    states = [line for line in text.splitlines() if line.startswith("grym_breaker_state{")]
    assert states and all(line.endswith(" 0.0") for line in states), states
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
    from server.triton_client import TritonClient

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
