"""Workflow events: what a running workflow streams, in order (``seq``), ending with one terminal event."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


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
