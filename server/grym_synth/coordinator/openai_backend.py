"""The coordinator LLM behind any OpenAI-compatible ``/v1/chat/completions`` endpoint, streamed as server-sent
events (vLLM, SGLang, Ollama, llama.cpp server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from grym_synth.coordinator.base import (
    DEFAULT_TOKEN_TIMEOUT_S,
    Clock,
    CoordinatorRequestError,
    CoordinatorStreamError,
    CoordinatorUnavailable,
    Kind,
    TokenEvent,
    token_events,
    validate_sampling,
)
from grym_synth.coordinator.thinking import ThinkSplitter


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
        json_schema: dict[str, Any] | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.api_key = api_key
        self.token_timeout_s = token_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.start_in_thinking = start_in_thinking
        # The answer's JSON schema, sent as OpenAI's structured output (``response_format: json_schema``): vLLM
        # applies it with guided decoding (after </think> when it runs a reasoning parser), llama.cpp server and
        # Ollama with their grammars.
        self.json_schema = json_schema
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
        if self.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "grym_plan", "schema": self.json_schema, "strict": True}}
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

        validate_sampling(max_tokens, temperature, top_p, self.endpoint)
        clock = Clock(self.endpoint, self.token_timeout_s, deadline_s)
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
                            for event in token_events(splitter.feed(content), index):
                                yield event
                        finish_reason = choice.get("finish_reason") or finish_reason
            if not done and finish_reason is None:
                raise CoordinatorUnavailable(self.endpoint, "stream closed before completion")
            for event in token_events(splitter.flush(), index):
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

    async def _sse(self, response, clock: Clock) -> AsyncIterator[str]:
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
