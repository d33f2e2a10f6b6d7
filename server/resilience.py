"""Error recovery and resource limits: circuit breakers, retries within deadlines, admission control, and an
in-flight memory budget.

pybreaker's ``call`` is synchronous and holds a lock around the guarded function, and its ``call_async`` needs
tornado, so neither works with ``grpc.aio``. :class:`AsyncBreaker` keeps pybreaker as the state machine (states,
counters, listeners) and drives it around an ``await``: it admits a call from the current state (one probe at a
time when half-open), awaits the coroutine outside any lock, then replays the outcome through ``breaker.call``
so pybreaker's own rules (excluded exceptions, thresholds, transitions) decide. Cancellations and client errors
are never counted as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import pybreaker

from server.errors import ResourceExhausted, Unavailable
from server.metrics import BREAKER_STATE_VALUES, Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class _MetricsListener(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: Metrics | None, name: str) -> None:
        self.metrics = metrics
        self.name = name
        if metrics:
            metrics.breaker_state.labels(name).set(0)

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        new = getattr(new_state, "name", str(new_state))
        log.warning("circuit breaker %s: %s -> %s", self.name, getattr(old_state, "name", old_state), new)
        if self.metrics:
            self.metrics.breaker_state.labels(self.name).set(BREAKER_STATE_VALUES.get(new, -1))
            if new == "open":
                self.metrics.breaker_trips.labels(self.name).inc()


class AsyncBreaker:
    """A circuit breaker for one downstream (a Triton model, Milvus, the coordinator backend)."""

    def __init__(self, name: str, *, fail_max: int = 5, reset_timeout_s: float = 10.0,
                 exclude: Iterable[type[BaseException]] = (), metrics: Metrics | None = None) -> None:
        self.name = name
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout_s, exclude=list(exclude),
            listeners=[_MetricsListener(metrics, name)], name=name,
        )
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        return str(self.breaker.current_state)

    def _retry_in(self) -> float:
        opened = self.breaker._state_storage.opened_at  # pybreaker exposes no public accessor
        if opened is None:
            return 0.0
        if opened.tzinfo is None:
            opened = opened.replace(tzinfo=timezone.utc)
        elapsed = (datetime.now(timezone.utc) - opened).total_seconds()
        return max(0.0, self.breaker.reset_timeout - elapsed)

    def admit(self) -> bool:
        """Raise UNAVAILABLE when open; returns True when this call is the half-open probe."""
        if self.state == pybreaker.STATE_OPEN:
            wait = self._retry_in()
            if wait > 0:
                raise Unavailable(self.name, f"circuit breaker open after repeated failures; retry in {wait:.1f}s")
            self.breaker.half_open()
        if self.state == pybreaker.STATE_HALF_OPEN:
            if self._probe_in_flight:
                raise Unavailable(self.name, "circuit breaker half-open: a probe request is in flight; retry shortly")
            self._probe_in_flight = True
            return True
        return False

    def record(self, exc: BaseException | None) -> None:
        """Feed an outcome to pybreaker's state machine without re-running anything."""

        def replay() -> None:
            if exc is not None:
                raise exc

        try:
            self.breaker.call(replay)
        except pybreaker.CircuitBreakerError:
            pass  # this failure tripped the breaker (or it was already open): the caller raises its own error
        except BaseException as raised:
            if raised is not exc:
                raise

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        probe = self.admit()
        try:
            result = await fn()
        except (asyncio.CancelledError, GeneratorExit):
            raise  # the caller went away: says nothing about the downstream
        except BaseException as exc:
            self.record(exc)
            raise
        else:
            self.record(None)
            return result
        finally:
            if probe:
                self._probe_in_flight = False

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """The same rules for a block (e.g. consuming a stream)."""
        probe = self.admit()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            self.record(exc)
            raise
        else:
            self.record(None)
        finally:
            if probe:
                self._probe_in_flight = False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; only for idempotent calls (never for a stream already started)."""

    attempts: int = 3
    base_delay_s: float = 0.05
    max_delay_s: float = 1.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * (2 ** attempt)))


async def retry(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy, deadline: float | None,
                is_transient: Callable[[BaseException], bool],
                on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """Call ``fn`` until it succeeds, fails permanently, runs out of attempts, or the next backoff would end
    after ``deadline`` (a ``time.monotonic()`` value)."""
    attempt = 0
    while True:
        try:
            return await fn()
        except BaseException as exc:
            attempt += 1
            if attempt >= policy.attempts or not is_transient(exc):
                raise
            pause = policy.delay(attempt)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise
            if on_retry:
                on_retry(attempt, exc)
            await asyncio.sleep(pause)


class AdmissionControl:
    """Per-method concurrency limits: past the limit a request is refused at once (RESOURCE_EXHAUSTED) instead of
    queueing without bound, so an overloaded method cannot starve the others."""

    def __init__(self, default_limit: int, limits: dict[str, int] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.default_limit = default_limit
        self.limits = dict(limits or {})
        self.inflight: dict[str, int] = {}
        self.metrics = metrics
        self.closed = False

    @contextlib.contextmanager
    def admit(self, method: str):  # type: ignore[no-untyped-def]
        if self.closed:
            raise Unavailable("orchestrator", "the server is shutting down; retry against another replica")
        limit = self.limits.get(method, self.default_limit)
        current = self.inflight.get(method, 0)
        if current >= limit:
            if self.metrics:
                self.metrics.rpc_rejected.labels(method, "concurrency").inc()
            raise ResourceExhausted(f"{method} is at its limit of {limit} concurrent requests; retry with backoff")
        self.inflight[method] = current + 1
        if self.metrics:
            self.metrics.rpc_inflight.labels(method).inc()
        try:
            yield
        finally:
            self.inflight[method] -= 1
            if self.metrics:
                self.metrics.rpc_inflight.labels(method).dec()

    def total_inflight(self) -> int:
        return sum(self.inflight.values())


class MemoryBudget:
    """Caps the bytes of audio and tensors held by in-flight requests; over budget is RESOURCE_EXHAUSTED."""

    def __init__(self, limit_bytes: int, metrics: Metrics | None = None) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.metrics = metrics

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str = "request"):  # type: ignore[no-untyped-def]
        if nbytes > self.limit:
            raise ResourceExhausted(f"{what} needs {nbytes} bytes, more than the server's whole in-flight budget "
                                    f"({self.limit} bytes)")
        if self.used + nbytes > self.limit:
            if self.metrics:
                self.metrics.rpc_rejected.labels(what, "memory").inc()
            raise ResourceExhausted(f"in-flight memory budget spent ({self.used}/{self.limit} bytes); retry later")
        self.used += nbytes
        self._publish()
        try:
            yield
        finally:
            self.used -= nbytes
            self._publish()

    def _publish(self) -> None:
        if self.metrics:
            self.metrics.inflight_bytes.set(self.used)
