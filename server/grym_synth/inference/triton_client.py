"""The orchestrator's only way to reach Triton, for every model (wav2vec2, AudioLDM and its components, the
coordinator LLM's token stream): a restricted Triton's secret header goes on every call, data and control plane.

Every call goes through the model's circuit breaker and is retried with backoff only when it is idempotent and the
failure is transient (UNAVAILABLE, RESOURCE_EXHAUSTED). Streams (decoupled models) are never replayed: once a stream
has produced a response, a failure is final.

Timeouts mean what they say:
  * a unary inference gets ``timeout_s`` (per call), or less when the caller's deadline is nearer;
  * a stream gets ``idle_timeout_s`` between two responses (one denoising step of a generation), never a bound on
    the whole stream: long work that keeps answering runs as long as the caller's deadline allows;
  * the caller's deadline (the client's gRPC deadline) bounds the whole call.
A timeout that fires on our side is DEADLINE_EXCEEDED, as is the caller's; neither, nor a request Triton rejects
(INVALID_ARGUMENT), nor a cancellation, counts against the model's breaker (see
:func:`grym_synth.core.resilience.is_downstream_fault`).

Triton's errors become :mod:`grym_synth.core.errors` types that name the model ("triton:wav2vec2 is unavailable: ..."). Raw
gRPC details (peer addresses, debug strings) go to the JSON log with the request id, never into a status message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from grym_synth.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    GrymError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    public_message,
)
from grym_synth.core.metrics import Metrics
from grym_synth.core.resilience import AsyncBreaker, RetryPolicy, is_downstream_fault, retry

log = logging.getLogger(__name__)

CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    # After a Triton restart the channel reconnects within 2 s instead of gRPC's default backoff (up to 120 s,
    # growing with the outage), so the supervisor's SERVING is not followed by a long UNAVAILABLE tail.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class ClientError(InvalidArgument):
    """Triton rejected the request itself (bad shape or value): never trips a breaker, never retried."""


# A decoupled model's error response reaches the client as a bare message (Triton 2.41's ModelStreamInferResponse
# has no status code), so the python-backend models start the message of a request they refuse with this marker
# (model_repository/audioldm/1/model.py); on unary calls the INVALID_ARG code says the same.
INVALID_REQUEST_MARKER = "invalid request:"
# Likewise for a request the model sheds because it is at capacity (model_repository/coordinator/1/model.py).
OVERLOADED_MARKER = "overloaded:"


def _grpc_code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, InferenceServerException):
        return str(exc.status() or "").replace("StatusCode.", "")
    return ""


def _detail(exc: BaseException) -> str:
    """The raw message of a failure, for the log only."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()} ({exc.debug_error_string()})"
    if isinstance(exc, InferenceServerException):
        return f"{_grpc_code(exc) or '-'}: {exc.message() or exc}"
    return f"{type(exc).__name__}: {exc}"


def _message(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or ""
    if isinstance(exc, InferenceServerException):
        return exc.message() or ""
    return ""


def classify(model: str, exc: BaseException, *, client_bound: bool, timeout_s: float | None = None) -> GrymError:
    """Map a tritonclient or gRPC failure to the orchestrator's error types. ``client_bound`` says the caller's own
    deadline (not our timeout of ``timeout_s``) limited this call. Messages name the model and never quote
    transport details; those are logged here, with the request id."""
    if isinstance(exc, GrymError):
        return exc
    err = _classify(f"triton:{model}", exc, client_bound=client_bound, timeout_s=timeout_s)
    # The raw detail (peer address, gRPC debug string, the model's own text) is for the log: the JSON line carries
    # the request id. A downstream fault is a warning; a client's error or a deadline is routine.
    log.log(logging.WARNING if is_downstream_fault(err) else logging.INFO, "%s: %s -> %s %s", f"triton:{model}",
            _detail(exc), err.code.name, err.message)
    return err


def _classify(downstream: str, exc: BaseException, *, client_bound: bool, timeout_s: float | None) -> GrymError:
    code, msg = _grpc_code(exc), _message(exc)
    lowered = msg.lower()
    if isinstance(exc, asyncio.TimeoutError) or code == "DEADLINE_EXCEEDED":
        if client_bound or timeout_s is None:
            return DeadlineExceeded(f"deadline passed while waiting for {downstream}")
        return DeadlineExceeded(f"{downstream} did not answer within {timeout_s:g} s (triton_timeout_s)")
    if lowered.startswith(INVALID_REQUEST_MARKER):
        return ClientError(f"{downstream} rejected the request: "
                           f"{public_message(msg[len(INVALID_REQUEST_MARKER):].strip())}")
    if code == "INVALID_ARGUMENT" and "unknown model" not in lowered:
        return ClientError(f"{downstream} rejected the request: {public_message(msg)}")
    if code == "RESOURCE_EXHAUSTED" or lowered.startswith(OVERLOADED_MARKER):
        return ResourceExhausted(f"{downstream} is overloaded; retry with backoff")
    if code == "CANCELLED":
        return Cancelled(f"{downstream} call cancelled")
    if "unknown model" in lowered or code == "NOT_FOUND" or (
            "model" in lowered and ("not ready" in lowered or "not found" in lowered)):
        return Unavailable(downstream, "the model is not loaded")
    if code in ("UNAVAILABLE", "UNIMPLEMENTED", "UNKNOWN") or "failed to connect" in lowered \
            or not isinstance(exc, (InferenceServerException, grpc.aio.AioRpcError)):
        return Unavailable(downstream, "Triton did not answer (connection failed or closed)")
    if not code:  # a decoupled model's error response: the model raised while serving a valid request
        return DownstreamError(downstream, "the model failed on this request (details in the server log)")
    return DownstreamError(downstream, f"Triton answered {code} (details in the server log)")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (Unavailable, ResourceExhausted)) and not isinstance(exc, ClientError)


def _input(name: str, value: np.ndarray) -> InferInput:
    arr = np.asarray(value)
    dtype = "BYTES" if arr.dtype.kind in ("O", "S", "U") else np_to_triton_dtype(arr.dtype)
    if arr.dtype.kind == "U":
        arr = arr.astype(np.object_)
    inp = InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return inp


def _stream_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str,
                    parameters: Mapping[str, Any] | None) -> Any:
    """The ModelInferRequest of a decoupled stream, asking Triton for an empty response carrying the final flag:
    that response is how the end of the stream is known (a model may send its final flag with no data). Newer
    tritonclient releases refuse ``triton_``-prefixed parameters in their public API and the aio client offers no
    switch for it, so the flag is set on the request message itself."""
    from tritonclient.grpc._utils import _get_inference_request

    request = _get_inference_request(
        model_name=model, inputs=[_input(k, v) for k, v in inputs.items()], model_version="",
        request_id=request_id, outputs=[InferRequestedOutput(o) for o in outputs], sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=dict(parameters or {}) or None,
    )
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


class _RawStream:
    """A ModelStreamInfer call opened on the aio client's own channel and stub with one prepared request; yields
    ``(InferResult, None)`` or ``(None, InferenceServerException)`` like the client's ``stream_infer``."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._responses = call.__aiter__()

    @classmethod
    def open(cls, client: Any, request: Any, timeout_s: float | None, headers: Mapping[str, str] | None) -> "_RawStream":
        async def one() -> AsyncIterator[Any]:
            yield request

        return cls(client._client_stub.ModelStreamInfer(one(), metadata=client._get_metadata(headers),
                                                         timeout=timeout_s))

    async def __anext__(self) -> tuple[InferResult | None, InferenceServerException | None]:
        response = await self._responses.__anext__()
        if response.error_message:
            return None, InferenceServerException(msg=response.error_message)
        return InferResult(response.infer_response), None

    def cancel(self) -> bool:
        return bool(self._call.cancel())


class TritonClient:
    """A pool of async gRPC clients to one Triton server, with a breaker per model."""

    def __init__(self, url: str, *, channels: int = 2, timeout_s: float = 30.0, idle_timeout_s: float = 120.0,
                 metrics: Metrics | None = None, retry_policy: RetryPolicy | None = None, breaker_fail_max: int = 5,
                 breaker_reset_s: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
        # headers: sent on every call (a restricted Triton's secret; read per call, so an in-place update is seen).
        self.url = url
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics
        self.retry_policy = retry_policy or RetryPolicy()
        self.headers = headers
        self._clients = [triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS) for _ in range(channels)]
        self._next = itertools.cycle(range(channels))
        self._breakers: dict[str, AsyncBreaker] = {}
        self._breaker_args = dict(fail_max=breaker_fail_max, reset_timeout_s=breaker_reset_s)

    def breaker(self, model: str) -> AsyncBreaker:
        """The model's breaker; it counts only downstream faults (grym_synth.core.resilience.is_downstream_fault)."""
        if model not in self._breakers:
            self._breakers[model] = AsyncBreaker(f"triton:{model}", metrics=self.metrics, **self._breaker_args)
        return self._breakers[model]

    def _client(self) -> triton_aio.InferenceServerClient:
        return self._clients[next(self._next)]

    def _headers(self) -> dict[str, str] | None:
        """Triton's secret header for one call, read now (the embedded server renews it in place at each start)."""
        return dict(self.headers) if self.headers else None

    @staticmethod
    def _bound(limit: float, deadline: float | None) -> tuple[float, bool]:
        """Seconds for one wait of at most ``limit``, and whether the caller's deadline (not ``limit``) is the
        bound."""
        if deadline is None:
            return limit, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the Triton call started")
        return (remaining, True) if remaining < limit else (limit, False)

    def _timeout(self, deadline: float | None) -> tuple[float, bool]:
        """Seconds for one unary attempt, and whether the caller's deadline (rather than ours) is the bound."""
        return self._bound(self.timeout_s, deadline)

    def _count_error(self, model: str, err: GrymError) -> None:
        if self.metrics:
            self.metrics.triton_errors.labels(model, err.code.name).inc()

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                    deadline: float | None = None, request_id: str = "") -> dict[str, np.ndarray]:
        """One idempotent inference: breaker, bounded retries, per-call timeout within the caller's deadline."""
        breaker = self.breaker(model)

        async def attempt() -> dict[str, np.ndarray]:
            timeout, client_bound = self._timeout(deadline)
            started = time.perf_counter()
            try:
                result = await asyncio.wait_for(
                    self._client().infer(
                        model, [_input(k, v) for k, v in inputs.items()],
                        outputs=[InferRequestedOutput(o) for o in outputs], request_id=request_id,
                        client_timeout=timeout, headers=self._headers(),
                    ),
                    timeout=timeout + 0.5,
                )
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                err = classify(model, exc, client_bound=client_bound, timeout_s=timeout)
                self._count_error(model, err)
                raise err from None
            if self.metrics:
                self.metrics.triton_latency.labels(model).observe(time.perf_counter() - started)
            return {name: result.as_numpy(name) for name in outputs}

        def on_retry(n: int, exc: BaseException) -> None:
            log.info("retrying %s (attempt %d) after %s", model, n + 1, exc)
            if self.metrics:
                self.metrics.triton_retries.labels(model).inc()

        return await retry(lambda: breaker.call(attempt), policy=self.retry_policy, deadline=deadline,
                           is_transient=is_transient, on_retry=on_retry)

    async def stream(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                     deadline: float | None = None, request_id: str = "",
                     parameters: Mapping[str, Any] | None = None,
                     idle_timeout_s: float | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        """Responses of a decoupled model, in order, until its final flag. Each response must come within
        ``idle_timeout_s`` of the previous one (the client's, unless this call names its own, e.g. the
        coordinator's per-token timeout); the caller's deadline bounds the whole stream. Not retried: a stream that
        failed after its first response cannot be replayed without duplicating effects. Cancelling the consumer
        cancels the gRPC stream, which Triton passes on to the model as request cancellation. The response that
        carries the final flag is yielded after the stream has completed and the breaker has seen the success, so a
        consumer may stop at it (e.g. at a finish reason) without cancelling anything."""
        breaker = self.breaker(model)
        idle_s, idle_setting = ((self.idle_timeout_s, "triton_idle_timeout_s") if idle_timeout_s is None
                                else (idle_timeout_s, "the stream's idle timeout"))
        total = None
        if deadline is not None:
            total = deadline - time.monotonic()
            if total <= 0:
                raise DeadlineExceeded("deadline passed before the Triton call started")
        request = _stream_request(model, inputs, outputs, request_id, parameters)
        last: dict[str, np.ndarray] | None = None
        async with breaker.guard():
            responses = None
            finished = False
            client_bound = False
            try:
                responses = _RawStream.open(self._client(), request, total, self._headers())
                while True:
                    wait, client_bound = self._bound(idle_s, deadline)
                    try:
                        result, error = await asyncio.wait_for(responses.__anext__(), wait)
                    except StopAsyncIteration:
                        raise DownstreamError(f"triton:{model}", "the stream ended before its final response") \
                            from None
                    except asyncio.TimeoutError:
                        if client_bound:
                            raise DeadlineExceeded(f"deadline passed while waiting for triton:{model}") from None
                        log.warning("triton:%s sent no response for %g s: stream ended (%s)", model, wait,
                                    idle_setting)
                        raise DeadlineExceeded(f"triton:{model} sent no response for {wait:g} s "
                                               f"({idle_setting})") from None
                    if error is not None:
                        raise classify(model, error, client_bound=client_bound, timeout_s=wait)
                    response = result.get_response()
                    final = response.parameters.get("triton_final_response")
                    received = {o.name: result.as_numpy(o.name) for o in response.outputs} or None
                    if final is not None and final.bool_param:
                        finished = True
                        last = received
                        break
                    if received is not None:
                        yield received
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except GrymError as err:
                self._count_error(model, err)
                raise
            except BaseException as exc:
                # The gRPC stream itself failed (connection lost, or its deadline, which is the caller's).
                err = classify(model, exc, client_bound=True if _grpc_code(exc) == "DEADLINE_EXCEEDED"
                               else client_bound)
                self._count_error(model, err)
                raise err from None
            finally:
                if responses is not None and not finished:
                    # The consumer went away (cancelled, deadline, error): cancel the gRPC stream so Triton
                    # cancels the request and the model stops (a decoupled model checks is_cancelled()).
                    responses.cancel()
        if last is not None:
            yield last

    # --- control plane ------------------------------------------------------------------------------------------
    async def server_ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._clients[0].is_server_ready(headers=self._headers()), 3.0))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False

    async def model_ready(self, model: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self._clients[0].is_model_ready(model, headers=self._headers()), 3.0))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False

    async def statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's per-model statistics (queue vs compute time, inference vs execution counts)."""
        return await self._clients[0].get_inference_statistics(model_name=model, headers=self._headers(),
                                                                      as_json=True)

    async def config(self, model: str) -> dict[str, Any]:
        return (await self._clients[0].get_model_config(model, headers=self._headers(), as_json=True)).get("config", {})

    async def close(self) -> None:
        for client in self._clients:
            try:
                await client.close()
            except Exception:
                log.debug("closing a Triton client failed", exc_info=True)
