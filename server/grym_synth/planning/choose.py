"""Choosing between the coordinator's plan and the rule-based one, with the reason for every fallback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from grym_synth.core.errors import InvalidArgument, public_message
from grym_synth.memory.store import PatternRecord
from grym_synth.planning.extract import extract_plan
from grym_synth.planning.plan import Plan
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.planning.sections import split_durations
from grym_synth.planning.validation import validate_plan


def choose_plan(answer: str | None, request: str, recalled: Sequence[PatternRecord], rules: RuleBasedPlanner, *,
                coordinator_error: str | None = None, duration_s: float | None = None) -> Plan:
    """The coordinator's plan when its answer holds a valid one; otherwise the rule-based plan, carrying the
    reason ("no JSON in the answer", "schema violation: ...", "coordinator unavailable: ...") so that every
    fallback is visible in the workflow record and the event stream. ``duration_s`` (ComposeRequest.duration_seconds)
    is the client's explicit length: a coordinator plan with sections is stretched to it, one without falls back."""
    if answer is None:
        # The reason is shown to clients and stored: no endpoint address or exception class in it (the coordinator
        # backend logged the full error with the request id).
        reason = f"coordinator unavailable: {public_message(coordinator_error or 'no answer')}"
    else:
        data = extract_plan(answer)
        if data is None:
            reason = "no JSON in the answer"
        else:
            try:
                plan = validate_plan(data, planner="coordinator", window=rules.window)
                if not duration_s or (plan.sections and abs((plan.duration_s or 0) - duration_s) < 0.01):
                    return plan
                if not plan.sections:
                    raise InvalidArgument(f"the plan has no sections for the requested {duration_s:g} s")
                return validate_plan(with_duration(data, duration_s), planner="coordinator", window=rules.window)
            except InvalidArgument as exc:
                reason = f"schema violation: {exc.message}"
    return replace(rules.plan(request, recalled, duration_s=duration_s), fallback_reason=reason)


def with_duration(data: dict[str, Any], duration_s: float) -> dict[str, Any]:
    """A plan whose sections are scaled (keeping their proportions) to add up to ``duration_s``."""
    sections = [dict(s) for s in data["sections"]]
    durations = split_durations(duration_s, [float(s["duration_s"]) for s in sections])
    for section, seconds in zip(sections, durations):
        section["duration_s"] = seconds
    return {**data, "sections": sections, "duration_s": duration_s}
