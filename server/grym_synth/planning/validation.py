"""Plan validation: the published JSON Schema first, then what a schema cannot express.

LLM output is untrusted, so every plan goes through :func:`validate_plan`: first the JSON Schema
(:mod:`grym_synth.planning.schema`), then unique ids, references that resolve to existing outputs of compatible
steps, and no cycles. Every error is an :class:`InvalidArgument` naming the step and parameter, because the message
doubles as the "schema violation" reason recorded when the orchestrator falls back to the rule-based planner.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from grym_synth.core.errors import InvalidArgument
from grym_synth.planning.plan import (AUDIO_STEPS, CONTINUE_DEFAULTS, FROM_PATTERN_STEPS, GENERATE_DEFAULTS,
                                      GENERATE_KEYS, INPUT_RULES, MAIN_OUTPUT, OUTPUTS, RECALL_DEFAULT_TOP_K,
                                      REQUIRED_INPUTS, SECTION_DEFAULTS, STEP_TYPES, VARY_DEFAULTS, Plan, PlannerName,
                                      Ref, Section, Step, derive_seed, wrap_seed)
from grym_synth.planning.schema import MAX_PIECE_S, MAX_PROMPT_CHARS, MAX_SEGMENT_S, plan_schema
from grym_synth.planning.sections import DURATION_TOLERANCE_S, WindowSpec, intensity_words, layout

DEFAULT_WINDOW = WindowSpec()


@functools.lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = plan_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_plan(data: Any, *, planner: PlannerName = "coordinator", window: WindowSpec = DEFAULT_WINDOW) -> Plan:
    """Check a plan dict completely and return the normalised :class:`Plan` (defaults filled, refs explicit).
    ``window``: how sections are laid out as model windows (the server's settings).

    Raises :class:`InvalidArgument` with a message that names the step and parameter at fault."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"a plan must be a JSON object, got {type(data).__name__}")
    _check_step_types(data)
    error = best_match(_validator().iter_errors(data))
    if error is not None:
        raise InvalidArgument(_describe_schema_error(error, data))
    raw_steps: list[Mapping[str, Any]] = list(data["steps"])
    _check_finite(raw_steps)
    sections = _build_sections(data, window)
    if not raw_steps and not sections:
        raise InvalidArgument("a plan needs 'sections' (the piece) or at least one step")
    if sections:
        raw_steps = _window_steps(sections, raw_steps, str(data["intent"]))
    _check_unique_ids(raw_steps)
    raw_steps = _expand_vary_shorthand(raw_steps)
    types = {s["id"]: s["type"] for s in raw_steps}
    steps = tuple(_build_step(raw, types, str(data["intent"])) for raw in raw_steps)
    _check_cycles(steps)
    if sections:
        output = tuple(w.step_id for section in sections for w in section.windows)
    else:
        output = _check_output(data.get("output"), steps)
    return Plan(intent=str(data["intent"]), steps=steps, output=output, planner=planner, sections=sections,
                overlap_s=window.overlap_s if sections else 0.0)


def _finite(label: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{label} must be a finite number, got {value}")


def _section_durations(data: Mapping[str, Any], raw: Sequence[Mapping[str, Any]]) -> list[float]:
    """Durations that add up to ``duration_s`` exactly: a difference within DURATION_TOLERANCE_S (rounding in
    what the coordinator wrote) goes to the last section; more is an error naming both numbers."""
    durations = [float(s["duration_s"]) for s in raw]
    total = sum(durations)
    wanted = data.get("duration_s")
    if wanted is not None:
        wanted = float(wanted)
        if abs(total - wanted) > DURATION_TOLERANCE_S:
            raise InvalidArgument(f"plan sections add up to {total:g} s, but duration_s is {wanted:g} s; make the "
                                  "section durations add up to the piece's length")
        durations[-1] += wanted - total
        total = wanted
    if total > MAX_PIECE_S + 1e-9:
        raise InvalidArgument(f"plan sections add up to {total:g} s; a piece is at most {MAX_PIECE_S:g} s")
    return durations


def _build_sections(data: Mapping[str, Any], window: WindowSpec) -> tuple[Section, ...]:
    raw = list(data.get("sections") or [])
    if not raw:
        if data.get("duration_s") is not None:
            _finite("plan field 'duration_s'", data["duration_s"])
        return ()
    _finite("plan field 'duration_s'", data.get("duration_s"))
    for i, section in enumerate(raw):
        for key in ("duration_s", "intensity"):
            _finite(f"section {i + 1} ({section.get('name')!r}) field {key!r}", section.get(key))
    durations = _section_durations(data, raw)
    windows = layout(durations, window)
    out = []
    for section, duration, wins in zip(raw, durations, windows):
        full = {**SECTION_DEFAULTS, **section}
        out.append(Section(name=str(full["name"]), prompt=str(full["prompt"]), duration_s=duration,
                           intensity=float(full["intensity"]), curve=str(full["curve"]), windows=wins,
                           negative_prompt=str(full.get("negative_prompt") or ""),
                           steps=int(full["steps"]) if "steps" in full else None,
                           seed=int(full["seed"]) if "seed" in full else None))
    return tuple(out)


def _window_steps(sections: Sequence[Section], raw_steps: Sequence[Mapping[str, Any]],
                  intent: str) -> list[Mapping[str, Any]]:
    """The plan's steps with one generate step per window in front (replacing window steps of a plan that was
    validated before, so validation is idempotent). Store steps wait for every window: a piece whose rendering
    fails stores nothing."""
    window_ids = {w.step_id for s in sections for w in s.windows}
    kept = [s for s in raw_steps if not (s["id"] in window_ids and s.get("type") == "generate")]
    generated: list[Mapping[str, Any]] = []
    for section in sections:
        prompt = f"{section.prompt}, {intensity_words(section.intensity)}"[:MAX_PROMPT_CHARS]
        base = section.seed if section.seed is not None else derive_seed(f"{intent}\n{section.name}\n{prompt}")
        for k, w in enumerate(section.windows):
            params: dict[str, Any] = {"prompt": prompt, "negative_prompt": section.negative_prompt,
                                      "duration_s": w.render_s, "seed": wrap_seed(base + k)}
            if section.steps is not None:
                params["steps"] = section.steps
            generated.append({"id": w.step_id, "type": "generate", "params": params})
    rest = []
    for s in kept:
        if s.get("type") == "store":
            deps = list(dict.fromkeys([*(s.get("depends_on") or ()), *sorted(window_ids, key=_window_key)]))
            s = {**s, "depends_on": deps}
        rest.append(s)
    return generated + rest


def _window_key(step_id: str) -> tuple[int, int]:
    section, _, window = step_id[1:].partition("-w")
    return int(section), int(window)


def _check_step_types(data: Mapping[str, Any]) -> None:
    """Unknown step types get their own message listing the known ones (the schema's enum error is vaguer)."""
    steps = data.get("steps")
    if not isinstance(steps, list):
        return
    for index, raw in enumerate(steps):
        if isinstance(raw, Mapping) and isinstance(raw.get("type"), str) and raw["type"] not in STEP_TYPES:
            raise InvalidArgument(f"step {_step_label(raw, index)}: unknown step type {raw['type']!r}; "
                                  f"known: {', '.join(STEP_TYPES)}")


def _step_label(raw: Any, index: int) -> str:
    if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
        return repr(raw["id"])
    return f"#{index}"


def _describe_schema_error(error: ValidationError, data: Mapping[str, Any]) -> str:
    """Turn a jsonschema error into 'step 'gen' param 'duration_s' must be 0.5..30, got 45'."""
    path = list(error.absolute_path)
    if not path:
        return f"plan: {error.message}"
    if path[0] != "steps" or len(path) < 2:
        return f"plan field {'.'.join(str(p) for p in path)!r} {_describe_value_error(error)}"
    label = _step_label(data["steps"][path[1]], int(path[1]))
    step_type = data["steps"][path[1]].get("type") if isinstance(data["steps"][path[1]], Mapping) else None
    rest = path[2:]
    if rest[:2] == ["params", "model"] and error.validator == "enum":
        known = ", ".join(error.schema.get("enum", [])) if isinstance(error.schema, Mapping) else ""
        return f"step {label} param 'model': unknown model {error.instance!r} for {step_type} steps; known: {known}"
    if len(rest) >= 2 and rest[0] in ("params", "inputs"):
        kind = "param" if rest[0] == "params" else "input"
        return f"step {label} {kind} {rest[1]!r} {_describe_value_error(error)}"
    if len(rest) == 1 and rest[0] in ("params", "inputs"):
        return f"step {label}: {_describe_container_error(error, rest[0], step_type)}"
    if rest:
        return f"step {label} field {'.'.join(str(p) for p in rest)!r} {_describe_value_error(error)}"
    return f"step {label}: {error.message}"


def _describe_value_error(error: ValidationError) -> str:
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        hint = " (longer pieces are several generate steps)" if hi == MAX_SEGMENT_S else ""
        return f"must be {lo}..{hi}, got {error.instance!r}{hint}"
    if error.validator in ("minLength", "maxLength"):
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        return f"must be {lo}..{hi} characters, got {len(error.instance)}"
    if error.validator == "const":
        return f"must be {schema.get('const')!r}, got {error.instance!r}"
    if error.validator == "enum":
        return f"must be one of {', '.join(map(str, schema.get('enum', [])))}; got {error.instance!r}"
    return f"is invalid: {error.message}"


def _describe_container_error(error: ValidationError, container: str, step_type: Any) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = sorted(error.schema.get("properties", {})) if isinstance(error.schema, Mapping) else []
        unknown = sorted(set(error.instance) - set(known))
        return f"unknown param {', '.join(map(repr, unknown))}; {step_type} params: {', '.join(known)}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"{container[:-1]} {missing!r} is required"
    if error.validator == "enum" and container == "inputs":
        inputs = ", ".join(INPUT_RULES.get(str(step_type), {})) or "none"
        return f"has no input {error.instance!r}; {step_type} inputs: {inputs}"
    if error.validator == "maxProperties" and container == "inputs" and step_type == "generate":
        return "generate steps take no inputs"
    return f"{container}: {error.message}"


def _check_finite(raw_steps: Sequence[Mapping[str, Any]]) -> None:
    """JSON Schema bounds let NaN through (every comparison with NaN is false) and Python's json accepts it."""
    for raw in raw_steps:
        for name, value in (raw.get("params") or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(f"step {raw['id']!r} param {name!r} must be a finite number, got {value}")


def _check_unique_ids(raw_steps: Sequence[Mapping[str, Any]]) -> None:
    seen: set[str] = set()
    for raw in raw_steps:
        if raw["id"] in seen:
            raise InvalidArgument(f"duplicate step id {raw['id']!r}; step ids must be unique")
        seen.add(raw["id"])


def _expand_vary_shorthand(raw_steps: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``vary {pattern_id}`` (or ``continue {pattern_id}``) without an input is shorthand for a recall of that
    pattern feeding the step, so executors only ever start from a recalled pattern (one code path) and the recall
    shows up as its own step."""
    ids = {s["id"] for s in raw_steps}
    out: list[Mapping[str, Any]] = []
    for raw in raw_steps:
        params = dict(raw.get("params") or {})
        inputs = dict(raw.get("inputs") or {})
        if raw["type"] not in FROM_PATTERN_STEPS or "pattern_id" not in params:
            out.append(raw)
            continue
        if inputs:
            raise InvalidArgument(f"step {raw['id']!r}: give either input 'from' or param 'pattern_id', not both")
        recall_id = _fresh_id(f"{raw['id']}-recall", ids)
        ids.add(recall_id)
        out.append({"id": recall_id, "type": "recall", "params": {"pattern_id": params.pop("pattern_id"),
                                                                  "top_k": 1}})
        out.append({**raw, "params": params, "inputs": {"from": f"{recall_id}.pattern"}})
    return out


def _fresh_id(base: str, taken: set[str]) -> str:
    candidate, n = base[:64], 2
    while candidate in taken:
        candidate = f"{base[:60]}-{n}"
        n += 1
    return candidate


def _build_step(raw: Mapping[str, Any], types: Mapping[str, str], intent: str) -> Step:
    step_id, step_type = str(raw["id"]), str(raw["type"])
    inputs = {name: _resolve_ref(step_id, step_type, name, text, types)
              for name, text in (raw.get("inputs") or {}).items()}
    for required in REQUIRED_INPUTS.get(step_type, ()):
        if required not in inputs:
            sources = _either(INPUT_RULES[step_type][required])
            extra = " or param 'pattern_id'" if step_type in FROM_PATTERN_STEPS else ""
            raise InvalidArgument(f"step {step_id!r} needs input {required!r} (from a {sources} step){extra}")
    depends_on = tuple(str(d) for d in raw.get("depends_on") or ())
    for dep in depends_on:
        if dep not in types:
            raise InvalidArgument(f"step {step_id!r} depends on unknown step {dep!r}")
    params = _normalise_params(step_id, step_type, dict(raw.get("params") or {}), inputs, intent)
    return Step(id=step_id, type=step_type, params=params, inputs=inputs, depends_on=depends_on)


def _either(names: Sequence[str]) -> str:
    """"generate, vary or continue" (names in the order given)."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _resolve_ref(step_id: str, step_type: str, name: str, text: str, types: Mapping[str, str]) -> Ref:
    source, _, output = text.partition(".")
    if source not in types:
        raise InvalidArgument(f"step {step_id!r} input {name!r} references unknown step {source!r}")
    source_type = types[source]
    output = output or MAIN_OUTPUT[source_type]
    if output not in OUTPUTS[source_type]:
        raise InvalidArgument(f"step {step_id!r} input {name!r} references {source}.{output}, but {source_type} "
                              f"steps output: {', '.join(OUTPUTS[source_type])}")
    accepted = INPUT_RULES[step_type][name]
    if source_type not in accepted:
        raise InvalidArgument(f"step {step_id!r} input {name!r} must come from a {_either(accepted)} step, "
                              f"not {source_type} step {source!r}")
    if output not in accepted[source_type]:
        raise InvalidArgument(f"step {step_id!r} input {name!r} takes {' or '.join(accepted[source_type])} of "
                              f"{source_type} step {source!r}, not {output!r}")
    return Ref(source, output)


def _normalise_params(step_id: str, step_type: str, params: dict[str, Any], inputs: Mapping[str, Ref],
                      intent: str) -> dict[str, Any]:
    """Fill defaults so the recorded plan says exactly what ran (a seed is never left to chance)."""
    if step_type == "generate":
        full = {**GENERATE_DEFAULTS, **params}
        full["duration_s"] = float(full["duration_s"])
        full["guidance_scale"] = float(full["guidance_scale"])
        full["steps"] = int(full["steps"])
        full["seed"] = int(full["seed"]) if "seed" in full else derive_seed(f"{intent}\n{step_id}\n{full['prompt']}")
        return {k: full[k] for k in GENERATE_KEYS}
    if step_type == "vary":
        full = {**VARY_DEFAULTS, **params}
        full["strength"] = float(full["strength"])
        for key in ("seed", "steps", "variation"):
            if key in full:
                full[key] = int(full[key])
        return full
    if step_type == "continue":
        full = {**CONTINUE_DEFAULTS, **params}
        full["duration_s"] = float(full["duration_s"])
        for key in ("seed", "steps"):
            if key in full:
                full[key] = int(full[key])
        return full
    if step_type == "recall":
        if not (params.get("query") or params.get("tags") or params.get("pattern_id") or "embedding" in inputs):
            raise InvalidArgument(f"step {step_id!r}: a recall needs one of params 'query', 'tags', 'pattern_id' "
                                  "or input 'embedding'")
        return {"top_k": RECALL_DEFAULT_TOP_K, **params}
    if step_type == "store":
        return {"tags": {}, **params}
    return {"model": "wav2vec2", **params}


def _check_cycles(steps: Sequence[Step]) -> None:
    """Depth-first search; the error names the cycle so the author can see which edge to drop."""
    upstream = {s.id: s.upstream for s in steps}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for up in upstream[node]:
            if state.get(up) == 1:
                cycle = path[path.index(up):] + [up]
                raise InvalidArgument(f"plan has a cycle: {' -> '.join(reversed(cycle))}")
            if state.get(up) is None:
                visit(up, path)
        path.pop()
        state[node] = 2

    for s in steps:
        if s.id not in state:
            visit(s.id, [])


def _check_output(output: Any, steps: Sequence[Step]) -> tuple[str, ...]:
    types = {s.id: s.type for s in steps}
    if output is None:
        return tuple(s.id for s in steps if s.type in AUDIO_STEPS)
    for step_id in output:
        if step_id not in types:
            raise InvalidArgument(f"plan output names unknown step {step_id!r}")
        if types[step_id] not in AUDIO_STEPS:
            raise InvalidArgument(f"plan output {step_id!r} is a {types[step_id]} step; only generate, vary and "
                                  "continue steps produce audio")
    return tuple(output)

