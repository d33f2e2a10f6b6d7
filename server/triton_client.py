"""The orchestrator's only way to reach Triton.

Every call carries the caller's remaining deadline, goes through the model's circuit breaker, and is retried
with backoff only when it is idempotent and the failure is transient (UNAVAILABLE, RESOURCE_EXHAUSTED).
Streams (decoupled models) are never replayed: once a stream has produced a response, a failure is final.
Triton's errors become :mod:`server.errors` types that name the model, so a user sees
"triton:wav2vec2 is unavailable: ..." rather than a bare gRPC code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    GrymError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from server.metrics import Metrics
from server.resilience import AsyncBreaker, RetryPolicy, retry

log = logging.getLogger(__name__)

CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
]


class ClientError(InvalidArgument):
    """Triton rejected the request itself (bad shape or value): never trips a breaker, never retried."""


def _grpc_code(exc: InferenceServerException) -> str:
    return str(exc.status() or "").replace("StatusCode.", "")


def classify(model: str, exc: BaseException, *, client_bound: bool) -> GrymError:
    """Map a tritonclient failure to the orchestrator's error types; ``client_bound`` says the caller's own
    deadline (not our per-call timeout) limited this call."""
    if isinstance(exc, GrymError):
        return exc
    downstream = f"triton:{model}"
    if isinstance(exc, asyncio.TimeoutError):
        return (DeadlineExceeded(f"deadline passed while waiting for {downstream}") if client_bound
                else Unavailable(downstream, "timed out"))
    if not isinstance(exc, InferenceServerException):
        return Unavailable(downstream, f"{type(exc).__name__}: {exc}")
    code, msg = _grpc_code(exc), exc.message() or str(exc)
    if code == "INVALID_ARGUMENT" and "unknown model" not in msg.lower():
        return ClientError(f"{downstream} rejected the request: {msg}")
    if code == "DEADLINE_EXCEEDED":
        return (DeadlineExceeded(f"deadline passed while waiting for {downstream}") if client_bound
                else Unavailable(downstream, "timed out"))
    if code == "RESOURCE_EXHAUSTED":
        return ResourceExhausted(f"{downstream} is overloaded: {msg}")
    if code == "CANCELLED":
        return Cancelled(f"{downstream} call cancelled")
    if code in ("UNAVAILABLE", "NOT_FOUND", "UNIMPLEMENTED", "") or "unknown model" in msg.lower() \
            or "not ready" in msg.lower() or "failed to connect" in msg.lower():
        return Unavailable(downstream, msg)
    return DownstreamError(downstream, msg)


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


class TritonClient:
    """A pool of async gRPC clients to one Triton server, with a breaker per model."""

    def __init__(self, url: str, *, channels: int = 2, timeout_s: float = 30.0, metrics: Metrics | None = None,
                 retry_policy: RetryPolicy | None = None, breaker_fail_max: int = 5,
                 breaker_reset_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.retry_policy = retry_policy or RetryPolicy()
        self._clients = [triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS) for _ in range(channels)]
        self._next = itertools.cycle(range(channels))
        self._breakers: dict[str, AsyncBreaker] = {}
        self._breaker_args = dict(fail_max=breaker_fail_max, reset_timeout_s=breaker_reset_s)

    def breaker(self, model: str) -> AsyncBreaker:
        if model not in self._breakers:
            self._breakers[model] = AsyncBreaker(
                f"triton:{model}", exclude=[ClientError, InvalidArgument, DeadlineExceeded, Cancelled],
                metrics=self.metrics, **self._breaker_args,
            )
        return self._breakers[model]

    def _client(self) -> triton_aio.InferenceServerClient:
        return self._clients[next(self._next)]

    def _timeout(self, deadline: float | None) -> tuple[float, bool]:
        """Seconds for one attempt, and whether the caller's deadline (rather than ours) is the bound."""
        if deadline is None:
            return self.timeout_s, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the Triton call started")
        return (remaining, True) if remaining < self.timeout_s else (self.timeout_s, False)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                    deadline: float | None = None, request_id: str = "") -> dict[str, np.ndarray]:
        """One idempotent inference: breaker, bounded retries, deadline propagation."""
        breaker = self.breaker(model)

        async def attempt() -> dict[str, np.ndarray]:
            timeout, client_bound = self._timeout(deadline)
            started = time.perf_counter()
            try:
                result = await asyncio.wait_for(
                    self._client().infer(
                        model, [_input(k, v) for k, v in inputs.items()],
                        outputs=[InferRequestedOutput(o) for o in outputs], request_id=request_id,
                        client_timeout=timeout,
                    ),
                    timeout=timeout + 0.5,
                )
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                err = classify(model, exc, client_bound=client_bound)
                if self.metrics:
                    self.metrics.triton_errors.labels(model, type(err).__name__).inc()
                raise err from None
            if self.metrics:
                self.metrics.triton_latency.labels(model).observe(time.perf_counter() - started)
            return {name: result.as_numpy(name) for name in outputs}

        def on_retry(n: int, exc: BaseException) -> None:
            log.info("retrying %s (attempt %d) after %s [request_id=%s]", model, n + 1, exc, request_id)
            if self.metrics:
                self.metrics.triton_retries.labels(model).inc()

        return await retry(lambda: breaker.call(attempt), policy=self.retry_policy, deadline=deadline,
                           is_transient=is_transient, on_retry=on_retry)

    async def stream(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                     deadline: float | None = None, request_id: str = "",
                     parameters: Mapping[str, Any] | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        """Responses of a decoupled model, in order, until its final flag. Not retried: a stream that failed
        after its first response cannot be replayed without duplicating effects. Cancelling the consumer
        cancels the gRPC stream, which Triton passes on to the model as request cancellation."""
        breaker = self.breaker(model)
        timeout, client_bound = self._timeout(deadline)
        request = {
            "model_name": model,
            "inputs": [_input(k, v) for k, v in inputs.items()],
            "outputs": [InferRequestedOutput(o) for o in outputs],
            "request_id": request_id,
            # The aio client ignores the `enable_empty_final_response` key; the request parameter is what Triton
            # reads, and the empty final response is how we know the stream is complete.
            "parameters": {"triton_enable_empty_final_response": True, **dict(parameters or {})},
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        async with breaker.guard():
            responses = None
            finished = False
            try:
                responses = self._client().stream_infer(requests(), stream_timeout=timeout)
                async for result, error in responses:
                    if error is not None:
                        raise classify(model, error, client_bound=client_bound)
                    response = result.get_response()
                    final = response.parameters.get("triton_final_response")
                    if response.outputs:
                        yield {o.name: result.as_numpy(o.name) for o in response.outputs}
                    if final is not None and final.bool_param:
                        finished = True
                        return
            except (asyncio.CancelledError, GeneratorExit, GrymError):
                raise
            except BaseException as exc:
                raise classify(model, exc, client_bound=client_bound) from None
            finally:
                if responses is not None and not finished:
                    # The consumer went away (cancelled, deadline, error): cancel the gRPC stream so Triton
                    # cancels the request and the model stops (a decoupled model checks is_cancelled()).
                    responses.cancel()

    # --- control plane ------------------------------------------------------------------------------------------
    async def server_ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._clients[0].is_server_ready(), 3.0))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False

    async def model_ready(self, model: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self._clients[0].is_model_ready(model), 3.0))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False

    async def statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's per-model statistics (queue vs compute time, inference vs execution counts)."""
        return await self._clients[0].get_inference_statistics(model_name=model, as_json=True)

    async def config(self, model: str) -> dict[str, Any]:
        return (await self._clients[0].get_model_config(model, as_json=True)).get("config", {})

    async def close(self) -> None:
        for client in self._clients:
            try:
                await client.close()
            except Exception:
                log.debug("closing a Triton client failed", exc_info=True)
