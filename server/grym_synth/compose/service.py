"""Compose: the coordinator reads a musical request, plans, and the plan runs as a workflow.

Order of a Compose call (the seed design's "Model Orchestrator"):
  1. recall stored patterns relevant to the request (keyword + rating ranked) as context. This runs before the
     first token, so it reads the in-memory recall index (grym_synth.memory.recall_index), not Milvus (only until
     the index has loaded at start-up); its one I/O is the ratings lookup of the matches (SQLite/PostgreSQL);
  2. stream the coordinator LLM's tokens (thinking vs answer) through its circuit breaker;
  3. take its JSON plan when it validates, else the rule-based plan with the reason (garbage, stall, outage);
  4. run the plan as a DAG on the real executors (AudioLDM on Triton, Wav2Vec2 on Triton, Milvus) with the
     workflow engine persisting every transition;
  5. stream features, each section's audio as soon as it is final (:mod:`grym_synth.compose.longform` joins the
     windows of a sectioned plan), progress over the whole piece, the mastered piece
     (:mod:`grym_synth.compose.mastering`), and the final workflow record.
Cancellation or the deadline cancels the coordinator stream and every running step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import math
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from grym_synth.analysis.music import Detail, MusicDescription
from grym_synth.analysis.service import AnalysisService, music_fields
from grym_synth.compose.longform import PieceJoiner
from grym_synth.compose.mastering import MasterSettings, apply_gain, master, predicted_gain_db
from grym_synth.core.audio import TARGET_RATE_HZ, AudioFormat, encode_audio, encoded_rate_hz, to_mono_16k
from grym_synth.core.compute import run_cpu
from grym_synth.coordinator.base import CoordinatorBackend, TokenEvent
from grym_synth.core.errors import Cancelled, DeadlineExceeded, GrymError, InvalidArgument
from grym_synth.generation.service import (DEFAULT_INIT_STRENGTH, AudioData, GenerationService, InitSpec, Progress,
                                          fit_prompt, validate)
from grym_synth.inference.export.coordinator import DEFAULT_MAX_TOKENS, GENERATION_DEFAULTS, MAX_TOKENS_LIMIT
from grym_synth.memory.learning import FeedbackStore, detect_clusters, recall_for_request
from grym_synth.memory.store import PatternRecord, PatternStore, validate_tags
from grym_synth.planning.choose import choose_plan
from grym_synth.planning.plan import FROM_PATTERN_STEPS, Plan, Step
from grym_synth.planning.schema import MAX_PIECE_S, MIN_PIECE_S
from grym_synth.planning.prompt import plan_instructions
from grym_synth.planning.request import parse_request
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.core.resilience import AsyncBreaker
from grym_synth.workflow.engine import WorkflowEngine
from grym_synth.workflow.events import (StepFinished, StepProgress, WorkflowCancelled, WorkflowEvent, WorkflowFailed,
                                        WorkflowFinished)
from grym_synth.workflow.executors import RecallExecutor, StepContext, StoreExecutor
from grym_synth.workflow.store import WorkflowRecord, WorkflowStore

log = logging.getLogger(__name__)

MAX_REQUEST_CHARS = 4000
CHUNK_BYTES = 256 * 1024
SECTION_PART_S = 60.0  # longest stretch of a section in one ComposeSectionAudio (24-bit WAV, the largest: 2.9 MB)
RECALL_TOP_K = 5
CLUSTER_TTL_S = 60.0
CLUSTER_LINES = 5


def cluster_context(clusters: Sequence[tuple[str, int, float]]) -> str:
    """Recurring patterns (label, size, mean rating) as a few lines of coordinator context."""
    if not clusters:
        return ""
    lines = ["Recurring patterns in memory (label, size, mean rating):"]
    lines += [f"- {label} ({size} patterns, rating {rating:.1f})" for label, size, rating in clusters[:CLUSTER_LINES]]
    return "\n".join(lines)


# How the coordinator model words a prompt longer than its context (model_repository/coordinator/1/model.py).
CONTEXT_OVERFLOW = "the model context is"


def compose_prompt(request: str, recalled: Sequence[PatternRecord], clusters_text: str = "") -> str:
    """DeepSeek-R1 guidance: no system prompt, so the instructions and context go into the user turn."""
    parts = [request.strip(), plan_instructions(recalled)]
    if clusters_text:
        parts.append(clusters_text)
    return "\n\n".join(parts)


@dataclass
class PlanChosen:
    plan: Plan
    recalled: list[PatternRecord]


@dataclass
class Features:
    step_id: str
    frames: int
    embedding: list[float]
    duration_s: float
    music: dict[str, Any] | None = None  # music_record of the analysed audio


@dataclass
class Finished:
    record: WorkflowRecord


@dataclass
class SectionReady:
    """A section whose audio is final: one complete file, mastered with the provisional gain ``gain_db``."""

    index: int
    name: str
    start_s: float
    end_s: float
    data: bytes
    sample_rate_hz: int  # the rate of ``data`` as encoded (MP3/Opus store 16 kHz audio at a rate they take)
    gain_db: float
    fmt: AudioFormat = AudioFormat.WAV_PCM16


@dataclass
class PieceProgress:
    """Work units of the whole piece: denoising steps of every window, the joins, and the master."""

    done: int
    total: int
    elapsed_s: float
    eta_s: float


# What running a plan yields (Compose adds the coordinator's tokens and the chosen plan before these).
PieceEvent = WorkflowEvent | Features | AudioData | Finished | SectionReady | PieceProgress


def encode_output(samples: np.ndarray, rate: int, fmt: AudioFormat = AudioFormat.WAV_PCM16) -> bytes:
    """The one place where Compose turns samples into a file, in the request's output format."""
    return encode_audio(samples, rate, fmt)


def piece_data(samples: np.ndarray, rate: int, fmt: AudioFormat) -> AudioData:
    """The mastered piece for the API's chunk builder: its float samples (encoded there in ``fmt`` at full
    precision), plus the 16-bit WAV chunks only when that is the format asked for."""
    chunks: list[bytes] = []
    if fmt == AudioFormat.WAV_PCM16:
        data = encode_output(samples, rate)
        chunks = [data[i: i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    return AudioData(chunks, rate, np.asarray(samples, dtype=np.float32))


def music_record(desc: MusicDescription | None) -> dict[str, Any] | None:
    """A description as a workflow record and ComposeFeatures keep it: summary detail (no notes or beats), the
    fields a stored pattern keeps (memory.music_index.MusicFields) without the per-tag scores."""
    fields = music_fields(desc.summary() if desc is not None else None)
    if fields is None:
        return None
    record = asdict(fields)
    record.pop("tag_scores", None)
    return record


async def describe(analysis: AnalysisService, samples: np.ndarray, deadline: float | None,
                   what: str) -> dict[str, Any] | None:
    """The summary description of 16 kHz samples, or None: a description is extra, so a failure (the music models
    unavailable, the deadline reached) is logged and never fails the piece; a cancellation still propagates."""
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        log.warning("no music description of %s: the deadline has passed", what)
        return None
    try:
        desc = await asyncio.wait_for(analysis.describe_music(samples, Detail.SUMMARY, deadline=deadline), remaining)
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the description leaves it empty
        log.warning("no music description of %s: %s", what, getattr(exc, "message", None) or repr(exc))
        return None
    return music_record(desc)


def validate_duration(value: float) -> float | None:
    """ComposeRequest.duration_seconds: 0 means "from the request text"; else finite and within the piece limits."""
    if value == 0:
        return None
    if not math.isfinite(value) or not MIN_PIECE_S <= value <= MAX_PIECE_S:
        raise InvalidArgument(f"duration_seconds must be {MIN_PIECE_S:g} to {MAX_PIECE_S:g} seconds (0: the length the "
                              f"request text asks for, or the default), got {value}")
    return float(value)


class ProgressTracker:
    """Whole-piece progress from the window steps' denoising progress, the joins and the master."""

    def __init__(self, plan: Plan) -> None:
        self.t0 = time.monotonic()
        windows = {w.step_id for s in plan.sections for w in s.windows}
        self.totals = {s.id: int(s.params.get("steps", 1)) for s in plan.steps if s.id in windows}
        self.steps: dict[str, int] = dict.fromkeys(self.totals, 0)
        self.joins = max(0, len(windows) - 1)
        self.joined = 0
        self.mastered = 0
        self.total = sum(self.totals.values()) + self.joins + 1

    @property
    def done(self) -> int:
        return sum(self.steps.values()) + self.joined + self.mastered

    def step(self, step_id: str, done: int) -> bool:
        """Record a window's progress; True when it moved."""
        if step_id not in self.steps or done <= self.steps[step_id]:
            return False
        self.steps[step_id] = min(done, self.totals[step_id])
        return True

    def event(self) -> PieceProgress:
        elapsed = time.monotonic() - self.t0
        done = self.done
        eta = elapsed * (self.total - done) / done if done else 0.0
        return PieceProgress(done, self.total, round(elapsed, 3), round(eta, 3))


# --- executors: plan steps on the real models -------------------------------------------------------------------------
class GenerateExecutor:
    """generate / vary / continue: AudioLDM on Triton; denoising progress becomes step progress.

    ``in_flight`` bounds the generations one workflow has running (besides the shared generation slots): its
    windows start in plan order, so on a device where batching is not free (CPU) the first section is final
    after a few windows instead of after all of them — time to first audio — while up to that many still batch.
    With a bound, the windows named by :meth:`lead` (the first section's) run first and alone: the first section
    is heard after its own generation time, not after a batch that also holds later windows."""

    def __init__(self, generation: GenerationService, in_flight: int = 0) -> None:
        self.generation = generation
        self.in_flight = in_flight
        self._limits: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._lead: dict[str, tuple[set[str], asyncio.Event]] = {}

    def lead(self, workflow_id: str, step_ids: Iterable[str]) -> None:
        """The workflow's other generate steps wait until these have finished (no-op without an in-flight bound)."""
        ids = set(step_ids)
        if self.in_flight and ids:
            self._lead[workflow_id] = (ids, asyncio.Event())

    def forget(self, workflow_id: str) -> None:
        self._lead.pop(workflow_id, None)

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if not self.in_flight:
            return await self._run(step, inputs, ctx)
        lead = self._lead.get(ctx.workflow_id)
        if lead is None or step.id not in lead[0]:
            if lead is not None:
                await lead[1].wait()
            return await self._bounded(step, inputs, ctx)
        try:
            return await self._bounded(step, inputs, ctx)
        finally:  # success or failure: a failed lead fails the workflow, which cancels the waiting steps
            lead[0].discard(step.id)
            if not lead[0]:
                lead[1].set()

    async def _bounded(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        sem, users = self._limits.get(ctx.workflow_id, (asyncio.Semaphore(self.in_flight), 0))
        self._limits[ctx.workflow_id] = (sem, users + 1)
        try:
            async with sem:
                return await self._run(step, inputs, ctx)
        finally:
            sem, users = self._limits[ctx.workflow_id]
            if users <= 1:
                del self._limits[ctx.workflow_id]
            else:
                self._limits[ctx.workflow_id] = (sem, users - 1)

    async def _run(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        q = inputs["params"]
        # The plan's prompts are the server's own text (request + section + descriptors): fitted, not refused.
        params = validate(fit_prompt(str(q["prompt"])), fit_prompt(str(q.get("negative_prompt") or ""), True),
                          float(q["duration_s"]),
                          int(q["steps"]), float(q["guidance_scale"]), int(q["seed"]), str(q["scheduler"]),
                          self.generation.max_duration_s)
        if step.type in FROM_PATTERN_STEPS and inputs.get("init_pattern_id"):  # from the recalled pattern's audio
            params = await self.generation.with_init(params, InitSpec(
                mode=step.type, pattern_id=str(inputs["init_pattern_id"]),
                strength=float(inputs.get("strength", DEFAULT_INIT_STRENGTH))))
        samples, seed, cached = np.zeros(0, np.float32), params.seed or 0, False
        # Waits for one of the generation slots shared with Generate; cancelling the step (the client went away,
        # the deadline, a sibling failed) closes the Triton stream, and the audioldm model stops within one step.
        stream = self.generation.synthesize(params, deadline=ctx.deadline, request_id=ctx.request_id,
                                            wait_for_slot=True, what="Compose")
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                if isinstance(item, Progress):
                    await ctx.progress(item.step, item.total_steps, "denoising")
                else:
                    samples, seed, cached = item
        return {"audio": samples, "sample_rate_hz": TARGET_RATE_HZ, "seed": seed, "cached": cached,
                "duration_s": len(samples) / TARGET_RATE_HZ, "params": dict(q),
                "init_pattern_id": params.init_pattern_id}  # set when a vary/continue step started from stored audio


def result_audio(audio: Any, rate: int | None) -> np.ndarray:
    """A step's audio as the 16 kHz mono samples a pattern stores (memory/audio_store.py)."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    return to_mono_16k(samples[:, None], int(rate)) if rate and rate != TARGET_RATE_HZ else samples


class AnalyzeExecutor:
    """analyze: Wav2Vec2 on Triton over a previous step's audio."""

    def __init__(self, analysis: AnalysisService,
                 step_music: dict[str, dict[str, dict[str, Any]]] | None = None) -> None:
        self.analysis = analysis
        self.step_music = step_music if step_music is not None else {}

    async def embed(self, audio: Any, rate: int | None) -> tuple[list[float], float]:
        result = await self._run(audio, rate, None, "")
        return result.embedding.tolist(), result.duration_s

    async def _run(self, audio: Any, rate: int | None, deadline: float | None, request_id: str) -> Any:
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        if rate and rate != TARGET_RATE_HZ:
            samples = to_mono_16k(samples[:, None], int(rate))
        return await self.analysis.run_model(self.analysis.validate(samples, "step audio"), include_features=False,
                                             deadline=deadline, request_id=request_id)

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        audio = result_audio(inputs["audio"], inputs.get("sample_rate_hz"))
        result, music = await asyncio.gather(
            self._run(audio, TARGET_RATE_HZ, ctx.deadline, ctx.request_id),
            describe(self.analysis, audio, ctx.deadline, f"step {step.id} of workflow {ctx.workflow_id}"))
        if music is not None:  # for a store step downstream (see TaggingStoreExecutor)
            self.step_music.setdefault(ctx.workflow_id, {})[step.id] = music
        return {"embedding": result.embedding.tolist(), "frames": result.frames, "duration_s": result.duration_s,
                "analysed_audio": audio, "music": music}


class TaggingStoreExecutor(StoreExecutor):
    """store, adding the Compose request's tags (looked up by workflow id) to the step's own, and the music
    description of what it stores: the upstream analyze step's (``step_music``), else described here from the
    audio of a generate -> store link."""

    def __init__(self, *args: Any, request_tags: dict[str, dict[str, str]], analysis: AnalysisService,
                 step_music: dict[str, dict[str, dict[str, Any]]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_tags = request_tags
        self.analysis = analysis
        self.step_music = step_music

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        extra = self.request_tags.get(ctx.workflow_id) or {}
        if extra:
            inputs = {**inputs, "tags": {**(inputs.get("tags") or step.params.get("tags") or {}), **extra}}
        if inputs.get("music") is None:
            inputs = {**inputs, "music": await self._music(step, inputs, ctx)}
        return await super().__call__(step, inputs, ctx)

    async def _music(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        described = self.step_music.get(ctx.workflow_id, {})
        music = next((described[u] for u in step.upstream if described.get(u)), None)
        if music is None and inputs.get("embedding") is None and inputs.get("audio") is not None:
            audio = result_audio(inputs["audio"], inputs.get("sample_rate_hz"))
            music = await describe(self.analysis, audio, ctx.deadline, f"step {step.id} of workflow {ctx.workflow_id}")
        return music


# --- the service ----------------------------------------------------------------------------------------------------
class ComposeService:
    """Coordinator -> plan -> workflow, as one event stream."""

    def __init__(self, *, coordinator: CoordinatorBackend | None, breaker: AsyncBreaker,
                 generation: GenerationService, analysis: AnalysisService, patterns: PatternStore,
                 workflows: WorkflowStore, feedback: FeedbackStore, rules: RuleBasedPlanner,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = GENERATION_DEFAULTS["temperature"],
                 top_p: float = GENERATION_DEFAULTS["top_p"], mastering: MasterSettings | None = None,
                 windows_in_flight: int = 0) -> None:
        self.coordinator = coordinator
        self.breaker = breaker
        self.patterns = patterns
        self.workflows = workflows
        self.feedback = feedback
        self.rules = rules
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.mastering = mastering or MasterSettings()
        self.request_tags: dict[str, dict[str, str]] = {}
        self._clusters_text = ""
        self._clusters_at = float("-inf")
        self._clusters_task: asyncio.Task[None] | None = None
        self.analysis = analysis
        self.step_music: dict[str, dict[str, dict[str, Any]]] = {}  # workflow id -> analyze step id -> music_record
        analyze = AnalyzeExecutor(analysis, self.step_music)
        self.generate = generate = GenerateExecutor(generation, windows_in_flight)
        self.engine = WorkflowEngine({
            "generate": generate, "vary": generate, "continue": generate, "analyze": analyze,
            "store": TaggingStoreExecutor(patterns, analyze=analyze.embed, request_tags=self.request_tags,
                                          analysis=analysis, step_music=self.step_music),
            "recall": RecallExecutor(patterns, feedback),
        }, workflows)

    @staticmethod
    def validate(request: str, max_tokens: int, tags: Mapping[str, str]) -> None:
        if not request.strip():
            raise InvalidArgument("request is empty: describe the music to compose")
        if len(request) > MAX_REQUEST_CHARS:
            raise InvalidArgument(f"request is {len(request)} characters; at most {MAX_REQUEST_CHARS} are allowed")
        if not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidArgument(f"max_tokens must be 1..{MAX_TOKENS_LIMIT} (0: server default), got {max_tokens}")
        validate_tags(tags)

    def clusters_text(self) -> str:
        """The latest cluster summary; refreshed in the background at most every CLUSTER_TTL_S so that a Compose
        call never waits for k-means over the whole pattern memory."""
        stale = time.monotonic() - self._clusters_at > CLUSTER_TTL_S
        if stale and (self._clusters_task is None or self._clusters_task.done()):
            self._clusters_task = asyncio.create_task(self._refresh_clusters(), name="cluster-context")
        return self._clusters_text

    async def _refresh_clusters(self) -> None:
        try:
            clusters = await detect_clusters(self.patterns, None, feedback=self.feedback)
            self._clusters_text = cluster_context([(c.label, c.size, c.mean_rating or 0.0) for c in clusters])
        except GrymError as exc:  # memory unavailable: keep the last summary, retry after the TTL
            log.info("cluster context not refreshed: %s", exc.message)
        self._clusters_at = time.monotonic()

    async def close(self) -> None:
        if self._clusters_task is not None:
            self._clusters_task.cancel()

    def prompt(self, request: str, recalled: Sequence[PatternRecord]) -> str:
        return compose_prompt(request, recalled, self.clusters_text())

    async def _coordinate(self, request: str, recalled: Sequence[PatternRecord], *, max_tokens: int,
                          seed: int | None, deadline: float | None, request_id: str,
                          transcript: dict[str, list[str]]) -> AsyncIterator[TokenEvent]:
        """Coordinator tokens; a failure (down, stalled, garbage stream, open breaker) is recorded in
        ``transcript["error"]`` and ends the stream so the rule-based planner takes over."""
        if self.coordinator is None:
            transcript["error"].append("no coordinator backend is configured")
            return
        # The prompt is the server's own text: when request + context overflow the model's context window, the
        # context (recalled patterns, clusters) goes first, then the rule-based planner takes over.
        prompts = list(dict.fromkeys([self.prompt(request, recalled), compose_prompt(request, ())]))
        for attempt, prompt in enumerate(prompts, 1):
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                async with self.breaker.guard():
                    stream = self.coordinator.stream(prompt, max_tokens=max_tokens, temperature=self.temperature,
                                                     top_p=self.top_p, seed=seed, deadline_s=remaining,
                                                     request_id=request_id)
                    async with contextlib.aclosing(stream) as tokens:
                        async for event in tokens:
                            transcript[event.kind].append(event.text)
                            yield event
                return
            except InvalidArgument as exc:
                if CONTEXT_OVERFLOW not in exc.message:
                    raise
                if attempt < len(prompts):
                    log.info("coordinator prompt too long, retrying without the recalled context: %s", exc.message)
                    continue
                log.warning("coordinator prompt too long, using the rule-based planner: %s", exc.message)
                transcript["error"].append(f"the request does not fit the coordinator's context: {exc.message}")
            except Cancelled:
                raise
            except GrymError as exc:
                if isinstance(exc, DeadlineExceeded) and deadline is not None and time.monotonic() >= deadline:
                    raise  # the caller's own deadline: nothing left to fall back with
                log.warning("coordinator failed, using the rule-based planner: %s", exc.message)
                transcript["error"].append(exc.message)
            return

    async def compose(self, request: str, *, max_tokens: int, seed: int | None, tags: Mapping[str, str],
                      deadline: float | None, request_id: str, workflow_id: str,
                      duration_s: float = 0.0, output_format: AudioFormat = AudioFormat.WAV_PCM16
                      ) -> AsyncIterator[TokenEvent | PlanChosen | PieceEvent]:
        self.validate(request, max_tokens, tags)
        duration = validate_duration(duration_s)
        recalled = await recall_for_request(self.patterns, self.feedback, request, RECALL_TOP_K)
        transcript: dict[str, list[str]] = {"thinking": [], "answer": [], "error": []}
        async for token in self._coordinate(request, recalled, max_tokens=max_tokens or self.max_tokens, seed=seed,
                                            deadline=deadline, request_id=request_id, transcript=transcript):
            yield token
        answer = "".join(transcript["answer"]) if not transcript["error"] else None
        context = await self._with_named_pattern(request, recalled, deadline)
        plan = choose_plan(answer, request, context, self.rules,
                           coordinator_error="; ".join(transcript["error"]) or None, duration_s=duration)
        yield PlanChosen(plan, list(recalled))
        self.request_tags[workflow_id] = dict(tags)
        try:
            async for event in self._run(plan, request, request_id, deadline, workflow_id, transcript,
                                         output_format):
                yield event
        finally:
            self.request_tags.pop(workflow_id, None)
            self.step_music.pop(workflow_id, None)

    async def _with_named_pattern(self, request: str, recalled: list[PatternRecord],
                                  deadline: float | None) -> list[PatternRecord]:
        """The planner's context: the recalled patterns, with the pattern a "like pattern X" request names read from
        the store (the recall index keeps no music), so that the variation keeps its tempo and key. Best effort: a
        missing or unreadable pattern leaves the context as it was (the recall step reports a missing pattern)."""
        pid = parse_request(request, (r.id for r in recalled)).pattern_id
        known = next((r for r in recalled if r.id == pid), None)
        if not pid or (known is not None and known.music is not None):
            return recalled
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            named = await asyncio.wait_for(self.patterns.get(pid), remaining)
        except Cancelled:
            raise
        except (GrymError, asyncio.TimeoutError) as exc:
            log.info("pattern %r named by the request not read for planning: %s", pid,
                     getattr(exc, "message", None) or repr(exc))
            return recalled
        return [named if r.id == pid else r for r in recalled] if known is not None else [*recalled, named]

    async def _run(self, plan: Plan, request: str, request_id: str, deadline: float | None, workflow_id: str,
                   transcript: dict[str, list[str]], fmt: AudioFormat = AudioFormat.WAV_PCM16
                   ) -> AsyncIterator[PieceEvent]:
        if plan.sections:  # the first section is rendered first and alone: time to first audio
            self.generate.lead(workflow_id, (w.step_id for w in plan.sections[0].windows))
        try:
            async with contextlib.aclosing(self._run_plan(plan, request, request_id, deadline, workflow_id,
                                                          transcript, fmt)) as events:
                async for event in events:
                    yield event
        finally:
            self.generate.forget(workflow_id)

    async def _run_plan(self, plan: Plan, request: str, request_id: str, deadline: float | None, workflow_id: str,
                        transcript: dict[str, list[str]], fmt: AudioFormat) -> AsyncIterator[PieceEvent]:
        run = await self.engine.start(plan, request_text=request, request_id=request_id, deadline=deadline,
                                      thinking="".join(transcript["thinking"]),
                                      answer="".join(transcript["answer"]), workflow_id=workflow_id)
        joiner = PieceJoiner(plan, TARGET_RATE_HZ, self.mastering) if plan.sections else None
        progress = ProgressTracker(plan) if plan.sections else None
        final: WorkflowEvent | None = None
        async for event in run.events():
            yield event
            if isinstance(event, StepFinished) and event.step_type == "analyze":
                out = run.outputs.get(event.step_id, {})
                yield Features(event.step_id, int(out.get("frames", 0)), list(out.get("embedding", [])),
                               float(out.get("duration_s", 0.0)), out.get("music"))
            if joiner is not None and progress is not None:
                async for item in self._piece_event(event, run.outputs, joiner, progress, fmt):
                    yield item
            if isinstance(event, (WorkflowFinished, WorkflowFailed, WorkflowCancelled)):
                final = event
        if isinstance(final, WorkflowFinished):
            if joiner is not None and progress is not None:
                samples = await run_cpu(lambda: master(joiner.piece(), TARGET_RATE_HZ, self.mastering)[0])
                progress.mastered = 1
                yield progress.event()
            else:
                pieces = [np.asarray(out["audio"], dtype=np.float32) for _, out in run.audio() if "audio" in out]
                samples = (await run_cpu(master, np.concatenate(pieces), TARGET_RATE_HZ, self.mastering))[0] \
                    if pieces else None
            if samples is not None:
                yield await run_cpu(piece_data, samples, TARGET_RATE_HZ, fmt)
                await self._describe_piece(samples, deadline, workflow_id)
        yield Finished(await self.workflows.get(workflow_id))

    async def _describe_piece(self, samples: np.ndarray, deadline: float | None, workflow_id: str) -> None:
        """Workflow.music: what the mastered piece is, kept with the record (best effort, like the description)."""
        music = await describe(self.analysis, samples, deadline, f"workflow {workflow_id}")
        if music is None:
            return
        try:
            await self.workflows.set_music(workflow_id, music)
        except GrymError as exc:
            log.warning("music description of workflow %s not stored: %s", workflow_id, exc.message)

    async def _piece_event(self, event: WorkflowEvent, outputs: Mapping[str, Mapping[str, Any]], joiner: PieceJoiner,
                           progress: ProgressTracker, fmt: AudioFormat = AudioFormat.WAV_PCM16
                           ) -> AsyncIterator[SectionReady | PieceProgress]:
        """Whole-piece progress, and the audio of every section that a finished window made final."""
        if isinstance(event, StepProgress) and progress.step(event.step_id, event.done):
            yield progress.event()
        if not (isinstance(event, StepFinished) and event.step_id in progress.totals):
            return
        moved = progress.step(event.step_id, progress.totals[event.step_id])  # a cached window reports no steps
        placed = joiner.placed
        finals = joiner.add(event.step_id, outputs[event.step_id]["audio"])
        progress.joined = max(0, joiner.placed - 1)
        if moved or joiner.placed != placed:
            yield progress.event()
        for index in finals:
            for part in await run_cpu(self._section_ready, joiner, index, fmt):
                yield part

    def _section_ready(self, joiner: PieceJoiner, index: int,
                       fmt: AudioFormat = AudioFormat.WAV_PCM16) -> list[SectionReady]:
        """A final section, mastered with the provisional gain: the loudness of everything final so far, shifted by
        how much louder the whole plan is than that part (see mastering.predicted_gain_db). A section longer than
        SECTION_PART_S is sent as consecutive parts (same index and name, each a complete file with its own
        start/end), so that every message stays far below the gRPC message limit."""
        rate = TARGET_RATE_HZ
        start, end = joiner.bounds[index], joiner.bounds[index + 1]
        gain = predicted_gain_db(joiner.audio_so_far(), rate, joiner.planned_db(end), joiner.planned_db(),
                                 self.mastering)
        audio = apply_gain(joiner.section_audio(index), rate, gain, self.mastering)
        name = joiner.plan.sections[index].name
        parts = max(1, math.ceil((end - start) / (SECTION_PART_S * rate)))
        edges = np.linspace(0, end - start, parts + 1).round().astype(int)
        return [SectionReady(index, name, (start + a) / rate, (start + b) / rate, encode_output(audio[a:b], rate, fmt),
                             encoded_rate_hz(rate, fmt), gain, fmt) for a, b in zip(edges, edges[1:])]


def new_workflow_id() -> str:
    return str(uuid.uuid4())
