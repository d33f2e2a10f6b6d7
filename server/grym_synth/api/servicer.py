"""gRPC transport for ``grym.v1.Orchestrator``: thin handlers that translate protobuf to serving calls.

Every handler runs inside :func:`rpc_scope`, the one place that assigns the request id, applies admission
control, records metrics, and turns exceptions into statuses: expected failures (:class:`GrymError`) keep their
code and message; anything else is logged with its traceback and answered INTERNAL. Messages end with the
request id so that users can quote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc
from grym_synth.analysis.describe import Describer
from grym_synth.analysis.service import AnalysisService, StreamConfig, StreamSummary
from grym_synth.core.audio import Audio, AudioFormat, to_mono_16k
from grym_synth.core.compute import run_cpu
from grym_synth.memory.music_index import text_to_tags
from grym_synth.api import convert
from grym_synth.compose.service import (ComposeService, Features, Finished, PieceProgress, PlanChosen,
                                        SectionReady, new_workflow_id)
from grym_synth.coordinator.base import TokenEvent
from grym_synth.core.errors import FailedPrecondition, GrymError, InvalidArgument, Unavailable, public_message
from grym_synth.memory.learning import MAX_CLUSTER_COUNT, MAX_COMMENT_CHARS, detect_clusters, rate_pattern
from grym_synth.workflow.events import StepCancelled, StepFailed, StepFinished, StepProgress, StepStarted
from grym_synth.workflow.store import DEFAULT_PAGE_SIZE as DEFAULT_WORKFLOW_PAGE_SIZE
from grym_synth.workflow.store import MAX_PAGE_SIZE as MAX_WORKFLOW_PAGE_SIZE
from grym_synth.workflow.store import WorkflowState
from grym_synth.generation.service import (DEFAULT_SCHEDULER, SCHEDULERS, AudioData, GenerateParams, GenerationService,
                                          Progress)
from grym_synth.generation.service import validate as validate_generation
from grym_synth.generation.service import validate_init
from grym_synth.core.logs import request_id_var
from grym_synth.core.metrics import Metrics
from grym_synth.memory.store import DEFAULT_PAGE_SIZE, DEFAULT_TOP_K, PatternRecord, PatternStore, check_pattern_id
from grym_synth.core.resilience import AdmissionControl

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


# Methods that stream responses or requests: their non-OK ends (client cancellations aside) are stream errors.
STREAMING_METHODS = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["Orchestrator"].methods
                              if m.server_streaming or m.client_streaming)
# Set by _write_all when a client read nothing for stream_write_timeout_s, so that the closing producer's scope
# records DEADLINE_EXCEEDED (what the client is told) rather than a cancellation.
_write_timed_out: contextvars.ContextVar[bool] = contextvars.ContextVar("write_timed_out", default=False)


DEADLINE_SLACK_S = 0.5


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """How a call that was cancelled under us ended: a timeout (the client's deadline passed, or the client read
    nothing for stream_write_timeout_s) is DEADLINE_EXCEEDED, as the client sees it; otherwise CANCELLED."""
    if _write_timed_out.get():
        return grpc.StatusCode.DEADLINE_EXCEEDED
    try:
        remaining = context.time_remaining()
    except Exception:  # a context without a deadline API (tests' fakes): no deadline to compare with
        remaining = None
    # The server's deadline is the client's timeout counted from when the call arrived, so it trails the client's
    # by the transit time: a cancel that close to it is the client's deadline, not a user's cancel.
    near = remaining is not None and remaining <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if near else grpc.StatusCode.CANCELLED


def _request_id(given: str) -> str:
    if not given:
        return uuid.uuid4().hex
    if not REQUEST_ID.match(given):
        raise InvalidArgument("request_id must be 1-128 printable ASCII characters without spaces")
    return given


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Gate:
    """Refuses work until the server is ready and after it starts draining (set by the App)."""

    def __init__(self) -> None:
        self.ready = False
        self.reason = "the server is starting: Triton and the pattern store are not ready yet"

    def check(self) -> None:
        if not self.ready:
            raise Unavailable("orchestrator", self.reason)


class Scope:
    """Per-RPC state shared between :func:`rpc_scope` and the handler."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.request_id = ""
        self.code = grpc.StatusCode.OK


class OrchestratorService(pb_grpc.OrchestratorServicer):
    """Handlers are built once at start-up; they hold references to the serving objects only."""

    def __init__(self, analysis: AnalysisService, store: PatternStore, admission: AdmissionControl, gate: Gate,
                 metrics: Metrics, generation: GenerationService, compose: ComposeService, *,
                 write_timeout_s: float = 30.0, describer: Describer | None = None) -> None:
        self.analysis = analysis
        self.describer = describer or Describer()
        self.write_timeout_s = write_timeout_s
        self.generation = generation
        self.compose = compose
        self.store = store
        self.admission = admission
        self.gate = gate
        self.metrics = metrics

    # --- the one error/metrics/admission scope --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def rpc_scope(self, method: str, context: grpc.aio.ServicerContext, given_id: str,
                        requests: AsyncIterator[object] | None = None) -> AsyncIterator[Scope]:
        scope = Scope(method)
        started = time.perf_counter()
        token = request_id_var.set(given_id or "")
        try:
            scope.request_id = _request_id(given_id)
            request_id_var.set(scope.request_id)
            self.gate.check()
            with self.admission.admit(method):
                yield scope
        except (GrymError, OverflowError) as exc:
            if isinstance(exc, OverflowError):  # a number too large for its field (int64 seed, float32...)
                log.info("%s: a number overflowed", method, exc_info=True)
                exc = InvalidArgument("a number in the request is out of range for its field")
            scope.code = exc.code
            log.info("%s failed: %s: %s", method, exc.code.name, exc.message)
            # The traceback's frames hold the request's arrays (audio, stream buffers): drop them now rather than
            # when the garbage collector finds the cycle, so a refused request frees its memory at once.
            exc.__traceback__ = None
            if requests is not None:
                await _drain(requests)
            # The last guard against leaks: no peer address, gRPC dump or repr reaches the client (the log above
            # keeps the full message, with the request id).
            await context.abort(exc.code, f"{public_message(exc.message)} [request_id={scope.request_id or '-'}]")
        except grpc.aio.AbortError:
            raise
        except BaseException as exc:
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client went away (or stopped reading)
                scope.code = _cancel_code(context)
                raise
            scope.code = grpc.StatusCode.INTERNAL
            log.exception("%s crashed", method)  # type, message and traceback: in the log, with the request id
            exc.__traceback__ = None
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error; quote request_id={scope.request_id or '-'} when reporting it")
        finally:
            self.metrics.rpc_requests.labels(method, scope.code.name).inc()
            if method in STREAMING_METHODS and scope.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self.metrics.stream_errors.labels(method, scope.code.name).inc()
            # The request id rides along as an OpenMetrics exemplar: traceable without a label per request.
            exemplar = {"request_id": scope.request_id[:64]} if scope.request_id else None
            self.metrics.rpc_latency.labels(method).observe(time.perf_counter() - started, exemplar=exemplar)
            request_id_var.reset(token)

    # --- the one streaming write path ------------------------------------------------------------------------------
    async def _write_all(self, context: grpc.aio.ServicerContext, responses: AsyncIterator[Any]) -> None:
        """Write a server stream's responses, each within ``write_timeout_s``, and always close the producer.

        grpc.aio's ``write`` waits while the client's flow-control window is full (a client that stopped reading
        takes the few MB the transport buffers, then every write blocks): past the timeout the producer is closed
        at once (its admission slot, memory budget and Triton work are released by its ``finally`` blocks) and the
        call ends with DEADLINE_EXCEEDED. The status reaches a client whose window had room; with the message
        itself still stuck in the window, gRPC core accepts no status (grpc.aio has no server-side cancel), so such
        a client sees the call end at its own deadline or when it goes away; the server holds nothing for it.
        Driving the handler's generator here, rather than letting grpc.aio iterate it, also closes it
        deterministically (``aclosing``) when the client cancels or a write times out, instead of leaving a
        generator suspended at ``yield`` to the event loop's finaliser (or to the garbage collector when a reference
        cycle holds it), with its slot and its work pinned until then."""
        timed_out: Any = None
        async with contextlib.aclosing(responses) as stream:
            async for message in stream:
                try:
                    await asyncio.wait_for(context.write(message), self.write_timeout_s)
                except TimeoutError:
                    timed_out = message
                    _write_timed_out.set(True)  # the producer's scope, closed next in this context, reads it
                    break
        if timed_out is None:
            return
        rid = getattr(timed_out, "request_id", "") or "-"
        log.warning("the client took no response message for %.1f s (stream_write_timeout_s): call ended "
                    "[request_id=%s]", self.write_timeout_s, rid)
        try:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the client read no response message for {self.write_timeout_s:g} s "
                                f"(stream_write_timeout_s); the call was ended [request_id={rid}]")
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the stuck message blocks the status too: nothing more can be sent
            log.info("no status could be sent after the write timeout (%s) [request_id=%s]", exc, rid)
            raise asyncio.CancelledError() from None

    # --- conversions ----------------------------------------------------------------------------------------------
    async def _audio(self, audio: common_pb2.AudioInput, field: str = "audio") -> Audio:
        """Decoded, checked, 16 kHz mono audio; the decoding and resampling run in the CPU pool (work that would
        stall every call in flight on the event loop)."""
        return await run_cpu(self._audio_sync, audio, field)

    def _audio_sync(self, audio: common_pb2.AudioInput, field: str) -> Audio:
        samples, rate = convert.audio_input(audio, max_seconds=self.analysis.max_audio_s, field=field)
        if samples.size == 0:
            raise InvalidArgument(f"{field} is empty")
        if not np.isfinite(samples).all():
            raise InvalidArgument(f"{field} contains {int((~np.isfinite(samples)).sum())} NaN or infinite sample(s)")
        return self.analysis.validate(to_mono_16k(samples, rate))

    async def _generate_init(self, request: pb.GenerateRequest) -> Any:
        """Generate's init-audio fields (12-15), decoded and checked (generation.validate_init)."""
        mode = convert.generate_mode(request.mode)
        audio = None
        if request.HasField("init_audio"):
            audio = (await self._audio(request.init_audio, "init_audio")).samples
        strength = request.init_strength if request.HasField("init_strength") else None
        return validate_init(mode, audio, request.init_pattern_id, strength,
                             duration_given=request.duration_seconds != 0)

    @staticmethod
    def _pattern(p: PatternRecord) -> common_pb2.Pattern:
        ts = Timestamp()
        ts.FromMicroseconds(p.created_at_us)
        return common_pb2.Pattern(
            pattern_id=p.id, embedding=p.embedding or [], model=p.model, profile=p.profile,
            duration_seconds=p.duration_s, tags=p.tags, create_time=ts, source=p.source, metadata=p.metadata,
            has_audio=bool(p.audio_sha256), audio_sha256=p.audio_sha256,
            music=convert.stored_music(p.music),
        )

    @staticmethod
    def _features(features: np.ndarray | None) -> common_pb2.FeatureMatrix | None:
        if features is None:
            return None
        return common_pb2.FeatureMatrix(rows=features.shape[0], cols=features.shape[1],
                                        values=features.reshape(-1).tolist())

    # --- RPCs -----------------------------------------------------------------------------------------------------
    async def AnalyzeAudio(self, request: pb.AnalyzeAudioRequest,
                           context: grpc.aio.ServicerContext) -> pb.AnalyzeAudioResponse:
        async with self.rpc_scope("AnalyzeAudio", context, request.request_id) as scope:
            audio = await self._audio(request.audio)
            result = await self.analysis.analyze(
                audio, include_features=request.include_features, store=request.store, tags=dict(request.tags),
                source=request.source or "analyze", metadata=None, deadline=_deadline(context),
                request_id=scope.request_id, music_detail=convert.music_detail(request.music_detail),
            )
            return pb.AnalyzeAudioResponse(
                request_id=scope.request_id, frames=result.frames, embedding=result.embedding.tolist(),
                features=self._features(result.features), duration_seconds=result.duration_s,
                pattern_id=result.pattern.id if result.pattern else "",
                tags=result.pattern.tags if result.pattern else {}, model=self.store.model,
                profile=self.store.profile, music=convert.music(result.music),
            )

    async def StreamAnalyze(self, request_iterator: AsyncIterator[pb.StreamAnalyzeRequest],
                            context: grpc.aio.ServicerContext) -> None:
        await self._write_all(context, self._stream_analyze(request_iterator, context))

    async def _stream_analyze(self, request_iterator: AsyncIterator[pb.StreamAnalyzeRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamAnalyzeResponse]:
        first = await anext(aiter(request_iterator), None)
        given = first.request_id if first is not None else ""
        async with self.rpc_scope("StreamAnalyze", context, given, requests=request_iterator) as scope:
            if first is None or first.WhichOneof("request") != "config":
                raise InvalidArgument("the first StreamAnalyze message must carry `config`")
            cfg = first.config
            if cfg.sample_rate_hz <= 0:
                raise InvalidArgument("config.sample_rate_hz is required (e.g. 16000)")
            config = StreamConfig(
                sample_rate_hz=cfg.sample_rate_hz, channels=cfg.channels or 1, encoding=_encoding(cfg.encoding),
                include_features=cfg.include_features, store=cfg.store, tags=dict(cfg.tags),
                source=cfg.source or "stream",
                music_detail=convert.music_detail(cfg.music_detail, "config.music_detail"),
            )

            async def chunks() -> AsyncIterator[bytes]:
                async for msg in request_iterator:
                    if msg.WhichOneof("request") != "audio_content":
                        raise InvalidArgument("only the first StreamAnalyze message may carry `config`")
                    yield msg.audio_content

            async for item in self.analysis.analyze_stream(config, chunks(), deadline=_deadline(context),
                                                           request_id=scope.request_id):
                yield self._stream_response(scope.request_id, item)

    def _stream_response(self, request_id: str, item: object) -> pb.StreamAnalyzeResponse:
        if isinstance(item, StreamSummary):
            return pb.StreamAnalyzeResponse(
                request_id=request_id, is_final=True, window_index=item.windows, start_seconds=0.0,
                end_seconds=item.duration_s, frames=item.frames, embedding=item.embedding.tolist(),
                pattern_id=item.pattern.id if item.pattern else "", music=convert.music(item.music),
            )
        a = item.analysis  # type: ignore[attr-defined]
        return pb.StreamAnalyzeResponse(
            request_id=request_id, is_final=False, window_index=item.index,  # type: ignore[attr-defined]
            start_seconds=item.start_s, end_seconds=item.end_s,  # type: ignore[attr-defined]
            frames=a.frames, embedding=a.embedding.tolist(), features=self._features(a.features),
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._write_all(context, self._generate(request, context))

    async def _generate(self, request: pb.GenerateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        async with self.rpc_scope("Generate", context, request.request_id) as scope:
            params = _generate_params(request, self.generation.max_duration_s)
            fmt = convert.audio_format(request.output_format)
            params = await self.generation.with_init(params, await self._generate_init(request))
            rid = scope.request_id
            async for event in self.generation.generate(params, store=request.store, tags=dict(request.tags),
                                                        deadline=_deadline(context), request_id=rid):
                if isinstance(event, Progress):
                    yield pb.GenerateResponse(request_id=rid, progress=pb.GenerateProgress(
                        step=event.step, total_steps=event.total_steps))
                elif isinstance(event, AudioData):
                    for chunk in await _audio_chunks(event, fmt):
                        yield pb.GenerateResponse(request_id=rid, audio=chunk)
                else:
                    music = event.music  # described with the embedding (and stored with the pattern)
                    yield pb.GenerateResponse(request_id=rid, result=pb.GenerateResult(
                        seed=event.seed, duration_seconds=event.duration_s, sample_rate_hz=event.sample_rate_hz,
                        frames=event.frames, embedding=event.embedding.tolist(),
                        pattern_id=event.pattern.id if event.pattern else "", cached=event.cached,
                        music=convert.music(music)))

    async def GetPatternAudio(self, request: pb.GetPatternAudioRequest, context: grpc.aio.ServicerContext) -> None:
        await self._write_all(context, self._get_pattern_audio(request, context))

    async def _get_pattern_audio(self, request: pb.GetPatternAudioRequest,
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetPatternAudioResponse]:
        async with self.rpc_scope("GetPatternAudio", context, request.request_id) as scope:
            _require_id(request.pattern_id)
            _, wav = await self.store.audio(request.pattern_id)
            fmt = convert.audio_format(request.format, "format")
            for chunk in await _audio_chunks(convert.stored_audio(wav), fmt):
                yield pb.GetPatternAudioResponse(request_id=scope.request_id, audio=chunk)

    async def Compose(self, request: pb.ComposeRequest, context: grpc.aio.ServicerContext) -> None:
        await self._write_all(context, self._compose(request, context))

    async def _compose(self, request: pb.ComposeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ComposeResponse]:
        async with self.rpc_scope("Compose", context, request.request_id) as scope:
            rid, wid = scope.request_id, new_workflow_id()
            fmt = convert.audio_format(request.output_format)
            step_types: dict[str, str] = {}
            events = self.compose.compose(
                request.request, max_tokens=request.max_tokens, seed=request.seed if request.HasField("seed") else None,
                tags=dict(request.tags), deadline=_deadline(context), request_id=rid, workflow_id=wid,
                duration_s=request.duration_seconds, output_format=fmt)
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, PlanChosen):
                        step_types = {s.id: s.type for s in event.plan.steps}
                    if isinstance(event, AudioData):
                        for chunk in await _audio_chunks(event, fmt):
                            yield pb.ComposeResponse(request_id=rid, workflow_id=wid, audio=chunk)
                        continue
                    message = _compose_message(event, step_types)
                    if message is not None:
                        message.request_id, message.workflow_id = rid, wid
                        yield message
                    if isinstance(event, Finished) and event.record.state == WorkflowState.FAILED:
                        code = event.record.error_code or "INTERNAL"
                        raise _status_error(code, f"workflow {wid} failed: {event.record.error}")

    async def GetWorkflow(self, request: pb.GetWorkflowRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetWorkflowResponse:
        async with self.rpc_scope("GetWorkflow", context, request.request_id) as scope:
            if not request.workflow_id:
                raise InvalidArgument("workflow_id is required")
            record = await self.compose.workflows.get(request.workflow_id)
            return pb.GetWorkflowResponse(request_id=scope.request_id, workflow=convert.workflow(record))

    async def ListWorkflows(self, request: pb.ListWorkflowsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListWorkflowsResponse:
        async with self.rpc_scope("ListWorkflows", context, request.request_id) as scope:
            if not 0 <= request.page_size <= MAX_WORKFLOW_PAGE_SIZE:
                raise InvalidArgument(f"page_size must be 1..{MAX_WORKFLOW_PAGE_SIZE}, got {request.page_size}")
            state = convert.STATE_FROM_PROTO.get(request.state) if request.state else None
            page_size = request.page_size or DEFAULT_WORKFLOW_PAGE_SIZE
            records, token = await self.compose.workflows.list(page_size=page_size,
                                                               page_token=request.page_token, state=state)
            return pb.ListWorkflowsResponse(request_id=scope.request_id,
                                            workflows=[convert.workflow(r) for r in records], next_page_token=token)

    async def ListPatternClusters(self, request: pb.ListPatternClustersRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ListPatternClustersResponse:
        async with self.rpc_scope("ListPatternClusters", context, request.request_id) as scope:
            if not 0 <= request.cluster_count <= MAX_CLUSTER_COUNT:
                raise InvalidArgument(f"cluster_count must be 1..{MAX_CLUSTER_COUNT} (0: automatic), got "
                                      f"{request.cluster_count}")
            clusters = await detect_clusters(self.store, request.cluster_count or None, feedback=self.compose.feedback)
            return pb.ListPatternClustersResponse(request_id=scope.request_id,
                                                  clusters=[convert.cluster(c) for c in clusters])

    async def RatePattern(self, request: pb.RatePatternRequest,
                          context: grpc.aio.ServicerContext) -> pb.RatePatternResponse:
        async with self.rpc_scope("RatePattern", context, request.request_id) as scope:
            _require_id(request.pattern_id)
            if len(request.comment) > MAX_COMMENT_CHARS:
                raise InvalidArgument(f"comment is longer than {MAX_COMMENT_CHARS} characters")
            summary = await rate_pattern(self.store, self.compose.feedback, request.pattern_id, request.rating,
                                         request.comment)
            return pb.RatePatternResponse(request_id=scope.request_id, pattern_id=request.pattern_id,
                                          mean_rating=summary.mean, rating_count=summary.count)

    async def SearchPatterns(self, request: pb.SearchPatternsRequest,
                             context: grpc.aio.ServicerContext) -> pb.SearchPatternsResponse:
        async with self.rpc_scope("SearchPatterns", context, request.request_id) as scope:
            matches = await self._search(request)
            return pb.SearchPatternsResponse(
                request_id=scope.request_id,
                matches=[pb.PatternMatch(pattern=self._pattern(m), score=m.score or 0.0) for m in matches],
            )

    async def _search(self, request: pb.SearchPatternsRequest) -> list[PatternRecord]:
        """The query in its space: text -> tagger labels; a pattern id or embedding -> MUSIC when unset and the
        pattern (or the embedding's dimension) is in the music space, else WAV2VEC2."""
        query = request.WhichOneof("query")
        space = request.space
        if space not in (pb.SearchPatternsRequest.SPACE_UNSPECIFIED, pb.SearchPatternsRequest.SPACE_MUSIC,
                         pb.SearchPatternsRequest.SPACE_WAV2VEC2):
            raise InvalidArgument(f"space {space} is not a SearchPatternsRequest.Space value")
        music_q = convert.music_query(request.music_filter if request.HasField("music_filter") else None)
        top_k, tags = request.top_k or DEFAULT_TOP_K, dict(request.tag_filter)
        common = dict(top_k=top_k, tag_filter=tags, include_embedding=request.include_embedding, music=music_q)
        use_music = space == pb.SearchPatternsRequest.SPACE_MUSIC
        if query == "text":
            if space == pb.SearchPatternsRequest.SPACE_WAV2VEC2:
                raise InvalidArgument("text queries search the music space; leave space unset or MUSIC")
            vocabulary = self.analysis.music.vocabulary() if self.analysis.music else ()
            return await self.store.search_text(text_to_tags(request.text, vocabulary), **common)
        exclude = None
        if query == "embedding":
            vector = list(request.embedding.values)
            if space == pb.SearchPatternsRequest.SPACE_UNSPECIFIED:
                use_music = bool(self.store.music_dim) and len(vector) == self.store.music_dim != self.store.dim
        elif query == "pattern_id":
            _require_id(request.pattern_id)
            anchor = await self.store.get(request.pattern_id, include_embedding=True)
            exclude = anchor.id
            if space == pb.SearchPatternsRequest.SPACE_UNSPECIFIED:
                use_music = bool(anchor.music and anchor.music.embedding)
            if use_music and not (anchor.music and anchor.music.embedding):
                raise InvalidArgument(f"pattern {anchor.id} has no music embedding; search it in WAV2VEC2 space")
            vector = (anchor.music.embedding if use_music and anchor.music else anchor.embedding) or []
        else:
            raise InvalidArgument("a query is required: set embedding, pattern_id or text")
        if use_music:
            return await self.store.search_music(vector, exclude_id=exclude, **common)
        return await self.store.search(vector, exclude_id=exclude, **common)

    async def DescribeAudio(self, request: pb.DescribeAudioRequest,
                            context: grpc.aio.ServicerContext) -> pb.DescribeAudioResponse:
        async with self.rpc_scope("DescribeAudio", context, request.request_id) as scope:
            source = request.WhichOneof("source")
            if source == "audio":
                audio = await self._audio(request.audio)
                music = await self.analysis.describe_music(audio.samples, deadline=_deadline(context))
                samples = audio.samples
            elif source == "pattern_id":
                _require_id(request.pattern_id)
                record = await self.store.get(request.pattern_id)
                samples = None
                music = convert.description_of(record.music, record.duration_s) if record.music else None
            else:
                raise InvalidArgument("a source is required: set audio or pattern_id")
            if music is None:
                raise FailedPrecondition("no music description is available: the pattern was stored without one"
                                         if source == "pattern_id" else "the server runs without music analysis")
            caption = await self.describer.describe(samples, music)
            return pb.DescribeAudioResponse(request_id=scope.request_id, caption=caption.text,
                                            music=convert.music(music.summary()), describer=caption.describer)

    async def GetPattern(self, request: pb.GetPatternRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetPatternResponse:
        async with self.rpc_scope("GetPattern", context, request.request_id) as scope:
            _require_id(request.pattern_id)
            record = await self.store.get(request.pattern_id, include_embedding=request.include_embedding)
            return pb.GetPatternResponse(request_id=scope.request_id, pattern=self._pattern(record))

    async def DeletePattern(self, request: pb.DeletePatternRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeletePatternResponse:
        async with self.rpc_scope("DeletePattern", context, request.request_id) as scope:
            _require_id(request.pattern_id)
            await self.store.delete(request.pattern_id)
            return pb.DeletePatternResponse(request_id=scope.request_id, pattern_id=request.pattern_id)

    async def ListPatterns(self, request: pb.ListPatternsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListPatternsResponse:
        async with self.rpc_scope("ListPatterns", context, request.request_id) as scope:
            page, token = await self.store.list(
                page_size=request.page_size or DEFAULT_PAGE_SIZE, page_token=request.page_token,
                tag_filter=dict(request.tag_filter),
                music=convert.music_query(request.music_filter if request.HasField("music_filter") else None))
            return pb.ListPatternsResponse(request_id=scope.request_id, patterns=[self._pattern(p) for p in page],
                                           next_page_token=token)


async def _drain(requests: AsyncIterator[object], limit_s: float = 2.0) -> None:
    """Read what the client is still uploading before sending an error status: closing a stream the client is
    writing to races with its upload, and the client then sees INTERNAL instead of our status."""
    async def consume() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(consume(), limit_s)
    except Exception:  # a broken or slow upload: the status goes out anyway
        pass


STEP_STATES = {StepStarted: pb.ComposeStep.STATE_STARTED, StepProgress: pb.ComposeStep.STATE_PROGRESS,
               StepFinished: pb.ComposeStep.STATE_FINISHED, StepFailed: pb.ComposeStep.STATE_FAILED,
               StepCancelled: pb.ComposeStep.STATE_CANCELLED}


def _compose_message(event: object, step_types: dict[str, str]) -> pb.ComposeResponse | None:
    """One ComposeResponse per serving event (None for engine events the stream does not expose)."""
    if isinstance(event, TokenEvent):
        if not event.text:
            return None
        kind = pb.CoordinatorToken.KIND_THINKING if event.kind == "thinking" else pb.CoordinatorToken.KIND_ANSWER
        return pb.ComposeResponse(token=pb.CoordinatorToken(kind=kind, text=event.text, index=event.token_index))
    if isinstance(event, PlanChosen):
        planner = (pb.ComposePlan.PLANNER_COORDINATOR if event.plan.planner == "coordinator"
                   else pb.ComposePlan.PLANNER_RULES)
        return pb.ComposeResponse(plan=pb.ComposePlan(
            planner=planner, fallback_reason=event.plan.fallback_reason or "", plan_json=event.plan.to_json(),
            recalled_pattern_ids=[p.id for p in event.recalled]))
    if type(event) in STEP_STATES:
        sid = getattr(event, "step_id")
        return pb.ComposeResponse(step=pb.ComposeStep(
            step_id=sid, step_type=step_types.get(sid, ""), state=STEP_STATES[type(event)],
            done=getattr(event, "done", 0), total=getattr(event, "total", 0),
            summary_json=convert.to_json(getattr(event, "summary", None)),
            error=getattr(event, "error", "") or getattr(event, "reason", "")))
    if isinstance(event, Features):
        return pb.ComposeResponse(features=pb.ComposeFeatures(step_id=event.step_id, frames=event.frames,
                                                              embedding=event.embedding,
                                                              duration_seconds=event.duration_s,
                                                              music=convert.music_record(event.music)))
    if isinstance(event, Finished):
        return pb.ComposeResponse(summary=convert.workflow(event.record))
    if isinstance(event, SectionReady):
        return pb.ComposeResponse(section_audio=pb.ComposeSectionAudio(
            section_index=event.index, name=event.name, start_seconds=event.start_s, end_seconds=event.end_s,
            data=event.data, sample_rate_hz=event.sample_rate_hz, format=int(event.fmt)))
    if isinstance(event, PieceProgress):
        return pb.ComposeResponse(progress=pb.ComposeProgress(done=event.done, total=event.total,
                                                              elapsed_seconds=event.elapsed_s,
                                                              eta_seconds=event.eta_s))
    return None


async def _audio_chunks(audio: AudioData, fmt: AudioFormat = AudioFormat.WAV_PCM16) -> list[pb.AudioChunk]:
    """The audio as chunks in ``fmt``, encoded in the CPU pool (MP3 of a long piece takes seconds)."""
    return await run_cpu(convert.audio_data_chunks, audio, fmt)


def _status_error(code: str, message: str) -> GrymError:
    err = GrymError(message)
    err.code = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
    return err


# Proto enum value -> scheduler name, derived from the one list (generation.SCHEDULERS): each name's enum value is
# SCHEDULER_<NAME> (the proto spells "dpm" out), so a scheduler added without its enum value fails at import.
_PROTO_SCHEDULER_SPELLING = {"dpm": "DPM_SOLVER"}
SCHEDULER_NAMES = {
    pb.GenerateRequest.SCHEDULER_UNSPECIFIED: DEFAULT_SCHEDULER,
    **{pb.GenerateRequest.Scheduler.Value("SCHEDULER_" + _PROTO_SCHEDULER_SPELLING.get(name, name.upper())): name
       for name in SCHEDULERS},
}


def _generate_params(request: pb.GenerateRequest, max_duration_s: float) -> GenerateParams:
    if request.scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument(f"unknown scheduler {request.scheduler}")
    return validate_generation(
        request.prompt, request.negative_prompt, request.duration_seconds, request.steps,
        request.guidance_scale if request.HasField("guidance_scale") else None,
        request.seed if request.HasField("seed") else None, SCHEDULER_NAMES[request.scheduler], max_duration_s,
    )


def _require_id(pattern_id: str) -> None:
    """Pattern ids are checked by their issued format (a UUID) before anything else; the store checks again."""
    check_pattern_id(pattern_id)


class _Undecodable:
    """What the lenient deserializer hands the handler in place of a request that did not parse."""

    def __init__(self, full_name: str) -> None:
        self.message = f"request is not a valid {full_name} message"


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc.aio answers a deserializer's exception with UNKNOWN
    ("Unexpected error"), so a parse failure is handed to the handler, which answers INVALID_ARGUMENT."""
    full_name = message_type.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except Exception:  # DecodeError (corrupt wire format, bad UTF-8 in a string), or anything a bad message raises
            return _Undecodable(full_name)

    return parse


def _checked(behavior: Any, handler: grpc.RpcMethodHandler) -> Any:
    """``behavior`` (a generated handler's servicer method) refusing undecodable requests with INVALID_ARGUMENT.
    Unary requests are checked before the servicer runs; a request stream is checked message by message as the
    servicer reads it (an InvalidArgument the servicer's error scope reports, or, for a message read before that
    scope is entered, this wrapper)."""
    async def refuse(bad: _Undecodable, context: grpc.aio.ServicerContext) -> None:
        log.info("request refused: %s", bad.message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)

    async def requests(source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for message in source:
            if isinstance(message, _Undecodable):
                raise InvalidArgument(message.message)
            yield message

    if handler.request_streaming:
        if inspect.isasyncgenfunction(behavior):
            async def stream_gen(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in behavior(requests(request_iterator), context):
                        yield response
                except GrymError as exc:  # raised before the servicer's own error scope
                    await context.abort(exc.code, exc.message)
            return stream_gen

        async def stream_call(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(requests(request_iterator), context)
            except GrymError as exc:  # raised before the servicer's own error scope
                await context.abort(exc.code, exc.message)
        return stream_call

    if inspect.isasyncgenfunction(behavior):
        async def unary_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response
        return unary_gen

    async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await refuse(request, context)
        return await behavior(request, context)
    return unary_call


def add_to_server(service: OrchestratorService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_OrchestratorServicer_to_server``, with request bytes that do
    not parse answered INVALID_ARGUMENT ("request is not a valid grym.v1.XRequest message") instead of grpc.aio's
    UNKNOWN. The generated registration is reused (captured), so every RPC of the proto is covered."""
    captured: dict[str, grpc.RpcMethodHandler] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            captured.update(handlers)

    pb_grpc.add_OrchestratorServicer_to_server(service, Capture())
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method, handler in captured.items():
        kind = ("stream_stream" if handler.request_streaming and handler.response_streaming else
                "stream_unary" if handler.request_streaming else
                "unary_stream" if handler.response_streaming else "unary_unary")
        behavior = getattr(handler, kind)
        message_type = handler.request_deserializer.__self__  # the generated XRequest.FromString's class
        handlers[method] = handler._replace(request_deserializer=_lenient(message_type),
                                            **{kind: _checked(behavior, handler)})
    service_name = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def _encoding(value: int) -> str:
    return convert.pcm_encoding(value)

