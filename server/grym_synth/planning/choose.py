"""Choosing between the coordinator's plan and the rule-based one, with the reason for every fallback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from grym_synth.core.errors import InvalidArgument, public_message
from grym_synth.memory.store import PatternRecord
from grym_synth.planning.extract import extract_plan
from grym_synth.planning.plan import Plan
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.planning.validation import validate_plan


def choose_plan(answer: str | None, request: str, recalled: Sequence[PatternRecord], rules: RuleBasedPlanner, *,
                coordinator_error: str | None = None) -> Plan:
    """The coordinator's plan when its answer holds a valid one; otherwise the rule-based plan, carrying the
    reason ("no JSON in the answer", "schema violation: ...", "coordinator unavailable: ...") so that every
    fallback is visible in the workflow record and the event stream."""
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
                return validate_plan(data, planner="coordinator")
            except InvalidArgument as exc:
                reason = f"schema violation: {exc.message}"
    return replace(rules.plan(request, recalled), fallback_reason=reason)
