"""The workflow engine: runs a validated :class:`~server.plans.Plan` as a DAG and streams what happens.

Why a DAG engine rather than a fixed pipeline: the coordinator composes different shapes of work (several
segments rendered in parallel, recall → vary chains, analyse-and-store tails), and independent branches should
overlap — a Triton model serves concurrent requests, so two generate steps in flight finish sooner than two in a row.

How it runs:

* Steps whose upstream steps have all succeeded start at once, as tasks of one :class:`asyncio.TaskGroup`.
* A step's ``inputs`` are built from upstream *outputs* by typed context adapters (:class:`AdapterRegistry`):
  small classes keyed by (source step type, target step type) — e.g. :class:`RecallToVary` turns a recalled
  pattern's provenance into generate parameters for a variation. Executors never look at other steps.
* Audio-producing steps get ``provenance`` (prompt, seed, scheduler, ...) added to their outputs, and it flows to
  the store step's pattern metadata: every stored pattern can be regenerated exactly.
* Failure of a step fails the workflow fast by default (running siblings are cancelled); with
  ``fail_fast=False`` only its dependents are cancelled and independent branches finish.
* Cancelling the consumer of :meth:`WorkflowRun.events` (a gRPC client that went away), :meth:`WorkflowRun.cancel`,
  or the deadline cancels every running step: executors see :class:`asyncio.CancelledError`.
* Every transition is persisted in the :class:`~server.workflow_store.WorkflowStore`; the terminal event is
  emitted only after the final state is stored, so a client that saw it can read the record back.

Executor contract per step type (``inputs`` as built by the default adapters):

=========  ======================================================================  ============================
type       inputs                                                                  must return
=========  ======================================================================  ============================
generate   ``params``: prompt, negative_prompt, duration_s, steps, guidance_scale,  ``audio`` (np.ndarray),
           seed, scheduler, model                                                  ``sample_rate_hz``
vary       same ``params`` (from the recalled pattern) + ``varied_from``,           same as generate
           ``strength``, ``variation``
analyze    ``audio``, ``sample_rate_hz``, ``provenance``                            ``embedding``, ``duration_s``
store      ``embedding``, ``duration_s``, ``metadata``, ``tags`` — or ``audio``,    ``pattern_id``, ``pattern``
           ``sample_rate_hz``, ``duration_s``, ``metadata``, ``tags`` from audio
recall     ``{}`` or ``embedding`` (params: query, tags, pattern_id, top_k)          ``patterns``, ``pattern``
=========  ======================================================================  ============================

:class:`RecallExecutor` and :class:`StoreExecutor` below implement recall and store over pattern memory; the
model-backed executors (generate/vary on AudioLDM, analyze on wav2vec2) live with the Triton clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from server.errors import Cancelled, FailedPrecondition, GrymError, public_message
from server.pattern_learning import FeedbackStore, rank_recalled, recall_for_request
from server.patterns import PatternRecord, PatternStore
from server.plans import (AUDIO_STEPS, GENERATE_DEFAULTS, GENERATE_KEYS, MAX_SEGMENT_S, Plan, Ref, Step,
                          derive_seed, wrap_seed)
from server.workflow_store import (StepRecord, StepState, WorkflowRecord, WorkflowState, WorkflowStore,
                                   default_owner, now_us, truncate)

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 10_000
MAX_SUMMARY_ITEMS = 16
MAX_SUMMARY_TEXT = 300
PROVENANCE_KEYS = GENERATE_KEYS


# --- events -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WorkflowEvent:
    """Base of the event stream; ``seq`` orders events of one workflow, ``at_us`` is wall-clock time."""

    kind: ClassVar[str] = "event"
    workflow_id: str
    seq: int
    at_us: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class PlanAccepted(WorkflowEvent):
    kind: ClassVar[str] = "plan_accepted"
    plan: dict[str, Any]
    planner: str
    fallback_reason: str | None


@dataclass(frozen=True, kw_only=True)
class StepStarted(WorkflowEvent):
    kind: ClassVar[str] = "step_started"
    step_id: str
    step_type: str


@dataclass(frozen=True, kw_only=True)
class StepProgress(WorkflowEvent):
    kind: ClassVar[str] = "step_progress"
    step_id: str
    done: int
    total: int
    message: str


@dataclass(frozen=True, kw_only=True)
class StepFinished(WorkflowEvent):
    kind: ClassVar[str] = "step_finished"
    step_id: str
    step_type: str
    summary: dict[str, Any]
    elapsed_s: float


@dataclass(frozen=True, kw_only=True)
class StepFailed(WorkflowEvent):
    kind: ClassVar[str] = "step_failed"
    step_id: str
    step_type: str
    code: str
    error: str


@dataclass(frozen=True, kw_only=True)
class StepCancelled(WorkflowEvent):
    kind: ClassVar[str] = "step_cancelled"
    step_id: str
    step_type: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class WorkflowFinished(WorkflowEvent):
    kind: ClassVar[str] = "workflow_finished"
    summary: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class WorkflowFailed(WorkflowEvent):
    kind: ClassVar[str] = "workflow_failed"
    code: str
    error: str
    failed_step: str | None
    summary: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class WorkflowCancelled(WorkflowEvent):
    kind: ClassVar[str] = "workflow_cancelled"
    reason: str
    summary: dict[str, Any]


TERMINAL_EVENTS = (WorkflowFinished, WorkflowFailed, WorkflowCancelled)


# --- executor protocol and context -----------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What an executor may know about its surroundings, and its one way to talk back: progress."""

    workflow_id: str
    step_id: str
    request_id: str
    deadline: float | None  # time.monotonic() value, as elsewhere in the orchestrator
    _emit: Callable[..., Any] = field(repr=False)

    async def progress(self, done: int, total: int, message: str = "") -> None:
        """Report progress (e.g. denoising step ``done`` of ``total``); shows up as a StepProgress event."""
        self._emit(StepProgress, step_id=self.step_id, done=int(done), total=int(total),
                   message=truncate(message, MAX_SUMMARY_TEXT))

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class StepExecutor(Protocol):
    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]: ...


# --- provenance -----------------------------------------------------------------------------------------------------
def provenance(step: Step, params: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to render the same audio again, plus where it came from."""
    prov = {k: params[k] for k in PROVENANCE_KEYS if k in params}
    prov.update({"step_id": step.id, "step_type": step.type})
    prov.update({k: v for k, v in (extra or {}).items() if v is not None})
    return prov


def provenance_metadata(prov: Mapping[str, Any] | None, **extra: Any) -> dict[str, str]:
    """Pattern metadata is ``dict[str, str]``; numbers are written so they parse back exactly (repr of floats)."""
    out: dict[str, str] = {}
    for key, value in {**(prov or {}), **extra}.items():
        if value is None:
            continue
        out[key] = repr(value) if isinstance(value, float) else str(value)
    return out


def generate_params_from_pattern(record: PatternRecord) -> dict[str, Any]:
    """Generate parameters that re-render a stored pattern.

    Patterns made by generate steps (here or by the Generate RPC, same metadata keys) carry their exact
    provenance, which is reproduced as recorded — including schedulers and step counts beyond what plans may
    ask for; the generate executor validates them as it does any request. Only the duration is clamped to one
    30 s segment. Patterns from plain audio uploads have no provenance: their tags become the prompt and the
    seed derives from the pattern id, so a variation is still possible."""
    meta = record.metadata
    prompt = (meta.get("prompt") or "").strip()
    if not prompt:
        words = [v for _, v in sorted(record.tags.items()) if v]
        prompt = ", ".join(["music", *words])[:512]
    params: dict[str, Any] = {**GENERATE_DEFAULTS, "prompt": prompt}
    params["negative_prompt"] = meta.get("negative_prompt", params["negative_prompt"])
    params["seed"] = wrap_seed(_parse(meta.get("seed"), int, derive_seed(f"pattern:{record.id}")))
    params["steps"] = _parse(meta.get("steps"), int, params["steps"])
    params["guidance_scale"] = _parse(meta.get("guidance_scale"), float, params["guidance_scale"])
    duration = _parse(meta.get("duration_s"), float, record.duration_s or params["duration_s"])
    params["duration_s"] = _clamp(duration, 0.5, MAX_SEGMENT_S)
    if _IDENTIFIER.match(meta.get("scheduler", "")):
        params["scheduler"] = meta["scheduler"]
    if _IDENTIFIER.match(meta.get("model", "")):
        params["model"] = meta["model"]
    return params


_IDENTIFIER = re.compile(r"^[a-z0-9_]{1,32}$")


def _parse(text: str | None, kind: Callable[[str], Any], default: Any) -> Any:
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        return default
    return value if not isinstance(value, float) or math.isfinite(value) else default


def _clamp(value: float, lo: float, hi: float) -> float:
    return float(min(max(value, lo), hi))


# --- context adapters -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One input edge being resolved: output ``ref`` of ``source`` feeds input ``param`` of ``target``."""

    param: str
    ref: Ref
    source: Step
    outputs: Mapping[str, Any]
    target: Step
    workflow_id: str


class ContextAdapter(Protocol):
    sources: ClassVar[tuple[str, ...]]
    target: ClassVar[str]

    def __call__(self, link: Link) -> dict[str, Any]: ...


class GenerateToAnalyze:
    """Pass the waveform (and its provenance, which analysis hands on to a store step)."""

    sources: ClassVar[tuple[str, ...]] = ("generate", "vary")
    target: ClassVar[str] = "analyze"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"audio": link.outputs["audio"], "sample_rate_hz": link.outputs.get("sample_rate_hz"),
                "provenance": link.outputs.get("provenance")}


class AnalysisToStore:
    """Embedding plus provenance metadata, so the stored pattern can be regenerated exactly."""

    sources: ClassVar[tuple[str, ...]] = ("analyze",)
    target: ClassVar[str] = "store"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"embedding": link.outputs["embedding"], "duration_s": float(link.outputs.get("duration_s") or 0.0),
                "metadata": provenance_metadata(link.outputs.get("provenance"), workflow_id=link.workflow_id),
                "tags": dict(link.target.params.get("tags") or {})}


class GenerateToStore:
    """Store straight from audio: the store executor analyses it first."""

    sources: ClassVar[tuple[str, ...]] = ("generate", "vary")
    target: ClassVar[str] = "store"

    def __call__(self, link: Link) -> dict[str, Any]:
        audio, rate = link.outputs["audio"], link.outputs.get("sample_rate_hz")
        prov = link.outputs.get("provenance") or {}
        duration = len(audio) / rate if rate and hasattr(audio, "__len__") else prov.get("duration_s", 0.0)
        return {"audio": audio, "sample_rate_hz": rate, "duration_s": float(duration),
                "metadata": provenance_metadata(prov, workflow_id=link.workflow_id),
                "tags": dict(link.target.params.get("tags") or {})}


class AnalysisToRecall:
    """Recall patterns similar to freshly analysed audio."""

    sources: ClassVar[tuple[str, ...]] = ("analyze",)
    target: ClassVar[str] = "recall"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"embedding": link.outputs["embedding"]}


class RecallToVary:
    """A recalled pattern's provenance becomes generate parameters for a variation.

    The prompt is kept (plus ``prompt_suffix``). ``strength`` 0 keeps the seed (an exact re-render); above 0 the
    seed moves by ``variation`` (default 1), which draws new noise for the same prompt and settings — the piece
    stays recognisably "like" the original. An explicit ``seed`` and other overrides on the vary step win."""

    sources: ClassVar[tuple[str, ...]] = ("recall",)
    target: ClassVar[str] = "vary"

    def __call__(self, link: Link) -> dict[str, Any]:
        record = _recalled_pattern(link)
        params = generate_params_from_pattern(record)
        p = link.target.params
        strength, variation = float(p.get("strength", 0.35)), int(p.get("variation", 1))
        original_seed = params["seed"]
        params["seed"] = int(p["seed"]) if "seed" in p else (
            original_seed if strength == 0 else wrap_seed(original_seed + variation))
        for key in ("negative_prompt", "duration_s", "steps", "guidance_scale", "scheduler", "model"):
            if key in p:
                params[key] = p[key]
        if p.get("prompt_suffix"):
            params["prompt"] = f"{params['prompt']}, {p['prompt_suffix']}"[:512]
        return {"params": params, "varied_from": record.id, "strength": strength, "variation": variation,
                "original_seed": original_seed}


def _recalled_pattern(link: Link) -> PatternRecord:
    value = link.outputs.get(link.ref.output)
    record = value[0] if isinstance(value, list) and value else value
    if not isinstance(record, PatternRecord):
        raise FailedPrecondition(f"recall step {link.source.id!r} found no pattern for vary step "
                                 f"{link.target.id!r} to vary")
    return record


class AdapterRegistry:
    """Adapters by (source step type, target step type); the engine asks it to resolve every input edge."""

    def __init__(self, adapters: Iterable[ContextAdapter] = ()) -> None:
        self._by_pair: dict[tuple[str, str], ContextAdapter] = {}
        for adapter in adapters:
            self.register(adapter)

    def register(self, adapter: ContextAdapter) -> None:
        for source in adapter.sources:
            self._by_pair[(source, adapter.target)] = adapter

    def find(self, source_type: str, target_type: str) -> ContextAdapter:
        try:
            return self._by_pair[(source_type, target_type)]
        except KeyError:
            raise FailedPrecondition(f"no context adapter from {source_type} to {target_type} steps") from None

    def resolve(self, step: Step, plan: Plan, outputs: Mapping[str, Mapping[str, Any]],
                workflow_id: str) -> dict[str, Any]:
        """The executor's ``inputs``: its own base inputs merged with every adapted input edge."""
        inputs: dict[str, Any] = base_inputs(step)
        for param, ref in step.inputs.items():
            source = plan.step(ref.step)
            link = Link(param, ref, source, outputs[ref.step], step, workflow_id)
            inputs.update(self.find(source.type, step.type)(link))
        return inputs


def base_inputs(step: Step) -> dict[str, Any]:
    """A generate step's inputs come from its own params (defaults already filled by validation)."""
    if step.type == "generate":
        return {"params": {k: step.params[k] for k in GENERATE_KEYS if k in step.params}}
    return {}


def default_adapters() -> AdapterRegistry:
    return AdapterRegistry([GenerateToAnalyze(), AnalysisToStore(), GenerateToStore(), AnalysisToRecall(),
                            RecallToVary()])


# --- summaries (never raw audio) -------------------------------------------------------------------------------------
def summarize(value: Any, depth: int = 0) -> Any:
    """A JSON-safe, bounded picture of an output: arrays become shape/dtype (+ RMS for audio-sized 1-D arrays),
    patterns their id and tags, long lists and strings are cut."""
    if isinstance(value, np.ndarray):
        return _summarize_array(value)
    if isinstance(value, PatternRecord):
        return {"id": value.id, "tags": dict(value.tags), "score": value.score, "duration_s": value.duration_s,
                "prompt": truncate(value.metadata.get("prompt", ""), MAX_SUMMARY_TEXT)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    if isinstance(value, (bool, int, str)) or value is None:
        return truncate(value, MAX_SUMMARY_TEXT) if isinstance(value, str) else value
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if depth >= 4:
        return truncate(repr(value), MAX_SUMMARY_TEXT)
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {str(k): summarize(v, depth + 1) for k, v in items[:MAX_SUMMARY_ITEMS * 2]}
        if len(items) > MAX_SUMMARY_ITEMS * 2:
            out["..."] = f"{len(items) - MAX_SUMMARY_ITEMS * 2} more keys"
        return out
    if isinstance(value, (list, tuple)):
        if len(value) > 64 and all(isinstance(v, (int, float)) for v in value[:64]):
            return {"length": len(value)}
        head = [summarize(v, depth + 1) for v in value[:MAX_SUMMARY_ITEMS]]
        return head + ([f"... {len(value) - MAX_SUMMARY_ITEMS} more"] if len(value) > MAX_SUMMARY_ITEMS else [])
    return truncate(repr(value), MAX_SUMMARY_TEXT)


def _summarize_array(a: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size and np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        out["finite"] = bool(finite.all())
        if finite.any():
            out["rms"] = float(np.sqrt(np.mean(np.square(a[finite], dtype=np.float64))))
    return out


def summarize_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    return summarize(dict(outputs))  # type: ignore[no-any-return]


# --- errors ---------------------------------------------------------------------------------------------------------
def describe_error(exc: BaseException) -> tuple[str, str]:
    """(gRPC code name, message) for an executor failure; unexpected exceptions are bugs and are logged.

    The message is stored in the workflow record and streamed to the client, so it gets the same treatment as a
    status message: no addresses, reprs or exception class names (the log keeps the full error)."""
    if isinstance(exc, GrymError):
        return exc.code.name, public_message(exc.message)
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED", "the step ran past its deadline"
    log.error("step failed with an unexpected error", exc_info=exc)
    return "INTERNAL", "internal error in the step; the server log has the details under the request id"


def _cancel_requested() -> bool:
    """True when the current task is being cancelled (by the TaskGroup, the deadline, or the consumer)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class _FailFast(Exception):
    """Raised out of a step task to make the TaskGroup cancel every other running step."""

    def __init__(self, step_id: str, code: str, message: str) -> None:
        super().__init__(message)
        self.step_id, self.code, self.message = step_id, code, message


# --- a running workflow -----------------------------------------------------------------------------------------------
class WorkflowRun:
    """Handle on one running workflow: its event stream, cancellation, and raw outputs (audio) for the caller."""

    def __init__(self, workflow_id: str, plan: Plan, request_id: str, deadline: float | None) -> None:
        self.workflow_id = workflow_id
        self.plan = plan
        self.request_id = request_id
        self.deadline = deadline
        self.steps: dict[str, StepRecord] = {s.id: StepRecord(s.id, s.type) for s in plan.steps}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.state = WorkflowState.PENDING
        self.error: str | None = None
        self.error_code: str | None = None
        self.failed_step: str | None = None
        self.summary: dict[str, Any] = {}
        self._queue: asyncio.Queue[WorkflowEvent | None] = asyncio.Queue()
        self._seq = 0
        self._started: set[str] = set()
        self._consumed = False
        self._cancel_reason: str | None = None
        self._driver: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    # events
    def emit(self, event_type: type[WorkflowEvent], **fields: Any) -> WorkflowEvent:
        self._seq += 1
        event = event_type(workflow_id=self.workflow_id, seq=self._seq, at_us=now_us(), **fields)
        if event_type is StepProgress and self._queue.qsize() >= MAX_QUEUED_EVENTS:
            return event  # nobody is reading fast enough: progress is the one kind we may drop
        self._queue.put_nowait(event)
        return event

    async def events(self) -> AsyncIterator[WorkflowEvent]:
        """The event stream, ending with one terminal event. Single consumer; leaving early (break, an error,
        or cancellation of the consuming task) cancels the workflow."""
        if self._consumed:
            raise RuntimeError("the events of a workflow run can be consumed once")
        self._consumed = True
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:
            if self._driver is not None and not self._driver.done():
                await self.cancel("the client stopped listening")

    async def cancel(self, reason: str = "cancelled by the caller") -> None:
        """Cancel every running step and wait until the CANCELLED state is stored."""
        if self._driver is None or self._driver.done():
            return
        self._cancel_reason = self._cancel_reason or reason
        self._driver.cancel()
        await asyncio.wait([self._driver])

    async def wait(self) -> WorkflowState:
        if self._driver is not None:
            await asyncio.wait([self._driver])
        return self.state

    @property
    def done(self) -> bool:
        return self._driver is not None and self._driver.done()

    def audio(self) -> list[tuple[str, dict[str, Any]]]:
        """Raw outputs of the plan's ``output`` steps, in order (what the caller concatenates)."""
        return [(sid, self.outputs[sid]) for sid in self.plan.output if sid in self.outputs]


# --- the engine -------------------------------------------------------------------------------------------------------
class WorkflowEngine:
    """Runs plans; one engine per orchestrator, many workflows at once."""

    def __init__(self, executors: Mapping[str, StepExecutor], store: WorkflowStore, *,
                 adapters: AdapterRegistry | None = None, fail_fast: bool = True, owner: str | None = None,
                 heartbeat_s: float = 10.0) -> None:
        self.executors = dict(executors)
        self.store = store
        self.adapters = adapters or default_adapters()
        self.fail_fast = fail_fast
        self.owner = owner or default_owner()
        self.heartbeat_s = heartbeat_s
        self.active: dict[str, WorkflowRun] = {}

    async def start(self, plan: Plan, *, request_text: str, request_id: str, deadline: float | None = None,
                    thinking: str = "", answer: str = "", workflow_id: str | None = None) -> WorkflowRun:
        """Record the workflow (PENDING) and start running it in the background; returns at once."""
        missing = sorted({s.type for s in plan.steps} - set(self.executors))
        if missing:
            raise FailedPrecondition(f"no executor for step type(s) {', '.join(missing)}")
        run = WorkflowRun(workflow_id or str(uuid.uuid4()), plan, request_id, deadline)
        await self.store.create(WorkflowRecord(
            id=run.workflow_id, request_text=request_text, request_id=request_id, planner=plan.planner,
            plan=plan.to_dict(), fallback_reason=plan.fallback_reason, steps=list(run.steps.values()),
            transcript_thinking=thinking, transcript_answer=answer, owner=self.owner))
        self.active[run.workflow_id] = run
        run._driver = asyncio.create_task(self._drive(run), name=f"workflow-{run.workflow_id}")
        return run

    async def run(self, plan: Plan, **kwargs: Any) -> AsyncIterator[WorkflowEvent]:
        """``start`` + ``events`` for callers that only stream."""
        run = await self.start(plan, **kwargs)
        async for event in run.events():
            yield event

    async def shutdown(self, reason: str = "the orchestrator is shutting down") -> None:
        """Cancel every active workflow (recorded as CANCELLED with the reason) — for a graceful stop."""
        await asyncio.gather(*(run.cancel(reason) for run in list(self.active.values())))

    # driving one workflow
    async def _drive(self, run: WorkflowRun) -> None:
        run.emit(PlanAccepted, plan=run.plan.to_dict(), planner=run.plan.planner,
                 fallback_reason=run.plan.fallback_reason)
        heartbeat = asyncio.create_task(self._heartbeat(run))
        try:
            run.state = WorkflowState.RUNNING
            await self.store.update_state(run.workflow_id, WorkflowState.RUNNING)
            async with asyncio.timeout_at(run.deadline):
                await self._run_dag(run)
            self._settle_partial_failure(run)
        except _FailFast as failure:
            self._fail(run, failure.code, f"step {failure.step_id!r} failed: {failure.message}", failure.step_id)
        except TimeoutError:
            self._fail(run, "DEADLINE_EXCEEDED", "the workflow ran past its deadline", None)
        except asyncio.CancelledError:
            run.state = WorkflowState.CANCELLED
            run.error = run._cancel_reason or "cancelled"
            run.error_code = "CANCELLED"
        except Exception as exc:  # the store failed, or a bug in the engine: still end the workflow visibly
            code, message = describe_error(exc)
            self._fail(run, code, message, None)
        finally:
            heartbeat.cancel()
        await self._finalize(run)

    def _fail(self, run: WorkflowRun, code: str, message: str, step_id: str | None) -> None:
        run.state, run.error_code, run.error, run.failed_step = WorkflowState.FAILED, code, message, step_id

    def _settle_partial_failure(self, run: WorkflowRun) -> None:
        """Without fail-fast the DAG finishes around failures; any failed (or unfinished) step fails the workflow."""
        failed = [r for r in run.steps.values() if r.state == StepState.FAILED]
        unfinished = [r for r in run.steps.values() if r.state != StepState.SUCCEEDED]
        if failed:
            first = failed[0]
            self._fail(run, first.error_code or "INTERNAL", f"step {first.step_id!r} failed: {first.error}",
                       first.step_id)
        elif unfinished:
            self._fail(run, "ABORTED", f"step {unfinished[0].step_id!r} did not finish", unfinished[0].step_id)
        else:
            run.state = WorkflowState.SUCCEEDED

    async def _run_dag(self, run: WorkflowRun) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for step in run.plan.steps:
                    if not step.upstream:
                        self._launch(run, step, tg)
        except BaseExceptionGroup as group:
            fail_fast = [e for e in group.exceptions if isinstance(e, _FailFast)]
            if fail_fast:
                raise fail_fast[0] from None
            raise group.exceptions[0] from None

    def _launch(self, run: WorkflowRun, step: Step, tg: asyncio.TaskGroup) -> None:
        try:
            tg.create_task(self._run_step(run, step, tg), name=f"step-{run.workflow_id}-{step.id}")
        except RuntimeError:
            return  # the group is shutting down (a failure or cancellation won the race): the step stays unrun
        run._started.add(step.id)

    async def _run_step(self, run: WorkflowRun, step: Step, tg: asyncio.TaskGroup) -> None:
        record = run.steps[step.id]
        record.state, record.started_at_us = StepState.RUNNING, now_us()
        await self._persist_step(run, record)
        # Emitted right before the executor is called (no await in between): "started" means it really runs.
        run.emit(StepStarted, step_id=step.id, step_type=step.type)
        t0 = time.monotonic()
        try:
            inputs = self.adapters.resolve(step, run.plan, run.outputs, run.workflow_id)
            ctx = StepContext(run.workflow_id, step.id, run.request_id, run.deadline, run.emit)
            outputs = self._complete_outputs(run, step, inputs, await self.executors[step.type](step, inputs, ctx))
        except asyncio.CancelledError:
            if _cancel_requested():
                record.state, record.finished_at_us = StepState.CANCELLED, now_us()
                raise
            # Nobody cancelled this step: its executor let a downstream call's cancellation escape. That is a
            # failure of the step, not a cancellation of the workflow (which would otherwise look "succeeded").
            await self._step_failed(run, step, Cancelled(f"the {step.type} executor was cancelled from within"))
            return
        except Exception as exc:
            await self._step_failed(run, step, exc)
            return
        run.outputs[step.id] = outputs
        record.state, record.finished_at_us = StepState.SUCCEEDED, now_us()
        record.summary = summarize_outputs(outputs)
        run.emit(StepFinished, step_id=step.id, step_type=step.type, summary=record.summary,
                 elapsed_s=round(time.monotonic() - t0, 6))
        await self._persist_step(run, record)
        for dependent in run.plan.dependents(step.id):
            if dependent.id not in run._started and all(
                    run.steps[u].state == StepState.SUCCEEDED for u in dependent.upstream):
                self._launch(run, dependent, tg)

    async def _step_failed(self, run: WorkflowRun, step: Step, exc: Exception) -> None:
        code, message = describe_error(exc)
        record = run.steps[step.id]
        record.state, record.finished_at_us = StepState.FAILED, now_us()
        record.error, record.error_code = message, code
        run.emit(StepFailed, step_id=step.id, step_type=step.type, code=code, error=message)
        await self._persist_step(run, record)
        if self.fail_fast:
            raise _FailFast(step.id, code, message)
        for dependent in self._downstream(run.plan, step.id):
            dep = run.steps[dependent]
            if dep.state == StepState.PENDING:
                run._started.add(dependent)
                dep.state, dep.error = StepState.CANCELLED, f"not run: upstream step {step.id!r} failed"
                run.emit(StepCancelled, step_id=dependent, step_type=dep.step_type, reason=dep.error)

    @staticmethod
    def _downstream(plan: Plan, step_id: str) -> list[str]:
        out: list[str] = []
        frontier = [step_id]
        while frontier:
            for dep in plan.dependents(frontier.pop()):
                if dep.id not in out:
                    out.append(dep.id)
                    frontier.append(dep.id)
        return out

    def _complete_outputs(self, run: WorkflowRun, step: Step, inputs: Mapping[str, Any],
                          outputs: Any) -> dict[str, Any]:
        """Add params/provenance, and check that what dependents will read is there (a missing output is the
        executor's bug, reported on its own step rather than as a confusing error downstream)."""
        if not isinstance(outputs, Mapping):
            raise GrymError(f"the {step.type} executor returned {type(outputs).__name__}, not a dict of outputs")
        out = dict(outputs)
        if step.type in AUDIO_STEPS:
            out.setdefault("params", dict(inputs.get("params") or {}))
            extra = {k: inputs.get(k) for k in ("varied_from", "strength", "variation", "original_seed")}
            out.setdefault("provenance", provenance(step, out["params"], extra))
        elif inputs.get("provenance") is not None:
            out.setdefault("provenance", inputs["provenance"])
        for dependent in run.plan.dependents(step.id):
            for ref in dependent.inputs.values():
                if ref.step == step.id and ref.output not in out:
                    raise GrymError(f"the {step.type} executor returned no {ref.output!r} output, which step "
                                    f"{dependent.id!r} needs")
        return out

    async def _persist_step(self, run: WorkflowRun, record: StepRecord) -> None:
        """Best effort: a store hiccup must not fail the music; the final write (or the stale-heartbeat reaper)
        still records how the workflow ended."""
        try:
            await self.store.update_step(run.workflow_id, dataclasses.replace(record))
        except GrymError as exc:
            log.warning("workflow %s: could not persist step %s: %s", run.workflow_id, record.step_id, exc.message)

    async def _heartbeat(self, run: WorkflowRun) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.store.heartbeat(run.workflow_id)
            except GrymError as exc:
                log.warning("workflow %s heartbeat failed: %s", run.workflow_id, exc.message)

    async def _finalize(self, run: WorkflowRun) -> None:
        """Close every step that did not finish, store the final state, then emit the terminal event."""
        reason = self._stop_reason(run)
        for record in run.steps.values():
            if record.state in (StepState.PENDING, StepState.RUNNING, StepState.CANCELLED) and not (
                    record.state == StepState.CANCELLED and record.error):
                record.state, record.error = StepState.CANCELLED, record.error or reason
                record.finished_at_us = record.finished_at_us or now_us()
                run.emit(StepCancelled, step_id=record.step_id, step_type=record.step_type, reason=record.error)
        run.summary = self._summary(run)
        try:
            await asyncio.shield(self.store.finish(
                run.workflow_id, run.state, steps=[dataclasses.replace(r) for r in run.steps.values()],
                summary=run.summary, error=run.error, error_code=run.error_code))
        except (GrymError, asyncio.CancelledError) as exc:
            log.error("workflow %s: storing the final state %s failed: %s", run.workflow_id, run.state.value, exc)
        except Exception:
            log.exception("workflow %s: storing the final state failed", run.workflow_id)
        self._emit_terminal(run)
        self.active.pop(run.workflow_id, None)

    @staticmethod
    def _stop_reason(run: WorkflowRun) -> str:
        if run.state == WorkflowState.CANCELLED:
            return f"cancelled: {run.error}"
        if run.failed_step:
            return f"not run: workflow failed at step {run.failed_step!r}"
        return f"not run: {run.error or 'workflow stopped'}"

    def _emit_terminal(self, run: WorkflowRun) -> None:
        if run.state == WorkflowState.SUCCEEDED:
            run.emit(WorkflowFinished, summary=run.summary)
        elif run.state == WorkflowState.CANCELLED:
            run.emit(WorkflowCancelled, reason=run.error or "cancelled", summary=run.summary)
        else:
            run.emit(WorkflowFailed, code=run.error_code or "INTERNAL", error=run.error or "failed",
                     failed_step=run.failed_step, summary=run.summary)
        run._queue.put_nowait(None)

    @staticmethod
    def _summary(run: WorkflowRun) -> dict[str, Any]:
        audio_s = 0.0
        for _, out in run.audio():
            params = out.get("params") or {}
            audio = out.get("audio")
            rate = out.get("sample_rate_hz")
            if rate and audio is not None and hasattr(audio, "__len__"):
                audio_s += len(audio) / rate
            else:
                audio_s += float(params.get("duration_s", 0))
        patterns = [str(out["pattern_id"]) for sid, out in run.outputs.items()
                    if run.plan.step(sid).type == "store" and out.get("pattern_id")]
        return {"state": run.state.value, "steps": {sid: r.state.value for sid, r in run.steps.items()},
                "output": list(run.plan.output), "audio_s": round(audio_s, 3), "patterns": patterns,
                "planner": run.plan.planner, "elapsed_s": round(time.monotonic() - run._t0, 3)}


# --- pattern-memory executors -----------------------------------------------------------------------------------------
class RecallExecutor:
    """recall: by id, by similarity to an analysed embedding, by words of a query, or by tags — ranked with
    ratings when a feedback store is given."""

    def __init__(self, patterns: PatternStore, feedback: FeedbackStore | None = None) -> None:
        self.patterns = patterns
        self.feedback = feedback

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        p = step.params
        top_k, tags = int(p.get("top_k", 3)), dict(p.get("tags") or {})
        if p.get("pattern_id"):
            found = [await self.patterns.get(str(p["pattern_id"]))]
        elif inputs.get("embedding") is not None:
            found = await self._similar(np.asarray(inputs["embedding"], dtype=np.float32), top_k, tags)
        elif p.get("query"):
            found = await recall_for_request(self.patterns, self.feedback, str(p["query"]), top_k, tag_filter=tags)
        else:
            found, _ = await self.patterns.list(page_size=top_k, tag_filter=tags)
        await ctx.progress(1, 1, f"{len(found)} pattern(s) recalled")
        return {"patterns": found, "pattern": found[0] if found else None}

    async def _similar(self, vector: np.ndarray, top_k: int, tags: Mapping[str, str]) -> list[PatternRecord]:
        # Over-fetch so that ratings can re-order beyond the pure-similarity top k.
        matches = await self.patterns.search(vector.tolist(), top_k=min(100, top_k * 3), tag_filter=tags or None)
        ratings = await self.feedback.ratings([m.id for m in matches]) if self.feedback else {}
        return [r.as_record() for r in rank_recalled(matches, ratings)[:top_k]]


class StoreExecutor:
    """store: insert the embedding with its provenance metadata; from raw audio it first calls ``analyze``
    (an async callable returning (embedding, duration_s)) — the lead wires it to the wav2vec2 analysis."""

    def __init__(self, patterns: PatternStore, *,
                 analyze: Callable[[Any, int | None], Awaitable[tuple[Sequence[float], float]]] | None = None,
                 source: str = "compose") -> None:
        self.patterns = patterns
        self.analyze = analyze
        self.source = source

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        embedding, duration = inputs.get("embedding"), float(inputs.get("duration_s") or 0.0)
        if embedding is None:
            if self.analyze is None:
                raise FailedPrecondition(f"step {step.id!r} stores audio but this server has no analysis for it; "
                                      "add an analyze step")
            embedding, duration = await self.analyze(inputs["audio"], inputs.get("sample_rate_hz"))
        record = await self.patterns.insert(
            np.asarray(embedding, dtype=np.float32).tolist(), duration_s=duration,
            tags=inputs.get("tags") or step.params.get("tags") or {}, source=f"{self.source}:{ctx.workflow_id}",
            metadata=inputs.get("metadata") or {})
        return {"pattern_id": record.id, "pattern": record}
