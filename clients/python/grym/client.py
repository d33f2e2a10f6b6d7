"""Python client for grym-synth: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both wrap the generated ``grym.v1`` stubs with the conveniences a caller wants: audio files or numpy arrays in,
plain Python values out, long audio streamed in chunks, a deadline on every call, bearer-token and TLS set-up,
and gRPC errors raised as :class:`GrymError` with the status code and the server's message. The request builders
(``*_request``) are public so that scripts (and the ``grym`` CLI) can send exactly what they mean and read every
field of the answer through :meth:`Client.call`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grym.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 5.0
CHUNK_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# The health services the orchestrator registers ("" is the whole server); used to explain a NOT_FOUND.
HEALTH_SERVICES = ("", "triton", "milvus", "generation")

AudioLike = bytes | str | Path | np.ndarray


class GrymError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "GrymError":
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        return cls(code, (err.details() if callable(getattr(err, "details", None)) else "") or "")


@dataclass
class Analysis:
    request_id: str
    frames: int
    embedding: np.ndarray
    duration_seconds: float
    features: np.ndarray | None
    pattern_id: str
    tags: dict[str, str]
    model: str = ""
    profile: str = ""
    # The music description (tempo, key, tags, notes with music_detail="full"); None when the server sent none.
    music: common_pb2.MusicDescription | None = None
    # The whole answer, for fields this summary does not unpack.
    response: pb.AnalyzeAudioResponse = field(default_factory=pb.AnalyzeAudioResponse, repr=False)


# --- credentials ----------------------------------------------------------------------------------------------------
def read_token(token_file: str | Path | None = None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$GRYM_TOKEN``, else None (no token).

    A missing or empty file raises ``ValueError``: a token the user asked for must not silently vanish."""
    if token_file:
        try:
            lines = Path(token_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read token file {str(token_file)!r}: {exc.strerror}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"token file {str(token_file)!r} is empty")
        return token
    return os.environ.get("GRYM_TOKEN", "").strip() or None


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: ``ca`` verifies the server (None: the system roots); ``cert`` + ``key`` are the client's
    certificate for a server that demands one (mTLS). Unreadable files raise ``ValueError``."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")

    def read(path: str | Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(root_certificates=read(ca, "TLS CA"), private_key=read(key, "TLS key"),
                                        certificate_chain=read(cert, "TLS certificate"))


# --- output formats -------------------------------------------------------------------------------------------------
# Format name (CLI --format) -> AudioFormat, and the file extensions each may be written to.
FORMATS: dict[str, int] = {
    "wav": common_pb2.AUDIO_FORMAT_WAV_PCM16, "wav24": common_pb2.AUDIO_FORMAT_WAV_PCM24,
    "flac": common_pb2.AUDIO_FORMAT_FLAC, "opus": common_pb2.AUDIO_FORMAT_OGG_OPUS,
    "vorbis": common_pb2.AUDIO_FORMAT_OGG_VORBIS, "mp3": common_pb2.AUDIO_FORMAT_MP3,
}
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "wav": (".wav",), "wav24": (".wav",), "flac": (".flac",), "opus": (".ogg", ".opus"), "vorbis": (".ogg",),
    "mp3": (".mp3",),
}
# The format an extension means when --format is not given (.ogg: Opus, the better codec at every bitrate).
EXTENSION_FORMATS = {".wav": "wav", ".flac": "flac", ".ogg": "opus", ".opus": "opus", ".mp3": "mp3"}


def output_format(path: str | Path, fmt: str | None = None) -> int:
    """The AudioFormat to request for writing ``path``: from ``fmt`` when given (it must suit the extension),
    else from the extension. An unknown extension or a mismatch raises ``ValueError``."""
    ext = Path(path).suffix.lower()
    if fmt is None:
        if ext not in EXTENSION_FORMATS:
            raise ValueError(f"cannot tell the audio format of {str(path)!r}: use one of "
                             f"{', '.join(sorted(EXTENSION_FORMATS))}")
        fmt = EXTENSION_FORMATS[ext]
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if ext not in FORMAT_EXTENSIONS[fmt]:
        raise ValueError(f"format {fmt} is written to {' or '.join(FORMAT_EXTENSIONS[fmt])} files, not {str(path)!r}")
    return FORMATS[fmt]


def same_format(requested: int, returned: int) -> bool:
    """Whether audio the server sent in ``returned`` is what was asked for (unset means 16-bit WAV both ways)."""
    wav16 = {common_pb2.AUDIO_FORMAT_UNSPECIFIED, common_pb2.AUDIO_FORMAT_WAV_PCM16}
    return requested == returned or (requested in wav16 and returned in wav16)


# --- request builders -----------------------------------------------------------------------------------------------
MUSIC_DETAILS = {"none": common_pb2.MUSIC_DETAIL_NONE, "summary": common_pb2.MUSIC_DETAIL_SUMMARY,
                 "full": common_pb2.MUSIC_DETAIL_FULL}
SPACES = {"music": pb.SearchPatternsRequest.SPACE_MUSIC, "wav2vec2": pb.SearchPatternsRequest.SPACE_WAV2VEC2}
MODES = {"text": pb.GenerateRequest.MODE_TEXT, "vary": pb.GenerateRequest.MODE_VARY,
         "continue": pb.GenerateRequest.MODE_CONTINUE}


def _enum(table: Mapping[str, int], name: str | None, what: str) -> int:
    if name is None:
        return 0
    if name not in table:
        raise ValueError(f"{what} must be one of {', '.join(table)}, not {name!r}")
    return table[name]


def audio_input(audio: AudioLike, sample_rate_hz: int | None = None) -> common_pb2.AudioInput:
    """An audio file (path or bytes: WAV, or FLAC/OGG/MP3 where the server decodes them), or a float32 numpy
    array with its sample rate (mono, or frames x channels)."""
    if isinstance(audio, np.ndarray):
        if not sample_rate_hz:
            raise ValueError("sample_rate_hz is required with a numpy array")
        arr = np.ascontiguousarray(audio, dtype="<f4")
        channels = 1 if arr.ndim == 1 else int(arr.shape[1])
        return common_pb2.AudioInput(pcm=common_pb2.PcmAudio(
            data=arr.tobytes(), sample_rate_hz=sample_rate_hz, channels=channels,
            encoding=common_pb2.PcmAudio.ENCODING_FLOAT32))
    data = Path(audio).read_bytes() if isinstance(audio, (str, Path)) else audio
    # `wav` (field 1) is read exactly like `file` and is understood by servers of every version.
    return common_pb2.AudioInput(wav=data)


def _analysis(resp: pb.AnalyzeAudioResponse) -> Analysis:
    feats = None
    if resp.HasField("features"):
        feats = np.asarray(resp.features.values, dtype=np.float32).reshape(resp.features.rows, resp.features.cols)
    return Analysis(resp.request_id, resp.frames, np.asarray(resp.embedding, dtype=np.float32),
                    resp.duration_seconds, feats, resp.pattern_id, dict(resp.tags), model=resp.model,
                    profile=resp.profile, music=resp.music if resp.HasField("music") else None, response=resp)


def analyze_request(audio: AudioLike, sample_rate_hz: int | None = None, include_features: bool = False,
                    store: bool = False, tags: Mapping[str, str] | None = None, source: str = "",
                    request_id: str | None = None, music_detail: str | None = None) -> pb.AnalyzeAudioRequest:
    return pb.AnalyzeAudioRequest(request_id=request_id or uuid.uuid4().hex,
                                  audio=audio_input(audio, sample_rate_hz), include_features=include_features,
                                  store=store, tags=dict(tags or {}), source=source,
                                  music_detail=_enum(MUSIC_DETAILS, music_detail, "music_detail"))


def stream_requests(samples: np.ndarray, sample_rate_hz: int, include_features: bool = False, store: bool = False,
                    tags: Mapping[str, str] | None = None, request_id: str | None = None,
                    music_detail: str | None = None) -> Iterator[pb.StreamAnalyzeRequest]:
    """The StreamAnalyze messages: the config, then float32 PCM chunks of at most CHUNK_BYTES."""
    arr = np.ascontiguousarray(samples, dtype="<f4")
    channels = 1 if arr.ndim == 1 else int(arr.shape[1])
    yield pb.StreamAnalyzeRequest(request_id=request_id or uuid.uuid4().hex, config=pb.StreamAnalyzeConfig(
        sample_rate_hz=sample_rate_hz, channels=channels, encoding=common_pb2.PcmAudio.ENCODING_FLOAT32,
        include_features=include_features, store=store, tags=dict(tags or {}),
        music_detail=_enum(MUSIC_DETAILS, music_detail, "music_detail")))
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


def generate_request(prompt: str, *, seconds: float = 0.0, steps: int = 0, guidance_scale: float | None = None,
                     seed: int | None = None, negative_prompt: str = "", scheduler: str = DEFAULT_SCHEDULER,
                     store: bool = False, tags: Mapping[str, str] | None = None, request_id: str | None = None,
                     output_format: int = 0, mode: str | None = None, init_audio: AudioLike | None = None,
                     init_pattern_id: str = "", init_strength: float | None = None) -> pb.GenerateRequest:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}")
    if init_audio is not None and init_pattern_id:
        raise ValueError("init audio and an init pattern exclude each other")
    req = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, prompt=prompt,
                             negative_prompt=negative_prompt, duration_seconds=seconds, steps=steps,
                             scheduler=SCHEDULERS[scheduler], store=store, tags=dict(tags or {}),
                             output_format=output_format, mode=_enum(MODES, mode, "mode"),
                             init_pattern_id=init_pattern_id)
    if init_audio is not None:
        req.init_audio.CopyFrom(audio_input(init_audio))
    if guidance_scale is not None:
        req.guidance_scale = guidance_scale
    if seed is not None:
        req.seed = seed
    if init_strength is not None:
        req.init_strength = init_strength
    return req


def compose_request(request: str, *, max_tokens: int = 0, seed: int | None = None,
                    tags: Mapping[str, str] | None = None, request_id: str | None = None, output_format: int = 0,
                    seconds: float = 0.0) -> pb.ComposeRequest:
    req = pb.ComposeRequest(request_id=request_id or uuid.uuid4().hex, request=request, max_tokens=max_tokens,
                            tags=dict(tags or {}), output_format=output_format, duration_seconds=seconds)
    if seed is not None:
        req.seed = seed
    return req


def wav_from_events(events: Sequence[pb.GenerateResponse] | Sequence[pb.ComposeResponse]) -> bytes:
    """Join the audio chunks of a Generate or Compose stream into one file (WAV unless another format was asked)."""
    chunks = sorted((e.audio for e in events if e.WhichOneof("event") == "audio"), key=lambda a: a.chunk_index)
    return b"".join(c.wav_data for c in chunks)


def music_filter(*, min_tempo_bpm: float = 0.0, max_tempo_bpm: float = 0.0, key: str = "",
                 tags: Sequence[str] = ()) -> pb.MusicFilter | None:
    """A MusicFilter, or None when no bound is set (so that the request carries none)."""
    if not (min_tempo_bpm or max_tempo_bpm or key or tags):
        return None
    return pb.MusicFilter(min_tempo_bpm=min_tempo_bpm, max_tempo_bpm=max_tempo_bpm, key=key, tags=list(tags))


def search_request(embedding: Sequence[float] | None = None, pattern_id: str | None = None, top_k: int = 0,
                   tag_filter: Mapping[str, str] | None = None, *, text: str | None = None, space: str | None = None,
                   music: pb.MusicFilter | None = None, include_embedding: bool = False,
                   request_id: str | None = None) -> pb.SearchPatternsRequest:
    if [embedding is not None, bool(pattern_id), bool(text)].count(True) != 1:
        raise ValueError("search needs exactly one of an embedding, a pattern id or a text")
    req = pb.SearchPatternsRequest(request_id=request_id or uuid.uuid4().hex, top_k=top_k,
                                   tag_filter=dict(tag_filter or {}), include_embedding=include_embedding,
                                   space=_enum(SPACES, space, "space"))
    if pattern_id:
        req.pattern_id = pattern_id
    elif text:
        req.text = text
    elif embedding is not None:
        req.embedding.values.extend([float(x) for x in embedding])
    if music is not None:
        req.music_filter.CopyFrom(music)
    return req


def describe_request(audio: AudioLike | None = None, pattern_id: str | None = None,
                     request_id: str | None = None) -> pb.DescribeAudioRequest:
    if (audio is None) == (not pattern_id):
        raise ValueError("describe needs exactly one of audio or a pattern id")
    req = pb.DescribeAudioRequest(request_id=request_id or uuid.uuid4().hex)
    if pattern_id:
        req.pattern_id = pattern_id
    else:
        req.audio.CopyFrom(audio_input(audio))  # type: ignore[arg-type]
    return req


def _health_error(err: GrymError, service: str) -> GrymError:
    """The health service answers an unknown name with a bare NOT_FOUND: say what the known names are."""
    if err.code == grpc.StatusCode.NOT_FOUND and not err.message.strip():
        known = ", ".join(repr(s) for s in HEALTH_SERVICES)
        return GrymError(err.code, f"the server has no health service {service!r}; known: {known} ('' is the "
                                   "whole server)")
    return err


class Client:
    """Blocking client. ``with Client("localhost:50051") as c: c.analyze("song.wav")``.

    ``token`` is sent as ``authorization: Bearer <token>``; ``credentials`` (see :func:`channel_credentials`)
    switches the channel to TLS."""

    def __init__(self, target: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        opts = [*CHANNEL_OPTIONS, *options]
        self.channel = (grpc.secure_channel(target, credentials, opts) if credentials
                        else grpc.insecure_channel(target, opts))
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def _call(self, fn, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return fn(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """One unary RPC by name (``"GetPattern"``), returning the whole response message."""
        return self._call(getattr(self.stub, method), request, timeout_s)

    def stream(self, method: str, request: Any, timeout_s: float | None = None) -> Iterator[Any]:
        """One server-streaming (or, with an iterator of requests, bidirectional) RPC by name."""
        yield from self._server_stream(getattr(self.stub, method)(request, timeout=timeout_s or self.timeout_s,
                                                                   metadata=self.metadata))

    def analyze(self, audio: AudioLike, *, sample_rate_hz: int | None = None, include_features: bool = False,
                store: bool = False, tags: Mapping[str, str] | None = None, source: str = "",
                request_id: str | None = None, timeout_s: float | None = None,
                music_detail: str | None = None) -> Analysis:
        req = analyze_request(audio, sample_rate_hz, include_features, store, tags, source, request_id, music_detail)
        return _analysis(self._call(self.stub.AnalyzeAudio, req, timeout_s))

    def stream_analyze(self, samples: np.ndarray, sample_rate_hz: int, *, include_features: bool = False,
                       store: bool = False, tags: Mapping[str, str] | None = None,
                       request_id: str | None = None, music_detail: str | None = None,
                       timeout_s: float | None = None) -> Iterator[pb.StreamAnalyzeResponse]:
        reqs = stream_requests(samples, sample_rate_hz, include_features, store, tags, request_id, music_detail)
        yield from self.stream("StreamAnalyze", reqs, timeout_s)

    def generate(self, prompt: str, *, seconds: float = 0.0, steps: int = 0, guidance_scale: float | None = None,
                 seed: int | None = None, negative_prompt: str = "", scheduler: str = DEFAULT_SCHEDULER,
                 store: bool = False, tags: Mapping[str, str] | None = None, request_id: str | None = None,
                 timeout_s: float | None = None, **new: Any) -> Iterator[pb.GenerateResponse]:
        """The Generate event stream: progress events, audio chunks, then one result (see wav_from_events).
        ``seconds``/``steps`` 0 and ``guidance_scale`` None take the server's defaults; ``new`` takes
        generate_request's output_format, mode, init_audio, init_pattern_id and init_strength."""
        req = generate_request(prompt, seconds=seconds, steps=steps, guidance_scale=guidance_scale, seed=seed,
                               negative_prompt=negative_prompt, scheduler=scheduler, store=store, tags=tags,
                               request_id=request_id, **new)
        yield from self.stream("Generate", req, timeout_s)

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
                timeout_s: float | None = None, output_format: int = 0,
                seconds: float = 0.0) -> Iterator[pb.ComposeResponse]:
        """The Compose event stream: coordinator tokens, the plan, step events, features, audio, summary."""
        req = compose_request(request, max_tokens=max_tokens, seed=seed, tags=tags, request_id=request_id,
                              output_format=output_format, seconds=seconds)
        yield from self.stream("Compose", req, timeout_s)

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
               tag_filter: Mapping[str, str] | None = None, **new: Any) -> list[pb.PatternMatch]:
        """Nearest stored patterns (top_k 0: the server's); ``new`` takes search_request's text, space, music
        (a :func:`music_filter`) and include_embedding."""
        return list(self._call(self.stub.SearchPatterns,
                               search_request(embedding, pattern_id, top_k, tag_filter, **new)).matches)

    def describe(self, audio: AudioLike | None = None, *, pattern_id: str | None = None) -> pb.DescribeAudioResponse:
        return self._call(self.stub.DescribeAudio, describe_request(audio, pattern_id))

    def pattern_audio(self, pattern_id: str, *, audio_format: int = 0) -> Iterator[pb.GetPatternAudioResponse]:
        """A stored pattern's audio as a stream of chunks (join ``audio.wav_data`` in order)."""
        yield from self.stream("GetPatternAudio", pb.GetPatternAudioRequest(
            request_id=uuid.uuid4().hex, pattern_id=pattern_id, format=audio_format))

    def get_pattern(self, pattern_id: str, include_embedding: bool = False) -> common_pb2.Pattern:
        return self._call(self.stub.GetPattern, pb.GetPatternRequest(
            pattern_id=pattern_id, include_embedding=include_embedding)).pattern

    def delete_pattern(self, pattern_id: str) -> None:
        self._call(self.stub.DeletePattern, pb.DeletePatternRequest(pattern_id=pattern_id))

    def list_patterns(self, *, page_size: int = 0, tag_filter: Mapping[str, str] | None = None,
                      music: pb.MusicFilter | None = None) -> Iterator[common_pb2.Pattern]:
        """All stored patterns, newest first, fetched page by page (``page_size`` 0: the server's)."""
        token = ""
        while True:
            resp = self._call(self.stub.ListPatterns, _list_patterns_request(page_size, token, tag_filter, music))
            yield from resp.patterns
            if not (token := resp.next_page_token):
                return

    def health(self, service: str = "") -> str:
        try:
            resp = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service),
                              HEALTH_TIMEOUT_S)
        except GrymError as err:
            raise _health_error(err, service) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _list_patterns_request(page_size: int, token: str, tag_filter: Mapping[str, str] | None,
                           music: pb.MusicFilter | None) -> pb.ListPatternsRequest:
    req = pb.ListPatternsRequest(page_size=page_size, page_token=token, tag_filter=dict(tag_filter or {}))
    if music is not None:
        req.music_filter.CopyFrom(music)
    return req


class AsyncClient:
    """asyncio client with every method of :class:`Client`.
    ``async with AsyncClient("localhost:50051") as c: await c.analyze(...)``."""

    def __init__(self, target: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        opts = [*CHANNEL_OPTIONS, *options]
        self.channel = (grpc.aio.secure_channel(target, credentials, opts) if credentials
                        else grpc.aio.insecure_channel(target, opts))
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    async def _call(self, fn, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return await fn(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            raise GrymError.from_rpc(err) from None

    async def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """One unary RPC by name (``"GetPattern"``), returning the whole response message."""
        return await self._call(getattr(self.stub, method), request, timeout_s)

    async def stream(self, method: str, request: Any, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """One server-streaming (or, with an iterator of requests, bidirectional) RPC by name."""
        async for item in self._server_stream(getattr(self.stub, method)(
                request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)):
            yield item

    async def analyze(self, audio: AudioLike, *, sample_rate_hz: int | None = None, include_features: bool = False,
                      store: bool = False, tags: Mapping[str, str] | None = None, source: str = "",
                      request_id: str | None = None, timeout_s: float | None = None,
                      music_detail: str | None = None) -> Analysis:
        req = analyze_request(audio, sample_rate_hz, include_features, store, tags, source, request_id, music_detail)
        return _analysis(await self._call(self.stub.AnalyzeAudio, req, timeout_s))

    async def stream_analyze(self, samples: np.ndarray, sample_rate_hz: int, *, include_features: bool = False,
                             store: bool = False, tags: Mapping[str, str] | None = None,
                             request_id: str | None = None, music_detail: str | None = None,
                             timeout_s: float | None = None) -> AsyncIterator[pb.StreamAnalyzeResponse]:
        reqs = stream_requests(samples, sample_rate_hz, include_features, store, tags, request_id, music_detail)
        async for resp in self.stream("StreamAnalyze", reqs, timeout_s):
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
                       request_id: str | None = None, timeout_s: float | None = None,
                       **new: Any) -> AsyncIterator[pb.GenerateResponse]:
        req = generate_request(prompt, seconds=seconds, steps=steps, guidance_scale=guidance_scale, seed=seed,
                               negative_prompt=negative_prompt, scheduler=scheduler, store=store, tags=tags,
                               request_id=request_id, **new)
        async for event in self.stream("Generate", req, timeout_s):
            yield event

    async def compose(self, request: str, *, max_tokens: int = 0, seed: int | None = None,
                      tags: Mapping[str, str] | None = None, request_id: str | None = None,
                      timeout_s: float | None = None, output_format: int = 0,
                      seconds: float = 0.0) -> AsyncIterator[pb.ComposeResponse]:
        req = compose_request(request, max_tokens=max_tokens, seed=seed, tags=tags, request_id=request_id,
                              output_format=output_format, seconds=seconds)
        async for event in self.stream("Compose", req, timeout_s):
            yield event

    async def get_workflow(self, workflow_id: str) -> pb.Workflow:
        return (await self._call(self.stub.GetWorkflow, pb.GetWorkflowRequest(workflow_id=workflow_id))).workflow

    async def list_workflows(self, *, page_size: int = 0) -> list[pb.Workflow]:
        resp = await self._call(self.stub.ListWorkflows, pb.ListWorkflowsRequest(page_size=page_size))
        return list(resp.workflows)

    async def clusters(self, cluster_count: int = 0) -> list[pb.PatternCluster]:
        resp = await self._call(self.stub.ListPatternClusters,
                                pb.ListPatternClustersRequest(cluster_count=cluster_count))
        return list(resp.clusters)

    async def rate(self, pattern_id: str, rating: int, comment: str = "") -> pb.RatePatternResponse:
        return await self._call(self.stub.RatePattern, pb.RatePatternRequest(pattern_id=pattern_id, rating=rating,
                                                                             comment=comment))

    async def search(self, *, embedding: Sequence[float] | None = None, pattern_id: str | None = None,
                     top_k: int = 0, tag_filter: Mapping[str, str] | None = None,
                     **new: Any) -> list[pb.PatternMatch]:
        resp = await self._call(self.stub.SearchPatterns,
                                search_request(embedding, pattern_id, top_k, tag_filter, **new))
        return list(resp.matches)

    async def describe(self, audio: AudioLike | None = None, *,
                       pattern_id: str | None = None) -> pb.DescribeAudioResponse:
        return await self._call(self.stub.DescribeAudio, describe_request(audio, pattern_id))

    async def pattern_audio(self, pattern_id: str, *,
                            audio_format: int = 0) -> AsyncIterator[pb.GetPatternAudioResponse]:
        async for resp in self.stream("GetPatternAudio", pb.GetPatternAudioRequest(
                request_id=uuid.uuid4().hex, pattern_id=pattern_id, format=audio_format)):
            yield resp

    async def get_pattern(self, pattern_id: str, include_embedding: bool = False) -> common_pb2.Pattern:
        resp = await self._call(self.stub.GetPattern, pb.GetPatternRequest(
            pattern_id=pattern_id, include_embedding=include_embedding))
        return resp.pattern

    async def delete_pattern(self, pattern_id: str) -> None:
        await self._call(self.stub.DeletePattern, pb.DeletePatternRequest(pattern_id=pattern_id))

    async def list_patterns(self, *, page_size: int = 0, tag_filter: Mapping[str, str] | None = None,
                            music: pb.MusicFilter | None = None) -> AsyncIterator[common_pb2.Pattern]:
        token = ""
        while True:
            resp = await self._call(self.stub.ListPatterns,
                                    _list_patterns_request(page_size, token, tag_filter, music))
            for p in resp.patterns:
                yield p
            if not (token := resp.next_page_token):
                return

    async def health(self, service: str = "") -> str:
        try:
            resp = await self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service),
                                    HEALTH_TIMEOUT_S)
        except GrymError as err:
            raise _health_error(err, service) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

