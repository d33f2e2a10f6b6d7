"""Error recovery and resource limits: circuit breakers, retries within deadlines, admission control, and an
in-flight memory budget.

pybreaker's ``call`` is synchronous and holds a lock around the guarded function, and its ``call_async`` needs
tornado, so neither works with ``grpc.aio``. :class:`AsyncBreaker` keeps pybreaker as the state machine (states,
counters, listeners) and drives it around an ``await``: it admits a call from the current state (one probe at a
time when half-open), awaits the coroutine outside any lock, then replays the outcome through ``breaker.call``
so pybreaker's own rules (thresholds, transitions) decide. Only downstream faults count
(:func:`is_downstream_fault`): a client's bad input, its cancellation or its deadline, and a timeout of ours on work
that was merely long, neither count as failures nor as successes: they leave the breaker exactly as it was, so no
client can open a shared breaker, and a half-open breaker waits for a real probe.
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

from grym_synth.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from grym_synth.core.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


# Outcomes that say nothing about a downstream's health: the request was wrong (INVALID_ARGUMENT, NOT_FOUND,
# OUT_OF_RANGE, FAILED_PRECONDITION), the caller went away or ran out of time (CANCELLED, DEADLINE_EXCEEDED, also
# when our own per-call or idle timeout fired on long work), or the downstream shed load (RESOURCE_EXHAUSTED: it
# answered; retries and admission control handle overload, a breaker would only make it worse).
NOT_DOWNSTREAM_FAULTS: tuple[type[BaseException], ...] = (
    InvalidArgument, NotFound, OutOfRange, FailedPrecondition, Cancelled, DeadlineExceeded, ResourceExhausted,
    asyncio.CancelledError, GeneratorExit, KeyboardInterrupt,
)


def is_downstream_fault(exc: BaseException) -> bool:
    """Whether a failure may count against a downstream's breaker (see NOT_DOWNSTREAM_FAULTS)."""
    return not isinstance(exc, NOT_DOWNSTREAM_FAULTS)


class _MetricsListener(pybreaker.CircuitBreakerListener):
    def __init__(self, metrics: Metrics | None, name: str) -> None:
        self.metrics = metrics
        self.name = name
        if metrics:
            metrics.set_breaker_state(name, "closed")

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        new = getattr(new_state, "name", str(new_state))
        log.warning("circuit breaker %s: %s -> %s", self.name, getattr(old_state, "name", old_state), new)
        if self.metrics:
            self.metrics.set_breaker_state(self.name, new)
            if new == "open":
                self.metrics.breaker_trips.labels(self.name).inc()


class AsyncBreaker:
    """A circuit breaker for one downstream (a Triton model, Milvus, the coordinator backend)."""

    def __init__(self, name: str, *, fail_max: int = 5, reset_timeout_s: float = 10.0,
                 exclude: Iterable[type[BaseException]] = (), metrics: Metrics | None = None) -> None:
        self.name = name
        self._exclude = tuple(exclude)
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

    def counts(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a failure of this downstream (never a client's error, cancellation or deadline)."""
        if not is_downstream_fault(exc):
            return False
        return not any(isinstance(exc, e) if isinstance(e, type) else e(exc) for e in self._exclude)

    def record(self, exc: BaseException | None) -> None:
        """Feed an outcome to pybreaker's state machine without re-running anything. A failure that is not the
        downstream's changes nothing: not the failure count, not the state (it is not a success either)."""
        if exc is not None and not self.counts(exc):
            return

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

    def hold(self, what: str = "request") -> "BudgetHold":
        """An incremental reservation for memory that grows and shrinks (a stream's buffer): starts at 0 bytes,
        :meth:`BudgetHold.resize` charges or frees the difference, leaving the ``with`` frees the rest."""
        return BudgetHold(self, what)

    def _publish(self) -> None:
        if self.metrics:
            self.metrics.inflight_bytes.set(self.used)


class BudgetHold:
    """Bytes one request holds in a :class:`MemoryBudget`, resized as it goes (see :meth:`MemoryBudget.hold`)."""

    def __init__(self, budget: MemoryBudget, what: str) -> None:
        self.budget = budget
        self.what = what
        self.nbytes = 0

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on; growing past the budget is RESOURCE_EXHAUSTED (the hold is unchanged)."""
        grow = nbytes - self.nbytes
        b = self.budget
        if grow > 0 and b.used + grow > b.limit:
            if b.metrics:
                b.metrics.rpc_rejected.labels(self.what, "memory").inc()
            raise ResourceExhausted(f"{self.what} needs {nbytes} bytes in flight and the in-flight memory budget is "
                                    f"spent ({b.used}/{b.limit} bytes); retry later")
        b.used += grow
        self.nbytes = nbytes
        b._publish()

    def release(self) -> None:
        self.resize(0)

    def __enter__(self) -> "BudgetHold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
