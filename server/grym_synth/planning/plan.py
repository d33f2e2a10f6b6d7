"""The plan model: step types and what they produce and accept, :class:`Plan` / :class:`Step` / :class:`Ref`, and seeds.

A plan is a small DAG of steps (generate, analyze, store, recall, vary, continue) that the workflow engine
(:mod:`grym_synth.workflow.engine`) runs. Plans are built only by :func:`grym_synth.planning.validation.validate_plan`,
so a :class:`Plan` is always valid.

Pieces: a plan with ``sections`` (intro, build, climax, outro, ...) describes music of any length (0.5 s - 10 min).
Validation lays each section out as overlapping model windows (:mod:`grym_synth.planning.sections`) and adds one
generate step per window (ids ``s<section>-w<window>``); the compose layer joins their audio seamlessly and masters
the piece. Plans without sections keep the older form: generate/vary steps of at most ``schema.MAX_SEGMENT_S`` (30 s)
whose audio, in ``Plan.output`` order, is concatenated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from grym_synth.inference.export.audioldm import DEFAULT_SCHEDULER

StepType = Literal["generate", "analyze", "store", "recall", "vary", "continue"]
PlannerName = Literal["coordinator", "rules"]
STEP_TYPES: tuple[str, ...] = ("analyze", "continue", "generate", "recall", "store", "vary")
PLAN_VERSION = 1

# What each step type produces. Audio-producing steps also return the parameters they rendered with ("params") and
# the engine adds "provenance" so that a stored pattern can be regenerated exactly.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "generate": ("audio", "sample_rate_hz", "params", "provenance"),
    "vary": ("audio", "sample_rate_hz", "params", "provenance"),
    "continue": ("audio", "sample_rate_hz", "params", "provenance"),
    "analyze": ("embedding", "duration_s", "provenance"),
    "store": ("pattern_id", "pattern"),
    "recall": ("patterns", "pattern"),
}
# The output a bare "<step_id>" reference means.
MAIN_OUTPUT: dict[str, str] = {
    "generate": "audio", "vary": "audio", "continue": "audio", "analyze": "embedding", "store": "pattern_id", "recall": "pattern",
}
# target type -> input name -> source type -> outputs that input accepts.
INPUT_RULES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "generate": {},
    "analyze": {"audio": {"generate": ("audio",), "vary": ("audio",), "continue": ("audio",)}},
    "store": {"from": {"generate": ("audio",), "vary": ("audio",), "continue": ("audio",),
                       "analyze": ("embedding",)}},
    "recall": {"embedding": {"analyze": ("embedding",)}},
    "vary": {"from": {"recall": ("pattern", "patterns")}},
    "continue": {"from": {"recall": ("pattern", "patterns")}},
}
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {"analyze": ("audio",), "store": ("from",), "vary": ("from",),
                                               "continue": ("from",)}
# Steps that start from a recalled pattern (its stored audio, else its provenance).
FROM_PATTERN_STEPS = ("vary", "continue")
AUDIO_STEPS = ("generate", *FROM_PATTERN_STEPS)

GENERATE_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "", "duration_s": 10.0, "steps": 25, "guidance_scale": 2.5, "scheduler": DEFAULT_SCHEDULER,
    "model": "audioldm",
}
GENERATE_KEYS = ("prompt", "negative_prompt", "duration_s", "steps", "guidance_scale", "seed", "scheduler", "model")
VARY_DEFAULTS: dict[str, Any] = {"strength": 0.35, "variation": 1}
# A continuation renders this much new audio unless it says otherwise (its context comes on top, within the model's
# window).
CONTINUE_DEFAULTS: dict[str, Any] = {"duration_s": 5.0}
RECALL_DEFAULT_TOP_K = 3
SEED_MAX = 2**63 - 1  # seeds are non-negative int64: what torch generators and the Generate API accept


@dataclass(frozen=True)
class Ref:
    """A resolved input reference: output ``output`` of step ``step``."""

    step: str
    output: str

    def __str__(self) -> str:
        return f"{self.step}.{self.output}"


@dataclass(frozen=True)
class Step:
    """One validated step; ``params`` carry the defaults filled in, so the stored plan is reproducible."""

    id: str
    type: str
    params: dict[str, Any]
    inputs: dict[str, Ref] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()

    @property
    def upstream(self) -> tuple[str, ...]:
        """Every step this one waits for: explicit dependencies plus the sources of its inputs."""
        seen: dict[str, None] = dict.fromkeys(self.depends_on)
        seen.update(dict.fromkeys(ref.step for ref in self.inputs.values()))
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type, "params": dict(self.params)}
        if self.inputs:
            out["inputs"] = {name: str(ref) for name, ref in self.inputs.items()}
        if self.depends_on:
            out["depends_on"] = list(self.depends_on)
        return out


CURVES: tuple[str, ...] = ("steady", "rise", "fall", "swell")
SECTION_DEFAULTS: dict[str, Any] = {"intensity": 0.6, "curve": "steady"}


@dataclass(frozen=True)
class Window:
    """One model window of a section: generate step ``step_id`` renders ``render_s`` seconds, of which the first
    ``core_s`` are its own part of the piece and the rest overlaps the next window (crossfaded)."""

    step_id: str
    core_s: float
    render_s: float


@dataclass(frozen=True)
class Section:
    """A validated section of a piece; ``windows`` are the generate steps that render it, in order."""

    name: str
    prompt: str
    duration_s: float
    intensity: float
    curve: str
    windows: tuple[Window, ...]
    negative_prompt: str = ""
    steps: int | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Schema form (the windows are derived from it again when the plan is validated)."""
        out: dict[str, Any] = {"name": self.name, "prompt": self.prompt, "duration_s": self.duration_s,
                               "intensity": self.intensity, "curve": self.curve}
        if self.negative_prompt:
            out["negative_prompt"] = self.negative_prompt
        if self.steps is not None:
            out["steps"] = self.steps
        if self.seed is not None:
            out["seed"] = self.seed
        return out


@dataclass(frozen=True)
class Plan:
    """A validated plan plus where it came from (``planner``) and why the coordinator's was not used."""

    intent: str
    steps: tuple[Step, ...]
    output: tuple[str, ...]
    version: int = PLAN_VERSION
    planner: PlannerName = "rules"
    fallback_reason: str | None = None
    sections: tuple[Section, ...] = ()
    overlap_s: float = 0.0  # crossfade length between windows of a sectioned plan

    @property
    def duration_s(self) -> float | None:
        """Length of a sectioned piece (None for plans of concatenated steps)."""
        return sum(s.duration_s for s in self.sections) if self.sections else None

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def dependents(self, step_id: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if step_id in s.upstream)

    def to_dict(self) -> dict[str, Any]:
        """The plan as schema-valid JSON (the planner fields live beside it, in the workflow record)."""
        out: dict[str, Any] = {"version": self.version, "intent": self.intent,
                               "steps": [s.to_dict() for s in self.steps], "output": list(self.output)}
        if self.sections:
            out["duration_s"] = round(float(self.duration_s or 0.0), 6)
            out["sections"] = [s.to_dict() for s in self.sections]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)



def topological_order(plan: Plan) -> list[Step]:
    """Steps in an order where every step comes after its upstream (stable: plan order breaks ties)."""
    done: set[str] = set()
    order: list[Step] = []
    pending = list(plan.steps)
    while pending:
        ready = [s for s in pending if all(u in done for u in s.upstream)]
        for s in ready:
            order.append(s)
            done.add(s.id)
        pending = [s for s in pending if s.id not in done]
    return order


def derive_seed(text: str) -> int:
    """A seed from text: the same request always renders the same audio, different requests differ."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & SEED_MAX


def wrap_seed(value: int) -> int:
    """Keep seed arithmetic (seed + 1 at the top of the range) inside 0..2**63-1."""
    return value % (SEED_MAX + 1)

