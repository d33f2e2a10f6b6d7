"""What every coordinator backend shares: the interface, its events, its errors and the stall/deadline clock.

The orchestrator talks to "a reasoning LLM that streams tokens" and must not care where it runs:

* :class:`grym_synth.coordinator.triton_backend.TritonCoordinatorBackend` — the ``coordinator`` model in Triton,
  streamed through the app's :class:`grym_synth.inference.triton_client.TritonClient` (the one path to Triton).
* :class:`grym_synth.coordinator.openai_backend.OpenAICoordinatorBackend` — any OpenAI-compatible
  ``/v1/chat/completions`` endpoint with ``stream=true`` (vLLM, SGLang, Ollama, llama.cpp server).

Both yield :class:`TokenEvent` objects whose ``kind`` separates reasoning ("thinking") from the answer, whether the
server sends ``reasoning_content``/``reasoning`` deltas or inline ``<think>...</think>`` text
(:class:`grym_synth.coordinator.thinking.ThinkSplitter`). The last event of every stream carries ``finish_reason``.

Failures are :mod:`grym_synth.core.errors` types, so the orchestrator's single error mapping applies:
:class:`CoordinatorUnavailable` (endpoint down, model not loaded, stream cut) -> UNAVAILABLE naming the endpoint,
:class:`CoordinatorTimeout` (no token within ``token_timeout_s`` or ``deadline_s`` exceeded) -> DEADLINE_EXCEEDED,
:class:`CoordinatorRequestError` -> INVALID_ARGUMENT, :class:`CoordinatorStreamError` (the model failed) -> INTERNAL.
Leaving a stream early (``break``, task cancellation, an exception) cancels the gRPC stream / closes the HTTP
response, which stops generation server-side. Consume streams with ``contextlib.aclosing(backend.stream(...))`` so
that cleanup happens immediately rather than when the generator is garbage-collected.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from grym_synth.core.errors import DeadlineExceeded, DownstreamError, GrymError, InvalidArgument, Unavailable

Kind = Literal["thinking", "answer"]

DEFAULT_TOKEN_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------------- errors
class CoordinatorError(GrymError):
    """Any coordinator backend failure; ``endpoint`` names the server (and model) that failed."""

    def __init__(self, endpoint: str, message: str) -> None:
        GrymError.__init__(self, message)
        self.endpoint = endpoint


class CoordinatorUnavailable(CoordinatorError, Unavailable):
    """The endpoint cannot be reached, the model is not loaded, or the stream broke off -> UNAVAILABLE."""

    def __init__(self, endpoint: str, message: str) -> None:
        Unavailable.__init__(self, f"coordinator {endpoint}", message)
        self.endpoint = endpoint


class CoordinatorTimeout(CoordinatorError, DeadlineExceeded, TimeoutError):
    """No token arrived within the idle timeout, or the whole stream exceeded its deadline -> DEADLINE_EXCEEDED."""


class CoordinatorRequestError(CoordinatorError, InvalidArgument):
    """The request was rejected as invalid (bad sampling values, HTTP 4xx) -> INVALID_ARGUMENT."""


class CoordinatorStreamError(CoordinatorError, DownstreamError):
    """The model failed while generating (error response mid-stream) -> INTERNAL."""

    def __init__(self, endpoint: str, message: str) -> None:
        DownstreamError.__init__(self, f"coordinator {endpoint}", message)
        self.endpoint = endpoint


# ---------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TokenEvent:
    """One piece of streamed text.

    ``token_index`` is the 0-based index of the model token (Triton) or of the stream chunk (OpenAI) that produced
    the text; one chunk can produce two events (end of thinking + start of answer) with the same index.
    ``finish_reason`` is set only on the last event of a stream ("stop", "length", "cancelled", or what an OpenAI
    server reports); that event's text may be empty."""

    text: str
    kind: Kind
    token_index: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class RawToken:
    """One response of the Triton ``coordinator`` model (one generated token)."""

    token_id: int
    text: str
    finish_reason: str | None
    received_s: float


class CoordinatorBackend(Protocol):
    """What the orchestrator needs from a coordinator LLM."""

    async def stream(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        deadline_s: float | None = None,
        stop: Sequence[str] | None = None,
        request_id: str = "",
    ) -> AsyncIterator[TokenEvent]: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- helpers
class Clock:
    """Per-token idle timeout combined with an overall deadline."""

    def __init__(self, endpoint: str, token_timeout_s: float, deadline_s: float | None) -> None:
        self.endpoint = endpoint
        self.token_timeout_s = token_timeout_s
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.deadline_s = deadline_s

    def next_wait(self) -> tuple[float, str]:
        """Seconds to wait for the next item and the reason used if that wait expires."""
        if self.deadline is None:
            return self.token_timeout_s, "idle"
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.expired("deadline")
        return (remaining, "deadline") if remaining < self.token_timeout_s else (self.token_timeout_s, "idle")

    def passed(self) -> bool:
        """Whether the overall deadline has passed (a wait that expired now was bounded by it, not by the idle
        timeout)."""
        return self.deadline is not None and time.monotonic() >= self.deadline - 0.01

    def expired(self, reason: str) -> CoordinatorTimeout:
        if reason == "deadline":
            return CoordinatorTimeout(
                self.endpoint, f"coordinator {self.endpoint} exceeded the {self.deadline_s:.1f}s deadline"
            )
        return CoordinatorTimeout(
            self.endpoint, f"coordinator {self.endpoint} produced no token for {self.token_timeout_s:.1f}s"
        )


def validate_sampling(max_tokens: int | None, temperature: float | None, top_p: float | None, endpoint: str) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise CoordinatorRequestError(endpoint, f"max_tokens must be >= 1, got {max_tokens}")
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):
        raise CoordinatorRequestError(endpoint, f"temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and not (0 < top_p <= 1):
        raise CoordinatorRequestError(endpoint, f"top_p must be in (0, 1], got {top_p}")


def token_events(pieces: list[tuple[Kind, str]], index: int) -> list[TokenEvent]:
    return [TokenEvent(text=t, kind=k, token_index=index) for k, t in pieces]
