"""Composition plans: the model, its validation, extraction from LLM answers, and the rule-based planner.

A plan is a small DAG of steps (generate, analyze, store, recall, vary) that the workflow engine
(:mod:`server.workflow`) runs. The coordinator LLM writes plans as JSON; LLM output is untrusted, so every plan goes
through :func:`validate_plan`: first the published JSON Schema (``docs/plan.schema.json`` — the same file clients
and the coordinator prompt see), then the checks a schema cannot express (unique ids, references that resolve to
existing outputs of compatible steps, no cycles). Every error is an :class:`InvalidArgument` naming the step and
parameter, because the message doubles as the "schema violation" reason recorded when the orchestrator falls back
to :class:`RuleBasedPlanner`.

Long pieces: one generate step renders at most 30 s (AudioLDM's memory and quality limit). The rule-based planner
*splits* a longer request into equal segments of at most 30 s (90 s → 3 x 30 s), each with its own seed
(base seed + segment index); ``Plan.output`` lists them in order and the caller concatenates their audio. Requests
beyond ``max_duration_s`` (default 300 s) are clamped, and the plan's intent says so.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from server.errors import InvalidArgument, public_message
from server.patterns import PatternRecord
from server.settings import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "docs" / "plan.schema.json"

StepType = Literal["generate", "analyze", "store", "recall", "vary"]
PlannerName = Literal["coordinator", "rules"]
STEP_TYPES: tuple[str, ...] = ("analyze", "generate", "recall", "store", "vary")
PLAN_VERSION = 1

# What each step type produces. Audio-producing steps also return the parameters they rendered with ("params") and
# the engine adds "provenance" so that a stored pattern can be regenerated exactly.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "generate": ("audio", "sample_rate_hz", "params", "provenance"),
    "vary": ("audio", "sample_rate_hz", "params", "provenance"),
    "analyze": ("embedding", "duration_s", "provenance"),
    "store": ("pattern_id", "pattern"),
    "recall": ("patterns", "pattern"),
}
# The output a bare "<step_id>" reference means.
MAIN_OUTPUT: dict[str, str] = {
    "generate": "audio", "vary": "audio", "analyze": "embedding", "store": "pattern_id", "recall": "pattern",
}
# target type -> input name -> source type -> outputs that input accepts.
INPUT_RULES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "generate": {},
    "analyze": {"audio": {"generate": ("audio",), "vary": ("audio",)}},
    "store": {"from": {"generate": ("audio",), "vary": ("audio",), "analyze": ("embedding",)}},
    "recall": {"embedding": {"analyze": ("embedding",)}},
    "vary": {"from": {"recall": ("pattern", "patterns")}},
}
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {"analyze": ("audio",), "store": ("from",), "vary": ("from",)}
AUDIO_STEPS = ("generate", "vary")

MAX_SEGMENT_S = 30.0
GENERATE_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "", "duration_s": 10.0, "steps": 25, "guidance_scale": 2.5, "scheduler": "ddim",
    "model": "audioldm",
}
GENERATE_KEYS = ("prompt", "negative_prompt", "duration_s", "steps", "guidance_scale", "seed", "scheduler", "model")
VARY_DEFAULTS: dict[str, Any] = {"strength": 0.35, "variation": 1}
RECALL_DEFAULT_TOP_K = 3
SEED_MAX = 2**63 - 1  # seeds are non-negative int64: what torch generators and the Generate API accept

MAX_ANSWER_CHARS = 65_536
MAX_DECODE_STARTS = 256
MAX_LENIENT_STARTS = 32


# --- the plan model -----------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Plan:
    """A validated plan plus where it came from (``planner``) and why the coordinator's was not used."""

    intent: str
    steps: tuple[Step, ...]
    output: tuple[str, ...]
    version: int = PLAN_VERSION
    planner: PlannerName = "rules"
    fallback_reason: str | None = None

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def dependents(self, step_id: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if step_id in s.upstream)

    def to_dict(self) -> dict[str, Any]:
        """The plan as schema-valid JSON (the planner fields live beside it, in the workflow record)."""
        return {"version": self.version, "intent": self.intent, "steps": [s.to_dict() for s in self.steps],
                "output": list(self.output)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --- validation ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The published schema, loaded once: the service validates against exactly what clients read."""
    return json.loads(SCHEMA_PATH.read_text())


@functools.lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = plan_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_plan(data: Any, *, planner: PlannerName = "coordinator") -> Plan:
    """Check a plan dict completely and return the normalised :class:`Plan` (defaults filled, refs explicit).

    Raises :class:`InvalidArgument` with a message that names the step and parameter at fault."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"a plan must be a JSON object, got {type(data).__name__}")
    _check_step_types(data)
    error = best_match(_validator().iter_errors(data))
    if error is not None:
        raise InvalidArgument(_describe_schema_error(error, data))
    raw_steps: list[Mapping[str, Any]] = list(data["steps"])
    _check_finite(raw_steps)
    _check_unique_ids(raw_steps)
    raw_steps = _expand_vary_shorthand(raw_steps)
    types = {s["id"]: s["type"] for s in raw_steps}
    steps = tuple(_build_step(raw, types, str(data["intent"])) for raw in raw_steps)
    _check_cycles(steps)
    output = _check_output(data.get("output"), steps)
    return Plan(intent=str(data["intent"]), steps=steps, output=output, planner=planner)


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
    """``vary {pattern_id}`` without an input is shorthand for a recall of that pattern feeding the vary step, so
    executors only ever vary a recalled pattern (one code path) and the recall shows up as its own step."""
    ids = {s["id"] for s in raw_steps}
    out: list[Mapping[str, Any]] = []
    for raw in raw_steps:
        params = dict(raw.get("params") or {})
        inputs = dict(raw.get("inputs") or {})
        if raw["type"] != "vary" or "pattern_id" not in params:
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
            sources = " or ".join(INPUT_RULES[step_type][required])
            extra = " or param 'pattern_id'" if step_type == "vary" else ""
            raise InvalidArgument(f"step {step_id!r} needs input {required!r} (from a {sources} step){extra}")
    depends_on = tuple(str(d) for d in raw.get("depends_on") or ())
    for dep in depends_on:
        if dep not in types:
            raise InvalidArgument(f"step {step_id!r} depends on unknown step {dep!r}")
    params = _normalise_params(step_id, step_type, dict(raw.get("params") or {}), inputs, intent)
    return Step(id=step_id, type=step_type, params=params, inputs=inputs, depends_on=depends_on)


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
        raise InvalidArgument(f"step {step_id!r} input {name!r} must come from a {' or '.join(accepted)} step, "
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
            raise InvalidArgument(f"plan output {step_id!r} is a {types[step_id]} step; only generate and vary "
                                  "steps produce audio")
    return tuple(output)


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


# --- extracting a plan from an LLM answer ---------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def extract_plan(text: str | None) -> dict[str, Any] | None:
    """Find the JSON plan in an LLM answer: fenced ```json blocks first, then balanced ``{...}`` in the prose.

    Prefers an object with a "steps" key; else returns the first JSON object found (so validation can say what
    is wrong with it); None when the answer holds no JSON object at all. Reasoning (``<think>...</think>``) is
    ignored: drafts there are not the answer."""
    if not text:
        return None
    text = strip_thinking(text)[:MAX_ANSWER_CHARS]
    candidates: list[dict[str, Any]] = []
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in ("", "json", "jsonc", "json5", "javascript", "js"):
            candidates.extend(_objects_in(match.group(2)))
    candidates.extend(_objects_in(text))
    for obj in candidates:
        if "steps" in obj:
            return obj
    return candidates[0] if candidates else None


def strip_thinking(text: str) -> str:
    """Drop reasoning blocks; Qwen-style templates may also leave a lone closing tag with the thinking before it."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def _objects_in(text: str) -> list[dict[str, Any]]:
    """JSON objects in ``text``: strict decoding at each '{' (fast, C); when that finds no plan-like object, also
    a lenient balanced-brace scan (a trailing comma breaks the outer object while its inner steps still parse)."""
    found = _decode_objects(text)
    if any("steps" in obj for obj in found):
        return found
    return found + _lenient_objects(text)


def _decode_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos, starts = 0, 0
    while starts < MAX_DECODE_STARTS and (pos := text.find("{", pos)) != -1:
        starts += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            pos += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end
    return found


def _lenient_objects(text: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    pos, starts = 0, 0
    while starts < MAX_LENIENT_STARTS and (pos := text.find("{", pos)) != -1:
        starts += 1
        end = _balanced_end(text, pos)
        obj = _loads_lenient(text[pos:end + 1]) if end is not None else None
        if isinstance(obj, dict):
            found.append(obj)
            pos = end + 1  # type: ignore[operator]
        else:
            pos += 1
    return found


def _balanced_end(text: str, start: int) -> int | None:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _loads_lenient(blob: str) -> Any:
    """Repairs the slips LLMs make most: trailing commas, and Python literals (single quotes, True/None)."""
    for attempt in (blob, _TRAILING_COMMA.sub(r"\1", blob)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, RecursionError):
            continue
    try:
        return ast.literal_eval(_TRAILING_COMMA.sub(r"\1", blob))
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None


# --- reading a request ----------------------------------------------------------------------------------------------
MOODS = ("calm", "dark", "happy", "sad", "melancholic", "melancholy", "energetic", "uplifting", "dreamy",
         "aggressive", "peaceful", "mysterious", "epic", "chill", "relaxing", "relaxed", "tense", "romantic",
         "playful", "eerie", "warm", "bright", "gloomy", "hopeful", "nostalgic", "driving", "intense", "soft",
         "gentle", "haunting", "joyful", "serene", "moody", "triumphant", "somber", "groovy", "funky", "spooky",
         "heroic", "lush", "minimal")
GENRES = ("drum and bass", "hip hop", "hip-hop", "lo-fi", "lofi", "ambient", "jazz", "techno", "house", "rock",
          "classical", "orchestral", "cinematic", "folk", "blues", "funk", "disco", "synthwave", "trance",
          "dubstep", "reggae", "metal", "pop", "edm", "electronic", "soul", "trap", "chiptune", "bossa nova",
          "country", "gospel", "drone", "idm", "breakbeat", "garage", "soundtrack")
INSTRUMENTS = ("acoustic guitar", "electric guitar", "bass guitar", "electric piano", "double bass", "drum machine",
               "string quartet", "piano", "guitar", "bass", "drums", "synthesizer", "synth", "strings", "violin",
               "viola", "cello", "flute", "saxophone", "sax", "trumpet", "trombone", "organ", "harp", "choir",
               "percussion", "bells", "marimba", "ukulele", "banjo", "clarinet", "oboe", "horns", "harpsichord",
               "kalimba", "sitar", "tabla", "pads", "vocals", "808")
INSTRUMENT_ALIASES = {"synthesizer": "synth", "sax": "saxophone", "melancholy": "melancholic", "hip-hop": "hip hop",
                      "lofi": "lo-fi"}
TEMPO_WORDS: tuple[tuple[str, int], ...] = (
    ("very slow", 60), ("slow", 70), ("mid-tempo", 100), ("midtempo", 100), ("moderate", 100), ("medium tempo", 100),
    ("upbeat", 125), ("very fast", 170), ("fast", 140), ("quick", 140), ("rapid", 160), ("slower", 0),
    ("faster", 0),
)  # 0: relative words ("slower" than the recalled pattern) that name no absolute tempo
STRENGTH_WORDS: tuple[tuple[str, float], ...] = (
    ("exactly", 0.0), ("identical", 0.0), ("the same", 0.0), ("very different", 0.7), ("loosely", 0.7),
    ("wild", 0.7), ("slightly", 0.2), ("subtle", 0.2), ("close to", 0.2), ("a bit", 0.2),
)
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "half a": 0.5, "half an": 0.5}
FILLER = frozenset(
    "a an the and or of to in on at for with me my us some please make create compose generate write give produce "
    "render i we you want would like could can need song track piece tune music sound loop clip bit about around "
    "that this it is be something long bpm tempo seconds second minutes minute secs sec mins min pattern but more "
    "less than into from by very just".split())

_UNIT = r"(seconds?|secs?|minutes?|mins?|s|m)"
_DURATION = re.compile(rf"(?<![\w.])(\d+(?:\.\d+)?)\s*-?\s*{_UNIT}\b", re.I)
_WORD_DURATION = re.compile(
    r"\b(half an?|an?|one|two|three|four|five|six|seven|eight|nine|ten)\s*-?\s*(seconds?|secs?|minutes?|mins?)\b",
    re.I)
_CLOCK = re.compile(r"\b(\d{1,2}):([0-5]\d)\b")
_BPM = re.compile(r"\b(\d{2,3})\s*-?\s*bpm\b", re.I)
_SEED = re.compile(r"\bseed\s*[:=#]?\s*(\d{1,19})\b", re.I)
_LIKE_PATTERN = re.compile(r"\blike\s+pattern\s+#?([A-Za-z0-9][A-Za-z0-9_-]{0,63})", re.I)
_LIKE_ID = re.compile(r"\blike\s+#?([A-Za-z0-9][A-Za-z0-9_-]{0,63})", re.I)
_UUIDISH = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$|^[0-9a-f]{8,}$", re.I)
_EXCLUDE = re.compile(r"\b(?:no|without|minus)\s+(?:any\s+)?([a-z0-9-]+(?:\s[a-z]+)?)", re.I)


@dataclass(frozen=True)
class RequestFeatures:
    """What the rule-based planner understood in a request."""

    duration_s: float | None = None
    moods: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()
    instruments: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    tempo_bpm: int | None = None
    tempo_word: str | None = None
    era: str | None = None
    pattern_id: str | None = None
    seed: int | None = None
    strength: float | None = None
    extra_words: tuple[str, ...] = ()

    @property
    def has_content(self) -> bool:
        return bool(self.moods or self.genres or self.instruments or self.tempo_bpm or self.tempo_word or self.era)


def parse_request(text: str, known_ids: Iterable[str] = ()) -> RequestFeatures:
    """Deterministic reading of a free-text request; nothing here calls a model."""
    lowered = text.lower()
    pattern_id = _find_pattern_id(text, set(known_ids))
    duration, spans = _find_duration(text)
    excluded = _find_excluded(lowered)
    instruments = tuple(i for i in _find_terms(lowered, INSTRUMENTS) if i not in excluded)
    tempo_bpm, tempo_word = _find_tempo(lowered)
    seed_match = _SEED.search(text)
    features = RequestFeatures(
        duration_s=duration, moods=_find_terms(lowered, MOODS), genres=_find_terms(lowered, GENRES),
        instruments=instruments, excluded=excluded, tempo_bpm=tempo_bpm, tempo_word=tempo_word, era=_find_era(text),
        pattern_id=pattern_id, seed=wrap_seed(int(seed_match.group(1))) if seed_match else None,
        strength=_find_strength(lowered),
    )
    return replace(features, extra_words=_extra_words(text, spans, features))


def _find_pattern_id(text: str, known_ids: set[str]) -> str | None:
    if m := _LIKE_PATTERN.search(text):
        return m.group(1)
    for m in _LIKE_ID.finditer(text):
        candidate = m.group(1)
        if candidate in known_ids or _UUIDISH.match(candidate) or (
                re.search(r"\d", candidate) and re.search(r"[-_]", candidate)):
            return candidate
    return None


def _find_duration(text: str) -> tuple[float | None, list[tuple[int, int]]]:
    """Sums every duration mention ("1 minute 30 seconds" = 90 s). "80s"/"1980s" followed by a style word is a
    decade, not a duration."""
    total, spans = 0.0, []
    for m in _DURATION.finditer(text):
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit == "s" and _is_decade(text, m):
            continue
        total += value * (60 if unit.startswith("m") else 1)
        spans.append(m.span())
    for m in _WORD_DURATION.finditer(text):
        total += NUMBER_WORDS[m.group(1).lower()] * (60 if m.group(2).lower().startswith("m") else 1)
        spans.append(m.span())
    for m in _CLOCK.finditer(text):
        total += int(m.group(1)) * 60 + int(m.group(2))
        spans.append(m.span())
    return (total if spans else None), spans


def _is_decade(text: str, m: re.Match[str]) -> bool:
    """"1980s", "'80s", "the 80s" and "80s synthwave" are eras; "a 30s loop" and a bare "30s" are durations."""
    number = m.group(1)
    if len(number) == 4 and number.endswith("0"):
        return True
    if m.start() > 0 and text[m.start() - 1] in "'’":
        return True
    if len(number) != 2 or not number.endswith("0") or number == "10":
        return False
    before = text[:m.start()].lower().split()[-1:]
    if before in (["a"], ["an"]):
        return False
    if before == ["the"]:
        return True
    following = text[m.end():].lower().lstrip()
    styles = GENRES + MOODS + INSTRUMENTS + ("style", "vibe", "vibes", "sound", "era", "retro", "music")
    return any(following.startswith(word) for word in styles)


def _find_era(text: str) -> str | None:
    for m in _DURATION.finditer(text):
        if m.group(2).lower() == "s" and _is_decade(text, m):
            return f"{m.group(1)[-2:]}s"
    return None


def _find_terms(lowered: str, vocabulary: Sequence[str]) -> tuple[str, ...]:
    """Vocabulary words in order of appearance; longer phrases win over the words inside them."""
    hits: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    for term in sorted(vocabulary, key=len, reverse=True):
        for m in re.finditer(rf"(?<![\w-]){re.escape(term)}(?:s|es)?(?![\w-])", lowered):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            taken.append(m.span())
            hits.append((m.start(), INSTRUMENT_ALIASES.get(term, term)))
    ordered: dict[str, None] = {}
    for _, term in sorted(hits):
        ordered.setdefault(term)
    return tuple(ordered)


def _find_excluded(lowered: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for m in _EXCLUDE.finditer(lowered):
        for term in _find_terms(m.group(1), INSTRUMENTS + ("noise", "voice", "singing")):
            out.setdefault(term)
    return tuple(out)


def _find_tempo(lowered: str) -> tuple[int | None, str | None]:
    if (m := _BPM.search(lowered)) and 30 <= int(m.group(1)) <= 300:
        return int(m.group(1)), None
    for word, bpm in TEMPO_WORDS:
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", lowered):
            return (bpm or None), word
    return None, None


def _find_strength(lowered: str) -> float | None:
    for word, strength in STRENGTH_WORDS:
        if re.search(rf"\b{re.escape(word)}\b", lowered):
            return strength
    return None


def _extra_words(text: str, spans: Sequence[tuple[int, int]], f: RequestFeatures) -> tuple[str, ...]:
    """Content words the vocabularies did not cover ("rain", "vinyl crackle"), kept for the prompt."""
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + " " + text[end:]
    text = _LIKE_PATTERN.sub(" ", text)
    if f.pattern_id:
        text = text.replace(f.pattern_id, " ")
    text = _SEED.sub(" ", _BPM.sub(" ", text))
    known = set(" ".join(f.moods + f.genres + f.instruments + f.excluded + MOODS + GENRES + INSTRUMENTS).split())
    known |= {w for w, _ in TEMPO_WORDS} | {w for p, _ in STRENGTH_WORDS for w in p.split()} | {"no", "without"}
    words = [w for w in re.findall(r"[a-z][a-z'-]*", text.lower())
             if w not in FILLER and w not in known and w.rstrip("s") not in known and len(w) > 2]
    return tuple(dict.fromkeys(words))[:8]


def build_prompt(f: RequestFeatures, request: str) -> str:
    """An AudioLDM prompt from what was understood: "calm, dreamy 80s ambient music with piano and strings, slow
    tempo, rain". With nothing understood the request text itself is the prompt."""
    if not f.has_content:
        return (" ".join(f.extra_words) or "instrumental music")[:512]
    head = ", ".join(f.moods)
    body = " ".join(((f.era,) if f.era else ()) + f.genres + ("music",))
    prompt = f"{head} {body}".strip()
    if f.instruments:
        names = list(f.instruments)
        prompt += " with " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
    if f.tempo_word:
        prompt += f", {f.tempo_word} tempo"
    elif f.tempo_bpm:
        prompt += f", {f.tempo_bpm} BPM"
    if f.extra_words:
        prompt += ", " + " ".join(f.extra_words)
    return prompt[:512]


def variation_suffix(f: RequestFeatures) -> str:
    """What a "like pattern X but ..." request adds to the recalled prompt: "slower tempo, strings"."""
    parts = [*f.moods, *((f.era,) if f.era else ()), *f.genres]
    if f.instruments:
        parts.append("with " + " and ".join(f.instruments))
    if f.tempo_word:
        parts.append(f"{f.tempo_word} tempo")
    elif f.tempo_bpm:
        parts.append(f"{f.tempo_bpm} BPM")
    parts.extend(f.extra_words)
    return ", ".join(parts)[:256]


def negative_prompt(f: RequestFeatures) -> str:
    return ", ".join(("low quality", "distortion", *f.excluded))


# --- the rule-based planner ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleBasedPlanner:
    """Plans without a model: the fallback when the coordinator is down, slow, or writes an invalid plan.

    Every plan it returns went through :func:`validate_plan`, so it obeys the same schema as the coordinator's."""

    default_duration_s: float = 10.0
    max_duration_s: float = 300.0
    steps: int = 25
    guidance_scale: float = 2.5
    scheduler: str = "ddim"
    store_results: bool = True

    def plan(self, request: str, recalled: Sequence[PatternRecord] = ()) -> Plan:
        """Deterministic: the same request and recalled patterns always give the same plan (and seeds)."""
        f = parse_request(request, (p.id for p in recalled))
        duration, clamped = self._duration(f)
        segments = _split(duration)
        base_seed = f.seed if f.seed is not None else derive_seed(" ".join(request.lower().split()))
        if f.pattern_id:
            steps, intent = self._variation_steps(f, segments)
        else:
            steps, intent = self._generation_steps(f, request, segments, base_seed, recalled)
        if clamped:
            intent += f" (clamped from {clamped:g} s to the {self.max_duration_s:g} s limit)"
        data = {"version": PLAN_VERSION, "intent": intent[:1000], "steps": steps,
                "output": [s["id"] for s in steps if s["type"] in AUDIO_STEPS]}
        return validate_plan(data, planner="rules")

    def _duration(self, f: RequestFeatures) -> tuple[float, float | None]:
        requested = f.duration_s if f.duration_s is not None else self.default_duration_s
        duration = min(max(requested, 0.5), self.max_duration_s)
        return duration, (requested if requested > self.max_duration_s else None)

    def _settings(self, recalled: Sequence[PatternRecord]) -> dict[str, Any]:
        """Settings of the best recalled pattern that recorded them (what worked before), else the defaults."""
        settings: dict[str, Any] = {"steps": self.steps, "guidance_scale": self.guidance_scale,
                                    "scheduler": self.scheduler}
        for record in recalled:
            meta = record.metadata
            try:
                steps, guidance, scheduler = int(meta["steps"]), float(meta["guidance_scale"]), meta["scheduler"]
            except (KeyError, ValueError):
                continue
            if 1 <= steps <= 100 and 0 <= guidance <= 20 and scheduler in ("ddim", "dpm"):
                return {"steps": steps, "guidance_scale": guidance, "scheduler": scheduler}
        return settings

    def _generation_steps(self, f: RequestFeatures, request: str, segments: list[float], base_seed: int,
                          recalled: Sequence[PatternRecord]) -> tuple[list[dict[str, Any]], str]:
        prompt = build_prompt(f, request)
        settings = self._settings(recalled)
        steps: list[dict[str, Any]] = []
        for i, seconds in enumerate(segments, start=1):
            gen_id = f"gen-{i}" if len(segments) > 1 else "gen"
            steps.append({"id": gen_id, "type": "generate", "params": {
                "prompt": prompt, "negative_prompt": negative_prompt(f), "duration_s": seconds,
                "seed": wrap_seed(base_seed + i - 1), **settings}})
            steps.extend(self._keep_steps(gen_id, f, i, len(segments)))
        return steps, _intent(f, prompt, segments)

    def _variation_steps(self, f: RequestFeatures, segments: list[float]) -> tuple[list[dict[str, Any]], str]:
        steps: list[dict[str, Any]] = [{"id": "recall", "type": "recall",
                                        "params": {"pattern_id": f.pattern_id, "top_k": 1}}]
        suffix = variation_suffix(f)
        for i, seconds in enumerate(segments, start=1):
            vary_id = f"vary-{i}" if len(segments) > 1 else "vary"
            params: dict[str, Any] = {"strength": f.strength if f.strength is not None else 0.35, "variation": i}
            if f.duration_s is not None:
                params["duration_s"] = seconds
            if suffix:
                params["prompt_suffix"] = suffix
            if f.seed is not None:
                params["seed"] = wrap_seed(f.seed + i - 1)
            steps.append({"id": vary_id, "type": "vary", "params": params, "inputs": {"from": "recall.pattern"}})
            steps.extend(self._keep_steps(vary_id, f, i, len(segments)))
        what = f"{sum(segments):g} s" if f.duration_s is not None else "a variation"
        return steps, f"{what} like pattern {f.pattern_id}" + (f", {suffix}" if suffix else "")

    def _keep_steps(self, audio_id: str, f: RequestFeatures, index: int, total: int) -> list[dict[str, Any]]:
        """Analyze and store each rendered segment, so pattern memory learns from what was composed."""
        if not self.store_results:
            return []
        suffix = audio_id.partition("-")[2]
        ana_id, store_id = f"analyze-{suffix}" if suffix else "analyze", f"store-{suffix}" if suffix else "store"
        return [
            {"id": ana_id, "type": "analyze", "inputs": {"audio": f"{audio_id}.audio"}},
            {"id": store_id, "type": "store", "inputs": {"from": f"{ana_id}.embedding"},
             "params": {"tags": _tags(f, index, total)}},
        ]


def _split(duration: float) -> list[float]:
    """Equal segments of at most 30 s: 90 → [30, 30, 30], 45 → [22.5, 22.5]."""
    count = max(1, math.ceil(duration / MAX_SEGMENT_S - 1e-9))
    return [round(duration / count, 3)] * count


def _tags(f: RequestFeatures, index: int, total: int) -> dict[str, str]:
    tags = {"source": "compose", "planner": "rules"}
    if f.moods:
        tags["mood"] = ",".join(f.moods)[:256]
    if f.genres:
        tags["genre"] = ",".join(f.genres)[:256]
    if f.instruments:
        tags["instruments"] = ",".join(f.instruments)[:256]
    if f.tempo_bpm:
        tags["tempo_bpm"] = str(f.tempo_bpm)
    if f.tempo_word:
        tags["tempo"] = f.tempo_word
    if f.era:
        tags["era"] = f.era
    if f.pattern_id:
        tags["varied_from"] = f.pattern_id
    if total > 1:
        tags["segment"] = f"{index}/{total}"
    return tags


def _intent(f: RequestFeatures, prompt: str, segments: list[float]) -> str:
    total = sum(segments)
    split = f" in {len(segments)} segments of {segments[0]:g} s" if len(segments) > 1 else ""
    return f"{total:g} s: {prompt}{split}"


# --- asking the coordinator ------------------------------------------------------------------------------------------
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
    for step_type in ("generate", "analyze", "store", "recall", "vary"):
        props = defs[f"{step_type}_params"]["properties"]
        params = ", ".join(f"{name}{_range(spec)}" for name, spec in props.items())
        inputs = "; ".join(f"{name} <- {'/'.join(f'{s}.{o}' for s, outs in src.items() for o in outs)}"
                           for name, src in INPUT_RULES[step_type].items()) or "none"
        lines.append(f"- {step_type}: params {params or 'none'}; inputs {inputs}; outputs "
                     f"{', '.join(OUTPUTS[step_type])}")
    lines.append("Example:\n```json\n" + json.dumps(EXAMPLE_PLAN) + "\n```")
    if recalled:
        lines.append("Stored patterns you may vary (vary params.pattern_id):")
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


# --- choosing between the coordinator's plan and the rules ----------------------------------------------------------
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
