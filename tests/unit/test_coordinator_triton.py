"""The Triton coordinator backend's two wire protocols (``grym`` tensors, Triton's vLLM backend) and its error
mapping, without a server: the requests it hands to the TritonClient and how it reads responses and failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grym_synth.coordinator.base import (
    Clock,
    CoordinatorRequestError,
    CoordinatorStreamError,
    CoordinatorTimeout,
    CoordinatorUnavailable,
)
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DownstreamError,
    ResourceExhausted,
    Unavailable,
)
from grym_synth.inference.export.coordinator import render_chat_prompt
from grym_synth.inference.triton_client import ClientError, TritonClient, _input, classify


@pytest.fixture
async def triton():
    client = TritonClient("127.0.0.1:1")  # never called: channels connect lazily
    yield client
    await client.close()


def _datatypes(inputs: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: _input(name, value).datatype() for name, value in inputs.items()}


async def test_grym_protocol_request_and_responses(triton: TritonClient) -> None:
    backend = TritonCoordinatorBackend(triton)
    inputs, outputs = backend._inputs("Hi ✓", 8, 0.5, 0.9, 3, ["END"])
    assert _datatypes(inputs) == {"prompt": "BYTES", "max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32",
                                  "seed": "INT64", "stop": "BYTES"}
    assert inputs["prompt"][0].decode() == "Hi ✓" and outputs == ["text", "token_id", "finish_reason"]
    assert list(backend._inputs("x", None, None, None, None, None)[0]) == ["prompt"]
    token = backend._parse({"text": np.array([b"ab"], dtype=object), "token_id": np.array([7], dtype=np.int64)})
    assert (token.token_id, token.text, token.finish_reason) == (7, "ab", None)
    token = backend._parse({"text": np.array([b""], dtype=object), "token_id": np.array([2], dtype=np.int64),
                            "finish_reason": np.array([b"length"], dtype=object)})
    assert token.finish_reason == "length"


async def test_vllm_protocol_request_and_responses(triton: TritonClient) -> None:
    backend = TritonCoordinatorBackend(triton, protocol="vllm")
    inputs, outputs = backend._inputs("Hi", 8, 0.5, None, 3, ["END"])
    assert _datatypes(inputs) == {"text_input": "BYTES", "stream": "BOOL", "sampling_parameters": "BYTES",
                                  "exclude_input_in_output": "BOOL", "return_finish_reason": "BOOL"}
    assert inputs["text_input"][0].decode() == render_chat_prompt("Hi")  # the vLLM backend takes raw text
    assert json.loads(inputs["sampling_parameters"][0]) == {"max_tokens": 8, "temperature": 0.5, "seed": 3,
                                                            "stop": ["END"]}
    assert outputs == ["text_output", "finish_reason"]
    token = backend._parse({"text_output": np.array([b"ab"], dtype=object),
                            "finish_reason": np.array([b"None"], dtype=object)})
    assert (token.token_id, token.text, token.finish_reason) == (-1, "ab", None)
    token = backend._parse({"text_output": np.array([b""], dtype=object),
                            "finish_reason": np.array([b"stop"], dtype=object)})
    assert token.finish_reason == "stop"


@pytest.mark.parametrize("error, kind, code", [
    (ClientError("triton:coordinator rejected the request: top_k must be > 0"), CoordinatorRequestError,
     "INVALID_ARGUMENT"),
    (Unavailable("triton:coordinator", "the model is not loaded"), CoordinatorUnavailable, "UNAVAILABLE"),
    (ResourceExhausted("triton:coordinator is overloaded; retry with backoff"), CoordinatorUnavailable,
     "UNAVAILABLE"),
    (Cancelled("triton:coordinator call cancelled"), CoordinatorUnavailable, "UNAVAILABLE"),
    (DownstreamError("triton:coordinator", "the model failed on this request"), CoordinatorStreamError, "INTERNAL"),
])
async def test_triton_errors_become_coordinator_errors(triton: TritonClient, error, kind, code) -> None:
    backend = TritonCoordinatorBackend(triton)
    mapped = backend._map_error(error, Clock(backend.endpoint, 1.0, None))
    assert type(mapped) is kind and mapped.code.name == code
    if kind is not CoordinatorRequestError:  # a refusal keeps the TritonClient's message, naming the model
        assert str(mapped).startswith(f"coordinator {backend.endpoint} ")
    assert "triton:coordinator is unavailable" not in str(mapped)  # the endpoint is named once


async def test_stall_and_deadline_are_told_apart(triton: TritonClient) -> None:
    backend = TritonCoordinatorBackend(triton, token_timeout_s=5.0)
    idle = backend._map_error(DeadlineExceeded("x"), Clock(backend.endpoint, 5.0, 60.0))
    assert isinstance(idle, CoordinatorTimeout) and "produced no token for 5.0s" in str(idle)
    late = backend._map_error(DeadlineExceeded("x"), Clock(backend.endpoint, 5.0, 0.0))
    assert isinstance(late, CoordinatorTimeout) and "deadline" in str(late)


def test_model_markers_are_classified() -> None:
    from tritonclient.utils import InferenceServerException

    refused = classify("coordinator", InferenceServerException("invalid request: max_tokens must be >= 1, got 0"),
                       client_bound=False)
    assert isinstance(refused, ClientError) and "max_tokens must be >= 1" in refused.message
    shed = classify("coordinator", InferenceServerException("overloaded: coordinator is at capacity, retry later"),
                    client_bound=False)
    assert isinstance(shed, ResourceExhausted)
    unloading = classify("coordinator", InferenceServerException("coordinator model is not ready (unloading): x"),
                         client_bound=False)
    assert isinstance(unloading, Unavailable)
