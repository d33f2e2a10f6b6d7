"""The coordinator LLM as the ``coordinator`` model in Triton, streamed through the app's
:class:`~grym_synth.inference.triton_client.TritonClient` — the one path to Triton, so the coordinator gets the same
breaker (``triton:coordinator``, downstream faults only), error mapping, secret header and error metrics as every
other model.

Two wire protocols: ``"grym"`` (our python-backend model: ``prompt``/``max_tokens``/... in, ``text``/``token_id``/
``finish_reason`` out, chat template applied server-side) and ``"vllm"`` (Triton's vLLM backend, see
``model_repository/coordinator/configs/vllm.pbtxt``: ``text_input``/``stream``/``sampling_parameters`` in,
``text_output`` out; the chat template is rendered here because that backend takes raw text).

The token-stall timeout is the stream's per-response idle timeout (``token_timeout_s``), the overall ``deadline_s``
the stream's deadline; Triton's failures arrive as :mod:`grym_synth.core.errors` types and leave as the coordinator's
own (:mod:`grym_synth.coordinator.base`), naming the endpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from grym_synth.coordinator.base import (
    DEFAULT_TOKEN_TIMEOUT_S,
    Clock,
    CoordinatorError,
    CoordinatorRequestError,
    CoordinatorStreamError,
    CoordinatorUnavailable,
    Kind,
    RawToken,
    TokenEvent,
    token_events,
    validate_sampling,
)
from grym_synth.coordinator.thinking import ThinkSplitter
from grym_synth.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    GrymError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from grym_synth.inference.export.coordinator import render_chat_prompt
from grym_synth.inference.triton_client import TritonClient


class TritonCoordinatorBackend:
    """Streams from the Triton ``coordinator`` model through ``triton`` (the app's :class:`TritonClient`)."""

    def __init__(
        self,
        triton: TritonClient,
        model_name: str = "coordinator",
        *,
        protocol: Literal["grym", "vllm"] = "grym",
        token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S,
        start_in_thinking: bool = True,
        json_schema: Mapping[str, Any] | None = None,
    ) -> None:
        self.triton = triton
        # The answer's JSON schema (grym_synth.coordinator.grammar.plan_answer_schema for Compose), sent with every
        # request: our model constrains the answer with llguidance, the vLLM backend with guided decoding.
        self.json_schema = json_schema
        self._schema_text = json.dumps(json_schema) if json_schema is not None else None
        self.model_name = model_name
        self.protocol = protocol
        self.token_timeout_s = token_timeout_s
        self.start_in_thinking = start_in_thinking
        self.endpoint = f"triton://{triton.url}/{model_name}"

    async def close(self) -> None:
        """Nothing of its own to release: the TritonClient belongs to its owner (the app closes it)."""

    # -- request building
    def _inputs(self, prompt: str, max_tokens, temperature, top_p, seed, stop) -> tuple[dict[str, np.ndarray],
                                                                                        list[str]]:
        if self.protocol == "vllm":
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
            if self.json_schema is not None:
                # Triton's vLLM backend maps this to vLLM's StructuredOutputsParams(json=...); with the engine's
                # reasoning parser (vllm_model.json) the constraint starts after </think>.
                sampling["guided_decoding"] = {"json": self.json_schema}
            inputs = {
                "text_input": np.array([render_chat_prompt(prompt).encode()], dtype=np.object_),
                "stream": np.array([True]),
                "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=np.object_),
                "exclude_input_in_output": np.array([True]),
                "return_finish_reason": np.array([True]),
            }
            return inputs, ["text_output", "finish_reason"]
        inputs = {"prompt": np.array([prompt.encode("utf-8")], dtype=np.object_)}
        if max_tokens is not None:
            inputs["max_tokens"] = np.array([max_tokens], dtype=np.int32)
        if temperature is not None:
            inputs["temperature"] = np.array([temperature], dtype=np.float32)
        if top_p is not None:
            inputs["top_p"] = np.array([top_p], dtype=np.float32)
        if seed is not None:
            inputs["seed"] = np.array([seed], dtype=np.int64)
        if stop:
            inputs["stop"] = np.array([s.encode("utf-8") for s in stop], dtype=np.object_)
        if self._schema_text is not None:
            inputs["json_schema"] = np.array([self._schema_text.encode("utf-8")], dtype=np.object_)
        return inputs, ["text", "token_id", "finish_reason"]

    def _map_error(self, err: GrymError, clock: Clock) -> CoordinatorError:
        """The TritonClient's error (already clean, naming ``triton:<model>``) as the coordinator's own type."""
        if isinstance(err, CoordinatorError):
            return err
        if isinstance(err, DeadlineExceeded):  # our stall timeout (the stream's idle timeout) or the deadline
            return clock.expired("deadline" if clock.passed() else "idle")
        if isinstance(err, InvalidArgument):
            return CoordinatorRequestError(self.endpoint, err.message)
        if isinstance(err, (Unavailable, ResourceExhausted, Cancelled)):
            return CoordinatorUnavailable(self.endpoint, _reason(err))
        if isinstance(err, DownstreamError):
            return CoordinatorStreamError(self.endpoint, _reason(err))
        return CoordinatorStreamError(self.endpoint, err.message)

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
        validate_sampling(max_tokens, temperature, top_p, self.endpoint)
        clock = Clock(self.endpoint, self.token_timeout_s, deadline_s)
        inputs, outputs = self._inputs(prompt, max_tokens, temperature, top_p, seed, stop)
        responses = self.triton.stream(self.model_name, inputs, outputs, deadline=clock.deadline,
                                       request_id=request_id, idle_timeout_s=self.token_timeout_s)
        try:
            async with contextlib.aclosing(responses) as items:
                async for response in items:
                    token = self._parse(response)
                    yield token
                    if token.finish_reason is not None:
                        return
        except GrymError as err:
            raise self._map_error(err, clock) from None
        # the model completed the request without a finish_reason (an empty final response)
        yield RawToken(-1, "", "stop", time.perf_counter())

    def _parse(self, response: Mapping[str, np.ndarray]) -> RawToken:
        now = time.perf_counter()
        reason = _first_str(response.get("finish_reason"))
        if self.protocol == "vllm":
            return RawToken(-1, _first_str(response.get("text_output")),
                            reason if reason and reason != "None" else None, now)
        token_ids = response.get("token_id")
        return RawToken(
            int(token_ids.reshape(-1)[0]) if token_ids is not None and token_ids.size else -1,
            _first_str(response.get("text")),
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
                for event in token_events(splitter.feed(token.text), index):
                    yield event
                if token.finish_reason is not None:
                    for event in token_events(splitter.flush(), index):
                        yield event
                    kind: Kind = "thinking" if splitter.in_thinking else "answer"
                    yield TokenEvent("", kind, index, finish_reason=token.finish_reason)
                    return


def _reason(err: GrymError) -> str:
    """The message of ``err`` without its "triton:<model> is unavailable: " / "... failed: " prefix (the coordinator's
    error names the endpoint itself)."""
    downstream = getattr(err, "downstream", "")
    for prefix in (f"{downstream} is unavailable: ", f"{downstream} failed: "):
        if downstream and err.message.startswith(prefix):
            return err.message[len(prefix):]
    return err.message


def _first_str(array: np.ndarray | None) -> str:
    if array is None:
        return ""
    value = array.reshape(-1)[0] if array.size else b""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
