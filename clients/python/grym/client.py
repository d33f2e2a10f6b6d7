"""Python client for grym-synth: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both wrap the generated ``grym.v1`` stubs with the conveniences a caller wants: WAV files or numpy arrays in,
plain Python values out, long audio streamed in chunks, a deadline on every call, and gRPC errors raised as
:class:`GrymError` with the status code and the server's message.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grym.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

AudioLike = bytes | str | Path | np.ndarray


class GrymError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "GrymError":
        return cls(err.code(), err.details() or "")


@dataclass
class Analysis:
    request_id: str
    frames: int
    embedding: np.ndarray
    duration_seconds: float
    features: np.ndarray | None
    pattern_id: str
    tags: dict[str, str]


def audio_input(audio: AudioLike, sample_rate_hz: int | None = None) -> common_pb2.AudioInput:
    """A WAV path or WAV bytes, or a float32 numpy array with its sample rate (mono, or frames x channels)."""
    if isinstance(audio, np.ndarray):
        if not sample_rate_hz:
            raise ValueError("sample_rate_hz is required with a numpy array")
        arr = np.ascontiguousarray(audio, dtype="<f4")
        channels = 1 if arr.ndim == 1 else int(arr.shape[1])
        return common_pb2.AudioInput(pcm=common_pb2.PcmAudio(
            data=arr.tobytes(), sample_rate_hz=sample_rate_hz, channels=channels,
            encoding=common_pb2.PcmAudio.ENCODING_FLOAT32))
    data = Path(audio).read_bytes() if isinstance(audio, (str, Path)) else audio
    return common_pb2.AudioInput(wav=data)


def _analysis(resp: pb.AnalyzeAudioResponse) -> Analysis:
    feats = None
    if resp.HasField("features"):
        feats = np.asarray(resp.features.values, dtype=np.float32).reshape(resp.features.rows, resp.features.cols)
    return Analysis(resp.request_id, resp.frames, np.asarray(resp.embedding, dtype=np.float32),
                    resp.duration_seconds, feats, resp.pattern_id, dict(resp.tags))


def _analyze_request(audio: AudioLike, sample_rate_hz: int | None, include_features: bool, store: bool,
                     tags: Mapping[str, str] | None, source: str, request_id: str | None) -> pb.AnalyzeAudioRequest:
    return pb.AnalyzeAudioRequest(request_id=request_id or uuid.uuid4().hex,
                                  audio=audio_input(audio, sample_rate_hz), include_features=include_features,
                                  store=store, tags=dict(tags or {}), source=source)


def _stream_requests(samples: np.ndarray, sample_rate_hz: int, include_features: bool, store: bool,
                     tags: Mapping[str, str] | None, request_id: str | None) -> Iterator[pb.StreamAnalyzeRequest]:
    arr = np.ascontiguousarray(samples, dtype="<f4")
    channels = 1 if arr.ndim == 1 else int(arr.shape[1])
    yield pb.StreamAnalyzeRequest(request_id=request_id or uuid.uuid4().hex, config=pb.StreamAnalyzeConfig(
        sample_rate_hz=sample_rate_hz, channels=channels, encoding=common_pb2.PcmAudio.ENCODING_FLOAT32,
        include_features=include_features, store=store, tags=dict(tags or {})))
    data = arr.tobytes()
    step = CHUNK_BYTES - CHUNK_BYTES % (4 * channels)
    for i in range(0, len(data), step):
        yield pb.StreamAnalyzeRequest(audio_content=data[i: i + step])


# Scheduler name -> proto enum value, read from the proto's GenerateRequest.Scheduler enum (the one list the client
# sees): SCHEDULER_<NAME> is "<name>", except DPM_SOLVER, which the server calls "dpm".
_SCHEDULER_SPELLING = {"DPM_SOLVER": "dpm"}
SCHEDULERS = {_SCHEDULER_SPELLING.get(name[len("SCHEDULER_"):], name[len("SCHEDULER_"):].lower()): value
              for name, value in pb.GenerateRequest.Scheduler.items()
              if value != pb.GenerateRequest.SCHEDULER_UNSPECIFIED}
DEFAULT_SCHEDULER = "ddim"  # what the server uses for SCHEDULER_UNSPECIFIED (AudioLDM's own)


def _generate_request(prompt: str, *, seconds: float, steps: int, guidance_scale: float | None, seed: int | None,
                      negative_prompt: str, scheduler: str, store: bool, tags: Mapping[str, str] | None,
                      request_id: str | None) -> pb.GenerateRequest:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}")
    req = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, prompt=prompt,
                             negative_prompt=negative_prompt, duration_seconds=seconds, steps=steps,
                             scheduler=SCHEDULERS[scheduler], store=store, tags=dict(tags or {}))
    if guidance_scale is not None:
        req.guidance_scale = guidance_scale
    if seed is not None:
        req.seed = seed
    return req


def wav_from_events(events: Sequence[pb.GenerateResponse] | Sequence[pb.ComposeResponse]) -> bytes:
    """Join the audio chunks of a Generate or Compose stream into one WAV file."""
    chunks = sorted((e.audio for e in events if e.WhichOneof("event") == "audio"), key=lambda a: a.chunk_index)
    return b"".join(c.wav_data for c in chunks)


def _search_request(embedding: Sequence[float] | None, pattern_id: str | None, top_k: int,
                    tag_filter: Mapping[str, str] | None) -> pb.SearchPatternsRequest:
    req = pb.SearchPatternsRequest(top_k=top_k, tag_filter=dict(tag_filter or {}))
    if pattern_id:
        req.pattern_id = pattern_id
    elif embedding is not None:
        req.embedding.values.extend([float(x) for x in embedding])
    return req


class Client:
    """Blocking client. ``with Client("localhost:50051") as c: c.analyze("song.wav")``."""

    def __init__(self, target: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        self.channel = (grpc.secure_channel(target, credentials, CHANNEL_OPTIONS) if credentials
                        else grpc.insecure_channel(target, CHANNEL_OPTIONS))
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def _call(self, fn, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return fn(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None

    def analyze(self, audio: AudioLike, *, sample_rate_hz: int | None = None, include_features: bool = False,
                store: bool = False, tags: Mapping[str, str] | None = None, source: str = "",
                request_id: str | None = None, timeout_s: float | None = None) -> Analysis:
        req = _analyze_request(audio, sample_rate_hz, include_features, store, tags, source, request_id)
        return _analysis(self._call(self.stub.AnalyzeAudio, req, timeout_s))

    def stream_analyze(self, samples: np.ndarray, sample_rate_hz: int, *, include_features: bool = False,
                       store: bool = False, tags: Mapping[str, str] | None = None,
                       request_id: str | None = None) -> Iterator[pb.StreamAnalyzeResponse]:
        reqs = _stream_requests(samples, sample_rate_hz, include_features, store, tags, request_id)
        yield from self._server_stream(self.stub.StreamAnalyze(reqs, timeout=self.timeout_s, metadata=self.metadata))

    def generate(self, prompt: str, *, seconds: float = 0.0, steps: int = 0, guidance_scale: float | None = None,
                 seed: int | None = None, negative_prompt: str = "", scheduler: str = DEFAULT_SCHEDULER,
                 store: bool = False, tags: Mapping[str, str] | None = None, request_id: str | None = None,
                 timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        """The Generate event stream: progress events, audio chunks, then one result (see wav_from_events).
        ``seconds``/``steps`` 0 and ``guidance_scale`` None take the server's defaults."""
        req = _generate_request(prompt, seconds=seconds, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                negative_prompt=negative_prompt, scheduler=scheduler, store=store, tags=tags,
                                request_id=request_id)
        yield from self._server_stream(self.stub.Generate(req, timeout=timeout_s or self.timeout_s,
                                                          metadata=self.metadata))

    @staticmethod
    def _server_stream(call):  # type: ignore[no-untyped-def]
        """Iterate a streaming call; a consumer that stops early cancels it, so the server stops working."""
        try:
            yield from call
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None
        finally:
            call.cancel()  # no-op when the call already finished

    def compose(self, request: str, *, max_tokens: int = 0, seed: int | None = None,
                tags: Mapping[str, str] | None = None, request_id: str | None = None,
                timeout_s: float | None = None) -> Iterator[pb.ComposeResponse]:
        """The Compose event stream: coordinator tokens, the plan, step events, features, audio, summary."""
        req = pb.ComposeRequest(request_id=request_id or uuid.uuid4().hex, request=request, max_tokens=max_tokens,
                                tags=dict(tags or {}))
        if seed is not None:
            req.seed = seed
        yield from self._server_stream(self.stub.Compose(req, timeout=timeout_s or self.timeout_s,
                                                         metadata=self.metadata))

    def get_workflow(self, workflow_id: str) -> pb.Workflow:
        return self._call(self.stub.GetWorkflow, pb.GetWorkflowRequest(workflow_id=workflow_id)).workflow

    def list_workflows(self, *, page_size: int = 0) -> list[pb.Workflow]:  # 0: the server's page size
        return list(self._call(self.stub.ListWorkflows, pb.ListWorkflowsRequest(page_size=page_size)).workflows)

    def clusters(self, cluster_count: int = 0) -> list[pb.PatternCluster]:
        return list(self._call(self.stub.ListPatternClusters,
                               pb.ListPatternClustersRequest(cluster_count=cluster_count)).clusters)

    def rate(self, pattern_id: str, rating: int, comment: str = "") -> pb.RatePatternResponse:
        return self._call(self.stub.RatePattern, pb.RatePatternRequest(pattern_id=pattern_id, rating=rating,
                                                                       comment=comment))

    def search(self, *, embedding: Sequence[float] | None = None, pattern_id: str | None = None, top_k: int = 0,
               tag_filter: Mapping[str, str] | None = None) -> list[pb.PatternMatch]:  # top_k 0: the server's
        return list(self._call(self.stub.SearchPatterns,
                               _search_request(embedding, pattern_id, top_k, tag_filter)).matches)

    def get_pattern(self, pattern_id: str, include_embedding: bool = False) -> common_pb2.Pattern:
        return self._call(self.stub.GetPattern, pb.GetPatternRequest(
            pattern_id=pattern_id, include_embedding=include_embedding)).pattern

    def delete_pattern(self, pattern_id: str) -> None:
        self._call(self.stub.DeletePattern, pb.DeletePatternRequest(pattern_id=pattern_id))

    def list_patterns(self, *, page_size: int = 0, tag_filter: Mapping[str, str] | None = None
                      ) -> Iterator[common_pb2.Pattern]:
        """All stored patterns, newest first, fetched page by page (``page_size`` 0: the server's)."""
        token = ""
        while True:
            resp = self._call(self.stub.ListPatterns, pb.ListPatternsRequest(
                page_size=page_size, page_token=token, tag_filter=dict(tag_filter or {})))
            yield from resp.patterns
            if not (token := resp.next_page_token):
                return

    def health(self, service: str = "") -> str:
        resp = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client. ``async with AsyncClient("localhost:50051") as c: await c.analyze(...)``."""

    def __init__(self, target: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        self.channel = (grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS) if credentials
                        else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS))
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    async def _call(self, fn, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return await fn(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None

    async def analyze(self, audio: AudioLike, *, sample_rate_hz: int | None = None, include_features: bool = False,
                      store: bool = False, tags: Mapping[str, str] | None = None, source: str = "",
                      request_id: str | None = None, timeout_s: float | None = None) -> Analysis:
        req = _analyze_request(audio, sample_rate_hz, include_features, store, tags, source, request_id)
        return _analysis(await self._call(self.stub.AnalyzeAudio, req, timeout_s))

    async def stream_analyze(self, samples: np.ndarray, sample_rate_hz: int, *, include_features: bool = False,
                             store: bool = False, tags: Mapping[str, str] | None = None,
                             request_id: str | None = None) -> AsyncIterator[pb.StreamAnalyzeResponse]:
        reqs = _stream_requests(samples, sample_rate_hz, include_features, store, tags, request_id)
        async for resp in self._server_stream(self.stub.StreamAnalyze(reqs, timeout=self.timeout_s,
                                                                      metadata=self.metadata)):
            yield resp

    @staticmethod
    async def _server_stream(call):  # type: ignore[no-untyped-def]
        """Iterate a streaming call; a consumer that stops early (break, cancellation) cancels it."""
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str, *, seconds: float = 0.0, steps: int = 0,
                       guidance_scale: float | None = None, seed: int | None = None, negative_prompt: str = "",
                       scheduler: str = DEFAULT_SCHEDULER, store: bool = False, tags: Mapping[str, str] | None = None,
                       request_id: str | None = None,
                       timeout_s: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        req = _generate_request(prompt, seconds=seconds, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                negative_prompt=negative_prompt, scheduler=scheduler, store=store, tags=tags,
                                request_id=request_id)
        async for event in self._server_stream(self.stub.Generate(req, timeout=timeout_s or self.timeout_s,
                                                                   metadata=self.metadata)):
            yield event

    async def compose(self, request: str, *, max_tokens: int = 0, seed: int | None = None,
                      tags: Mapping[str, str] | None = None, request_id: str | None = None,
                      timeout_s: float | None = None) -> AsyncIterator[pb.ComposeResponse]:
        req = pb.ComposeRequest(request_id=request_id or uuid.uuid4().hex, request=request, max_tokens=max_tokens,
                                tags=dict(tags or {}))
        if seed is not None:
            req.seed = seed
        async for event in self._server_stream(self.stub.Compose(req, timeout=timeout_s or self.timeout_s,
                                                                 metadata=self.metadata)):
            yield event

    async def search(self, *, embedding: Sequence[float] | None = None, pattern_id: str | None = None,
                     top_k: int = 0, tag_filter: Mapping[str, str] | None = None) -> list[pb.PatternMatch]:
        resp = await self._call(self.stub.SearchPatterns, _search_request(embedding, pattern_id, top_k, tag_filter))
        return list(resp.matches)

    async def get_pattern(self, pattern_id: str, include_embedding: bool = False) -> common_pb2.Pattern:
        resp = await self._call(self.stub.GetPattern, pb.GetPatternRequest(
            pattern_id=pattern_id, include_embedding=include_embedding))
        return resp.pattern

    async def delete_pattern(self, pattern_id: str) -> None:
        await self._call(self.stub.DeletePattern, pb.DeletePatternRequest(pattern_id=pattern_id))

    async def health(self, service: str = "") -> str:
        resp = await self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
