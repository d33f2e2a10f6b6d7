"""The workflow engine: runs a validated :class:`~grym_synth.planning.plan.Plan` as a DAG and streams what happens.

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
* Every transition is persisted in the :class:`~grym_synth.workflow.store.WorkflowStore`; the terminal event is
  emitted only after the final state is stored, so a client that saw it can read the record back.

The pieces around it: :mod:`~grym_synth.workflow.events` (the stream), :mod:`~grym_synth.workflow.executors`
(the executor contract, :class:`StepContext`, the pattern-memory executors), :mod:`~grym_synth.workflow.adapters`
(inputs from upstream outputs, provenance), :mod:`~grym_synth.workflow.summary` and :mod:`~grym_synth.workflow.errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from grym_synth.core.errors import Cancelled, FailedPrecondition, GrymError
from grym_synth.planning.plan import AUDIO_STEPS, Plan, Step
from grym_synth.workflow.adapters import AdapterRegistry, default_adapters, provenance
from grym_synth.workflow.errors import describe_error
from grym_synth.workflow.events import (PlanAccepted, StepCancelled, StepFailed, StepFinished, StepProgress,
                                        StepStarted, WorkflowCancelled, WorkflowEvent, WorkflowFailed, WorkflowFinished)
from grym_synth.workflow.executors import StepContext, StepExecutor
from grym_synth.workflow.store import (StepRecord, StepState, WorkflowRecord, WorkflowState, WorkflowStore,
                                       default_owner, now_us)
from grym_synth.workflow.summary import summarize_outputs

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 10_000


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
            extra = {k: inputs.get(k) for k in ("varied_from", "continued_from", "strength", "variation",
                                                "original_seed")}
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
        for _, out in ([] if run.plan.sections else run.audio()):
            params = out.get("params") or {}
            audio = out.get("audio")
            rate = out.get("sample_rate_hz")
            if rate and audio is not None and hasattr(audio, "__len__"):
                audio_s += len(audio) / rate
            else:
                audio_s += float(params.get("duration_s", 0))
        if run.plan.sections and run.state == WorkflowState.SUCCEEDED:
            audio_s = float(run.plan.duration_s or 0.0)  # overlapping windows joined: the piece's length
        patterns = [str(out["pattern_id"]) for sid, out in run.outputs.items()
                    if run.plan.step(sid).type == "store" and out.get("pattern_id")]
        return {"state": run.state.value, "steps": {sid: r.state.value for sid, r in run.steps.items()},
                "output": list(run.plan.output), "audio_s": round(audio_s, 3), "patterns": patterns,
                "planner": run.plan.planner, "elapsed_s": round(time.monotonic() - run._t0, 3)}
