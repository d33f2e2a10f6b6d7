"""The planning part of the coordinator's prompt: the plan format, each step type's params and ranges (read from the
published schema, so prompt and validation cannot drift apart), an example, and the recalled patterns."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from grym_synth.memory.store import PatternRecord
from grym_synth.planning.plan import INPUT_RULES, OUTPUTS
from grym_synth.planning.schema import MAX_SEGMENT_S, plan_schema

EXAMPLE_PLAN: dict[str, Any] = {
    "version": 1, "intent": "45 s of calm piano in two segments, kept in memory",
    "steps": [
        {"id": "gen-1", "type": "generate", "params": {"prompt": "calm piano, soft reverb", "duration_s": 22.5}},
        {"id": "gen-2", "type": "generate", "params": {"prompt": "calm piano, soft reverb", "duration_s": 22.5}},
        {"id": "ana-1", "type": "analyze", "inputs": {"audio": "gen-1.audio"}},
        {"id": "keep-1", "type": "store", "params": {"tags": {"mood": "calm"}}, "inputs": {"from": "ana-1"}},
    ],
    "output": ["gen-1", "gen-2"],
}


def plan_instructions(recalled: Sequence[PatternRecord] = ()) -> str:
    """The planning part of the coordinator's prompt: the format, each step type's params and ranges (read from
    the published schema, so prompt and validation cannot drift apart), an example, and recalled patterns."""
    defs = plan_schema()["$defs"]
    lines = ["Answer with one JSON plan in a ```json block. Format: "
             '{"version": 1, "intent": str, "steps": [{"id", "type", "params", "inputs", "depends_on"}], '
             '"output": [audio step ids in playback order]}. An input is "<step_id>.<output>".',
             f"One generate step renders at most {MAX_SEGMENT_S:g} s: split longer pieces into several."]
    for step_type in ("generate", "analyze", "store", "recall", "vary", "continue"):
        props = defs[f"{step_type}_params"]["properties"]
        params = ", ".join(f"{name}{_range(spec)}" for name, spec in props.items())
        inputs = "; ".join(f"{name} <- {'/'.join(f'{s}.{o}' for s, outs in src.items() for o in outs)}"
                           for name, src in INPUT_RULES[step_type].items()) or "none"
        lines.append(f"- {step_type}: params {params or 'none'}; inputs {inputs}; outputs "
                     f"{', '.join(OUTPUTS[step_type])}")
    lines.append("Example:\n```json\n" + json.dumps(EXAMPLE_PLAN) + "\n```")
    if recalled:
        lines.append("Stored patterns you may vary or continue (params.pattern_id):")
        for p in recalled[:10]:
            prompt = p.metadata.get("prompt", "")[:120]
            tags = ", ".join(f"{k}={v}" for k, v in sorted(p.tags.items()))[:120]
            lines.append(f"- {p.id}: {prompt!r} [{tags}] score={p.score if p.score is not None else 0:.2f}")
    return "\n".join(lines)


def _range(spec: Mapping[str, Any]) -> str:
    if "enum" in spec:
        return f" ({'|'.join(map(str, spec['enum']))})"
    if "minimum" in spec and "maximum" in spec and spec["maximum"] < 10**6:  # not the seed's int64 bound
        return f" ({spec['minimum']:g}..{spec['maximum']:g})"
    if "maxLength" in spec:
        return f" (text <= {spec['maxLength']})"
    return ""

