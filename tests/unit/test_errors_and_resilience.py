"""Errors and resilience, without processes: how Triton failures are classified, which ones a breaker counts, what a
status message may say, the servicer's one error scope, the memory budget and the shared generation slots."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from grym_synth.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    public_message,
)
from grym_synth.core.resilience import AsyncBreaker, is_downstream_fault
from grym_synth.inference.triton_client import ClientError, classify
from support import assert_clean

C = grpc.StatusCode


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
    from grym_synth.core.metrics import Metrics
    from grym_synth.core.resilience import AdmissionControl
    from grym_synth.api.servicer import Gate, OrchestratorService

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


def test_budget_hold_charges_growth_and_frees_everything() -> None:
    from grym_synth.core.errors import ResourceExhausted
    from grym_synth.core.resilience import MemoryBudget

    budget = MemoryBudget(100)
    with budget.hold("StreamAnalyze") as a, budget.hold("StreamAnalyze") as b:
        a.resize(60)
        b.resize(30)
        with pytest.raises(ResourceExhausted) as err:
            b.resize(50)  # 60 + 50 > 100: refused, b keeps its 30
        assert "StreamAnalyze" in err.value.message and b.nbytes == 30 and budget.used == 90
        a.resize(10)  # shrinking always succeeds
        b.resize(90)
        assert budget.used == 100
    assert budget.used == 0


async def test_generation_slots_refuse_generate_and_queue_compose() -> None:
    from grym_synth.core.errors import ResourceExhausted
    from grym_synth.generation.service import GenerationSlots

    slots = GenerationSlots(1)
    entered = asyncio.Event()

    async def compose_step() -> None:
        async with slots.hold(wait=True, what="Compose"):
            entered.set()

    async with slots.hold(wait=True, what="Compose"):
        waiter = asyncio.create_task(compose_step())
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted):
            async with slots.hold(wait=False, what="Generate"):
                pass
        assert not entered.is_set()
    await asyncio.wait_for(waiter, 1)  # the queued step ran once the slot was free
    assert entered.is_set() and slots.in_use == 0
    async with slots.hold(wait=False, what="Generate"):
        assert slots.in_use == 1
