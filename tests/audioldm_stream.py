"""A tritonclient gRPC stream to the decoupled ``audioldm`` pipeline model, shared by its tests and benchmarks.

One stream carries several generations; responses are routed by request id and recorded in order as "progress",
"audio", "final" or "error" (tests/integration/test_audioldm_triton.py, test_audio_to_audio.py and
scripts/bench_audio_to_audio.py talk to the model through this one client).
"""

from __future__ import annotations

import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as tritonclient_grpc

PIPELINE = "audioldm"
# The pipeline model's non-string inputs (config.pbtxt); everything else is a BYTES string.
TYPES: dict[str, tuple[Any, str]] = {"seed": (np.int64, "INT64"), "steps": (np.int32, "INT32"),
                                     "guidance_scale": (np.float32, "FP32"), "duration_s": (np.float32, "FP32"),
                                     "init_strength": (np.float32, "FP32"), "context_s": (np.float32, "FP32")}


def inputs(values: dict[str, Any]) -> list[tritonclient_grpc.InferInput]:
    """Triton inputs for one generation; ``None`` values are left out (the model's default)."""
    tensors = []
    for name, value in values.items():
        if value is None:
            continue
        if name == "init_audio":
            array, dtype = np.asarray(value, dtype=np.float32).reshape(-1), "FP32"
        elif name in TYPES:
            array, dtype = np.array([value], dtype=TYPES[name][0]), TYPES[name][1]
        else:
            array, dtype = np.array([str(value).encode()], dtype=object), "BYTES"
        tensor = tritonclient_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


@dataclass
class Stream:
    """What one generation streamed back, in order."""

    events: list[str] = field(default_factory=list)  # "progress" | "audio" | "final" | "error"
    steps: list[tuple[int, int]] = field(default_factory=list)
    waveform: np.ndarray | None = None
    context: np.ndarray | None = None  # CONTINUE: the context the continuation was generated after
    sample_rate: int | None = None
    seed: int | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return "final" in self.events or "error" in self.events


class StreamClient:
    """Several generations on one stream; ``prompt`` is used when a submit names none (``prompt=None`` omits it)."""

    def __init__(self, url: str, prompt: str) -> None:
        self.prompt = prompt
        self.client = tritonclient_grpc.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.streams: dict[str, Stream] = {}

    def submit(self, **values: Any) -> str:
        request_id = uuid.uuid4().hex[:12]
        self.streams[request_id] = Stream()
        self.client.async_stream_infer(PIPELINE, inputs({"prompt": self.prompt} | values), request_id=request_id,
                                       enable_empty_final_response=True)
        return request_id

    def pump(self, timeout: float = 60.0) -> tuple[str, Stream]:
        """Handle one response; returns (request id, its stream). An error carries no id, so it is attributed only
        when one request is pending."""
        result, error = self.responses.get(timeout=timeout)
        if error is not None:
            pending = [rid for rid, s in self.streams.items() if not s.done]
            if len(pending) != 1:
                raise AssertionError(f"unattributable error with {len(pending)} requests pending: {error}")
            stream = self.streams[pending[0]]
            stream.events.append("error")
            stream.error = str(error)
            return pending[0], stream
        response = result.get_response()
        stream = self.streams[response.id]
        names = {o.name for o in response.outputs}
        if response.parameters["triton_final_response"].bool_param and not names:
            stream.events.append("final")
        elif "waveform" in names:
            stream.events.append("audio")
            stream.waveform = result.as_numpy("waveform")
            stream.context = result.as_numpy("context_waveform") if "context_waveform" in names else None
            stream.sample_rate = int(result.as_numpy("sample_rate")[0]) if "sample_rate" in names else None
            stream.seed = int(result.as_numpy("seed")[0]) if "seed" in names else None
        else:
            stream.events.append("progress")
            stream.steps.append((int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0])))
        return response.id, stream

    def wait_all(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(s.done for s in self.streams.values()):
            self.pump(timeout=max(0.1, deadline - time.monotonic()))

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def generate(url: str, prompt: str, timeout: float = 120.0, **values: Any) -> Stream:
    """One generation to its end (final response or error)."""
    client = StreamClient(url, prompt)
    try:
        rid = client.submit(**values)
        client.wait_all(timeout)
        return client.streams[rid]
    finally:
        client.close()
