"""Token-stream clients for the coordinator LLM, behind one async interface.

The orchestrator talks to "a reasoning LLM that streams tokens" and must not care where it runs:

* :class:`TritonCoordinatorBackend` — the ``coordinator`` model in Triton (gRPC bidirectional stream). Two wire
  protocols: ``"grym"`` (our python-backend model: ``prompt``/``max_tokens``/... in, ``text``/``token_id``/
  ``finish_reason`` out, chat template applied server-side) and ``"vllm"`` (Triton's vLLM backend, see
  ``model_repository/coordinator/configs/vllm.pbtxt``: ``text_input``/``stream``/``sampling_parameters`` in,
  ``text_output`` out; the chat template is rendered here because that backend takes raw text).
* :class:`OpenAICoordinatorBackend` — any OpenAI-compatible ``/v1/chat/completions`` endpoint with
  ``stream=true`` (vLLM, SGLang, Ollama, llama.cpp server), read as server-sent events.

Both yield :class:`TokenEvent` objects whose ``kind`` separates reasoning ("thinking") from the answer, whether the
server sends ``reasoning_content``/``reasoning`` deltas or inline ``<think>...</think>`` text (:class:`ThinkSplitter`).
The last event of every stream carries ``finish_reason``.

Failures are :mod:`server.errors` types, so the orchestrator's single error mapping applies:
:class:`CoordinatorUnavailable` (endpoint down, model not loaded, stream cut) -> UNAVAILABLE naming the endpoint,
:class:`CoordinatorTimeout` (no token within ``token_timeout_s`` or ``deadline_s`` exceeded) -> DEADLINE_EXCEEDED,
:class:`CoordinatorRequestError` -> INVALID_ARGUMENT, :class:`CoordinatorStreamError` (the model failed) -> INTERNAL.
Leaving a stream early (``break``, task cancellation, an exception) cancels the gRPC stream / closes the HTTP
response, which stops generation server-side. Consume streams with ``contextlib.aclosing(backend.stream(...))`` so
that cleanup happens immediately rather than when the generator is garbage-collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from server.errors import DeadlineExceeded, DownstreamError, GrymError, InvalidArgument, Unavailable

Kind = Literal["thinking", "answer"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
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


# ---------------------------------------------------------------------------------------------------- thinking
class ThinkSplitter:
    """Splits raw text deltas into ("thinking" | "answer", text) pieces, removing the ``<think>`` tags.

    Tags may arrive split across deltas (``"<thi"`` + ``"nk>"``): a suffix that could still become a tag is held
    back until the next delta decides it. ``start_in_thinking``:
      * True  — the prompt already opened the think block (DeepSeek's ``...<｜Assistant｜><think>\\n``), so text is
        reasoning until ``</think>``; this is the case for the Triton coordinator.
      * False — text is answer unless it *begins* with ``<think>``.
      * None (auto) — like False, but leading whitespace is held until the first visible character shows whether
        a think block opens the response.
    Only one think block is recognised, at the start (that is how R1 models reason); later tags are literal text.
    A stray ``</think>`` before any answer text has been closed out is dropped (a server whose template prefilled
    ``<think>`` without a reasoning parser) — pass ``start_in_thinking=True`` for such servers to label it right.
    """

    def __init__(self, start_in_thinking: bool | None = None) -> None:
        self._mode: Literal["undecided", "thinking", "answer"]
        if start_in_thinking is None:
            self._mode = "undecided"
        else:
            self._mode = "thinking" if start_in_thinking else "answer"
        self._closed = False  # a </think> has been consumed (or a think block can no longer appear)
        self._buf = ""

    @property
    def in_thinking(self) -> bool:
        return self._mode == "thinking"

    def feed(self, delta: str) -> list[tuple[Kind, str]]:
        self._buf += delta
        out: list[tuple[Kind, str]] = []
        while self._buf:
            if self._mode == "undecided":
                if not self._decide():
                    break
            elif self._mode == "thinking":
                if not self._scan(THINK_CLOSE, "thinking", out, next_mode="answer"):
                    break
            elif not self._closed:
                if not self._scan(THINK_CLOSE, "answer", out, next_mode="answer"):
                    break
            else:
                out.append(("answer", self._buf))
                self._buf = ""
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[Kind, str]]:
        """End of stream: whatever is held is literal text of the current kind."""
        held, self._buf = self._buf, ""
        kind: Kind = "thinking" if self._mode == "thinking" else "answer"
        return [(kind, held)] if held else []

    def _decide(self) -> bool:
        stripped = self._buf.lstrip()
        if not stripped or (len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped)):
            return False  # still ambiguous: wait for more text
        if stripped.startswith(THINK_OPEN):
            self._mode = "thinking"
            self._buf = stripped[len(THINK_OPEN) :]
        else:
            self._mode = "answer"
        return True

    def _scan(self, tag: str, kind: Kind, out: list[tuple[Kind, str]], next_mode: str) -> bool:
        """Emit text up to ``tag`` (consuming it and switching mode) or up to a possible partial tag.
        Returns True when the mode changed and the remaining buffer needs another pass."""
        at = self._buf.find(tag)
        if at >= 0:
            out.append((kind, self._buf[:at]))
            self._buf = self._buf[at + len(tag) :]
            self._mode = next_mode  # type: ignore[assignment]
            self._closed = True
            return True
        keep = _partial_suffix(self._buf, tag)
        out.append((kind, self._buf[: len(self._buf) - keep]))
        self._buf = self._buf[len(self._buf) - keep :]
        return False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---------------------------------------------------------------------------------------------------- helpers
class _Clock:
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

    def expired(self, reason: str) -> CoordinatorTimeout:
        if reason == "deadline":
            return CoordinatorTimeout(
                self.endpoint, f"coordinator {self.endpoint} exceeded the {self.deadline_s:.1f}s deadline"
            )
        return CoordinatorTimeout(
            self.endpoint, f"coordinator {self.endpoint} produced no token for {self.token_timeout_s:.1f}s"
        )


def _validate(max_tokens: int | None, temperature: float | None, top_p: float | None, endpoint: str) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise CoordinatorRequestError(endpoint, f"max_tokens must be >= 1, got {max_tokens}")
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):
        raise CoordinatorRequestError(endpoint, f"temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and not (0 < top_p <= 1):
        raise CoordinatorRequestError(endpoint, f"top_p must be in (0, 1], got {top_p}")


def _events(pieces: list[tuple[Kind, str]], index: int) -> list[TokenEvent]:
    return [TokenEvent(text=t, kind=k, token_index=index) for k, t in pieces]


# ---------------------------------------------------------------------------------------------------- Triton
class TritonCoordinatorBackend:
    """Streams from the Triton ``coordinator`` model over gRPC (``tritonclient.grpc.aio`` ``stream_infer``)."""

    def __init__(
        self,
        grpc_url: str,
        model_name: str = "coordinator",
        *,
        protocol: Literal["grym", "vllm"] = "grym",
        token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S,
        start_in_thinking: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.grpc_url = grpc_url
        self.headers = headers  # sent on every call (a restricted Triton's secret)
        self.model_name = model_name
        self.protocol = protocol
        self.token_timeout_s = token_timeout_s
        self.start_in_thinking = start_in_thinking
        self.endpoint = f"triton://{grpc_url}/{model_name}"
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _triton(self):
        """One aio client per event loop (gRPC aio channels are bound to the loop that created them)."""
        import tritonclient.grpc.aio as triton_aio

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from server.security import with_headers

            self._client = with_headers(triton_aio.InferenceServerClient(self.grpc_url), self.headers)
            self._loop = loop
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # -- request building
    def _request(self, prompt: str, max_tokens, temperature, top_p, seed, stop) -> dict[str, Any]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        def tensor(name: str, array: np.ndarray, dtype: str) -> InferInput:
            inp = InferInput(name, list(array.shape), dtype)
            inp.set_data_from_numpy(array)
            return inp

        if self.protocol == "vllm":
            from server.export.coordinator import render_chat_prompt

            sampling = {
                k: v
                for k, v in {
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "seed": seed,
                    "stop": list(stop) if stop else None,
                }.items()
                if v is not None
            }
            inputs = [
                tensor("text_input", np.array([render_chat_prompt(prompt).encode()], dtype=np.object_), "BYTES"),
                tensor("stream", np.array([True]), "BOOL"),
                tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"),
                tensor("exclude_input_in_output", np.array([True]), "BOOL"),
                tensor("return_finish_reason", np.array([True]), "BOOL"),
            ]
            outputs = ["text_output", "finish_reason"]
        else:
            inputs = [tensor("prompt", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
            if max_tokens is not None:
                inputs.append(tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
            if temperature is not None:
                inputs.append(tensor("temperature", np.array([temperature], dtype=np.float32), "FP32"))
            if top_p is not None:
                inputs.append(tensor("top_p", np.array([top_p], dtype=np.float32), "FP32"))
            if seed is not None:
                inputs.append(tensor("seed", np.array([seed], dtype=np.int64), "INT64"))
            if stop:
                inputs.append(tensor("stop", np.array([s.encode("utf-8") for s in stop], dtype=np.object_), "BYTES"))
            outputs = ["text", "token_id", "finish_reason"]
        return {
            "model_name": self.model_name,
            "inputs": inputs,
            "outputs": [InferRequestedOutput(o) for o in outputs],
            # a response with the FINAL flag is marked, so the end of a request is known without closing the stream
            "parameters": {"triton_enable_empty_final_response": True},
        }

    def _map_error(self, exc: BaseException) -> CoordinatorError:
        import grpc
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, CoordinatorError):
            return exc
        if isinstance(exc, grpc.aio.AioRpcError):
            code, message = exc.code(), exc.details() or str(exc)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return CoordinatorTimeout(self.endpoint, f"coordinator {self.endpoint} deadline exceeded")
            if code == grpc.StatusCode.INVALID_ARGUMENT and "unknown model" not in message.lower():
                return CoordinatorRequestError(self.endpoint, message)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.CANCELLED):
                return CoordinatorUnavailable(self.endpoint, message)
            return CoordinatorStreamError(self.endpoint, f"{code.name}: {message}")
        if isinstance(exc, InferenceServerException):
            message = exc.message() or str(exc)
            lowered = message.lower()
            unavailable = ("unknown model", "not ready", "unavailable", "at capacity", "failed to connect")
            if any(s in lowered for s in unavailable):
                return CoordinatorUnavailable(self.endpoint, message)
            if any(s in lowered for s in ("must be", "unexpected inference input", "invalid")):
                return CoordinatorRequestError(self.endpoint, message)
            return CoordinatorStreamError(self.endpoint, message)
        return CoordinatorUnavailable(self.endpoint, f"{type(exc).__name__}: {exc}")

    # -- streaming
    async def stream_tokens(
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
    ) -> AsyncIterator[RawToken]:
        """One :class:`RawToken` per Triton response (per generated token), raw text not split into thinking."""
        _validate(max_tokens, temperature, top_p, self.endpoint)
        clock = _Clock(self.endpoint, self.token_timeout_s, deadline_s)
        request = self._request(prompt, max_tokens, temperature, top_p, seed, stop)
        request["request_id"] = request_id

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        # gRPC deadline slightly after ours, so that our clearer timeout normally fires first; either way the
        # server sees the stream end and cancels the request.
        stream_timeout = None if deadline_s is None else deadline_s + 1.0
        try:
            responses = self._triton().stream_infer(requests(), stream_timeout=stream_timeout)
        except Exception as exc:
            raise self._map_error(exc) from None
        try:
            while True:
                wait, reason = clock.next_wait()
                try:
                    result, error = await asyncio.wait_for(responses.__anext__(), wait)
                except StopAsyncIteration:
                    raise CoordinatorUnavailable(self.endpoint, "stream ended before the final response") from None
                except asyncio.TimeoutError:
                    raise clock.expired(reason) from None
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as exc:
                    raise self._map_error(exc) from None
                if error is not None:
                    raise self._map_error(error)
                token = self._parse(result)
                final = result.get_response().parameters.get("triton_final_response")
                if token is not None:
                    yield token
                    if token.finish_reason is not None:
                        return
                if final is not None and final.bool_param:
                    # closed without a finish_reason (an empty final response)
                    yield RawToken(-1, "", "stop", time.perf_counter())
                    return
        finally:
            responses.cancel()

    def _parse(self, result) -> RawToken | None:
        now = time.perf_counter()
        names = {o.name for o in result.get_response().outputs}
        if not names:
            return None
        if self.protocol == "vllm":
            text = _first_str(result.as_numpy("text_output"))
            reason = _first_str(result.as_numpy("finish_reason")) if "finish_reason" in names else ""
            return RawToken(-1, text, reason if reason and reason != "None" else None, now)
        token_ids = result.as_numpy("token_id")
        reason = _first_str(result.as_numpy("finish_reason")) if "finish_reason" in names else ""
        return RawToken(
            int(token_ids.reshape(-1)[0]) if token_ids is not None else -1,
            _first_str(result.as_numpy("text")),
            reason or None,
            now,
        )

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
    ) -> AsyncIterator[TokenEvent]:
        splitter = ThinkSplitter(start_in_thinking=self.start_in_thinking)
        index = -1
        async with contextlib.aclosing(
            self.stream_tokens(
                prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                deadline_s=deadline_s, stop=stop, request_id=request_id,
            )
        ) as tokens:
            async for token in tokens:
                if token.token_id >= 0 or self.protocol == "vllm":
                    index += 1
                for event in _events(splitter.feed(token.text), index):
                    yield event
                if token.finish_reason is not None:
                    for event in _events(splitter.flush(), index):
                        yield event
                    kind: Kind = "thinking" if splitter.in_thinking else "answer"
                    yield TokenEvent("", kind, index, finish_reason=token.finish_reason)
                    return


def _first_str(array) -> str:
    if array is None:
        return ""
    value = array.reshape(-1)[0] if array.size else b""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------- OpenAI
class OpenAICoordinatorBackend:
    """Streams ``POST {base_url}/v1/chat/completions`` (``stream: true``) from an OpenAI-compatible server.

    ``base_url`` may be given with or without the trailing ``/v1`` (``http://host:8000`` or
    ``http://host:8000/v1``). Reasoning arrives either as ``delta.reasoning_content`` (vLLM/SGLang with a reasoning
    parser), ``delta.reasoning`` (newer vLLM, Ollama) or inline ``<think>`` text in ``delta.content``; all become
    "thinking" events. The request has only a user message (DeepSeek: no system prompt)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S,
        connect_timeout_s: float = 5.0,
        start_in_thinking: bool | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.api_key = api_key
        self.token_timeout_s = token_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.start_in_thinking = start_in_thinking
        self.endpoint = f"{self.url} (model {model})"
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _body(self, prompt, max_tokens, temperature, top_p, seed, stop) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                           ("seed", seed), ("stop", list(stop) if stop else None)):
            if value is not None:
                body[key] = value
        return body

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
    ) -> AsyncIterator[TokenEvent]:
        import aiohttp

        _validate(max_tokens, temperature, top_p, self.endpoint)
        clock = _Clock(self.endpoint, self.token_timeout_s, deadline_s)
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if request_id:
            headers["X-Request-Id"] = request_id
        body = self._body(prompt, max_tokens, temperature, top_p, seed, stop)
        wait, reason = clock.next_wait()
        try:
            response = await asyncio.wait_for(self._http().post(self.url, json=body, headers=headers), wait)
        except asyncio.TimeoutError:
            raise clock.expired(reason) from None
        except aiohttp.ClientError as exc:
            raise CoordinatorUnavailable(self.endpoint, f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise CoordinatorUnavailable(self.endpoint, f"{type(exc).__name__}: {exc}") from None
        finished = False
        try:
            await self._check_status(response)
            splitter = ThinkSplitter(start_in_thinking=self.start_in_thinking)
            index = -1
            finish_reason: str | None = None
            done = False
            async with contextlib.aclosing(self._sse(response, clock)) as payloads:
                async for data in payloads:
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = self._decode(data)
                    for choice in chunk.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        delta = choice.get("delta") or {}
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                        content = delta.get("content")
                        if reasoning or content:
                            index += 1
                        if reasoning:
                            yield TokenEvent(reasoning, "thinking", index)
                        if content:
                            for event in _events(splitter.feed(content), index):
                                yield event
                        finish_reason = choice.get("finish_reason") or finish_reason
            if not done and finish_reason is None:
                raise CoordinatorUnavailable(self.endpoint, "stream closed before completion")
            for event in _events(splitter.flush(), index):
                yield event
            kind: Kind = "thinking" if splitter.in_thinking else "answer"
            yield TokenEvent("", kind, index, finish_reason=finish_reason or "stop")
            finished = True
        finally:
            if finished:
                response.release()
            else:
                response.close()  # drop the connection: the server sees the client go away and aborts generation

    async def _check_status(self, response) -> None:
        if response.status < 400:
            return
        try:
            detail = (await asyncio.wait_for(response.text(), 2.0))[:500]
        except Exception:
            detail = ""
        message = f"HTTP {response.status}: {detail}".strip()
        if response.status in (408, 429) or response.status >= 500:
            raise CoordinatorUnavailable(self.endpoint, message)
        raise CoordinatorRequestError(self.endpoint, message)

    async def _sse(self, response, clock: _Clock) -> AsyncIterator[str]:
        """``data`` payloads of server-sent events. Comment lines (keep-alives) do not count as progress, so a
        server that only sends keep-alives still hits the idle timeout."""
        data_lines: list[str] = []
        last_progress = time.monotonic()
        while True:
            wait, reason = clock.next_wait()
            if reason == "idle":
                wait = max(0.0, self.token_timeout_s - (time.monotonic() - last_progress))
                if wait == 0.0:
                    raise clock.expired("idle")
            try:
                raw = await asyncio.wait_for(response.content.readline(), wait)
            except asyncio.TimeoutError:
                raise clock.expired(reason) from None
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                raise CoordinatorUnavailable(self.endpoint, f"stream broke off: {type(exc).__name__}: {exc}") from None
            if not raw:  # EOF
                if data_lines:
                    yield "\n".join(data_lines)
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if data_lines:
                    last_progress = time.monotonic()
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data_lines.append(value[1:] if value.startswith(" ") else value)

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise CoordinatorStreamError(self.endpoint, f"malformed stream chunk: {data[:200]!r}") from None
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise CoordinatorStreamError(self.endpoint, message)
        return chunk if isinstance(chunk, dict) else {}


# ---------------------------------------------------------------------------------------------------- latency
def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values) * 1000.0
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "mean": round(float(arr.mean()), 3),
    }


async def measure_stream_latency(
    backend: TritonCoordinatorBackend | CoordinatorBackend,
    prompt: str,
    *,
    runs: int = 5,
    warmup: int = 1,
    max_tokens: int = 64,
    concurrency: int = 1,
    raw_tokens: bool = True,
    **sampling: Any,
) -> dict[str, Any]:
    """Time to first token and inter-token latency (ms, p50/p99/mean) over ``runs`` streams.

    ``raw_tokens=True`` times every Triton response (``stream_tokens``: the direct per-token path);
    ``False`` times :class:`TokenEvent` arrivals (first event per token index) — the view any orchestrator layer
    on top gets, so the two can be compared. ``concurrency`` streams run at once per run."""
    use_raw = raw_tokens and hasattr(backend, "stream_tokens")

    async def one() -> tuple[float | None, list[float], int]:
        started = time.perf_counter()
        arrivals: list[float] = []
        seen: set[int] = set()
        source = (backend.stream_tokens if use_raw else backend.stream)(prompt, max_tokens=max_tokens, **sampling)
        async with contextlib.aclosing(source) as items:
            async for item in items:
                now = time.perf_counter()
                if use_raw:
                    if item.token_id >= 0:
                        arrivals.append(now)
                elif item.finish_reason is None and item.token_index not in seen:
                    seen.add(item.token_index)
                    arrivals.append(now)
        ttft = arrivals[0] - started if arrivals else None
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return ttft, gaps, len(arrivals)

    for _ in range(warmup):
        await one()
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0
    wall_started = time.perf_counter()
    for _ in range(runs):
        for ttft, run_gaps, n in await asyncio.gather(*(one() for _ in range(concurrency))):
            if ttft is not None:
                ttfts.append(ttft)
            gaps.extend(run_gaps)
            tokens += n
    wall = time.perf_counter() - wall_started
    return {
        "runs": runs,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "mode": "raw_tokens" if use_raw else "token_events",
        "ttft_ms": _percentiles(ttfts),
        "itl_ms": _percentiles(gaps),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
    }
