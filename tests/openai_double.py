"""A test double of an OpenAI-compatible streaming chat server (vLLM/Ollama/SGLang serving deepseek-r1).

No such server can run on the CI machines (no GPU, no weights), so the orchestrator's OpenAI coordinator path is
tested against this real HTTP server on loopback that speaks the chat-completions SSE protocol. It runs in its
own thread so that tests can drive the orchestrator (a separate process) with blocking clients.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from grym_synth.inference.triton_process import free_port


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "deepseek-r1",
               "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


class OpenAIDouble:
    """``mode`` decides each answer: "plan" (reasoning then a JSON plan), "garbage", "stall", "bad_plan"."""

    def __init__(self) -> None:
        self.mode = "plan"
        self.plan: dict[str, Any] = {}
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None

    def start(self) -> "OpenAIDouble":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        self.requests.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in self._parts():
            if part is None:  # stall: hold the stream open, silent, longer than the client's token timeout
                await asyncio.sleep(5)
                continue
            await response.write(part)
            await asyncio.sleep(0.005)
        return response

    def _parts(self) -> list[bytes | None]:
        thinking = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "The user wants "}),
                    chunk({"reasoning_content": "a short ambient piece."})]
        if self.mode == "stall":
            return [*thinking, None]
        if self.mode == "garbage":
            return [*thinking, chunk({"content": "sure!! {{{ not json ]]"}), chunk({}, "stop"), b"data: [DONE]\n\n"]
        plan = json.dumps(self.plan)
        pieces = [plan[i: i + 40] for i in range(0, len(plan), 40)]
        return [*thinking, chunk({"content": "Here is the plan:\n```json\n"}),
                *[chunk({"content": p}) for p in pieces], chunk({"content": "\n```"}), chunk({}, "stop"),
                b"data: [DONE]\n\n"]

    def stop(self) -> None:
        if self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
            except TimeoutError:
                pass  # a handler still stalling; the daemon thread goes with the process
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
