"""The coordinator's answer grammar: the part of the published plan schema that constrained decoding can guarantee.

Why a derived schema and not ``plan.schema.json`` itself: a token mask (llguidance in the Triton coordinator model,
vLLM's guided decoding, an OpenAI server's ``response_format``) follows a context-free grammar, and the published
schema says things no such grammar can hold: ``if``/``then`` per step type, ``propertyNames``, ``uniqueItems``, and,
beyond JSON Schema, that references resolve to other steps and that section durations add up to ``duration_s``.
:func:`answer_schema` therefore derives, at load time and from the schema file (never a hand-written copy), a
schema whose every instance is also a valid plan (a subset), so that even a model with seeded random weights
writes plans that pass :func:`grym_synth.planning.validation.validate_plan`:

* ``if``/``then`` on a discriminator (``type``) becomes an ``anyOf`` of one variant per value;
* ``propertyNames: {enum}`` becomes named properties, ``propertyNames: {pattern}`` becomes ``patternProperties``,
  ``uniqueItems`` becomes at most one item (trivially unique);
* properties that name other steps (``inputs``, ``depends_on``, ``output``) are left out (they have defaults), and
  with them the step types that cannot do without them: only :data:`DECODED_STEP_TYPES` remain;
* ``duration_s`` at the top is left out when the schema has ``sections`` (its default is their sum, so they
  always agree; each section is capped at the piece's limit divided by the most sections, so the sum stays within
  it), and such plans describe the piece by their sections (``steps`` stays empty);
* engine settings (denoising steps, guidance, seed, scheduler, model, negative prompt) are left to the
  orchestrator's defaults: an answer describes the music (prompts, lengths, intensity);
* step ids are fixed by position (``step-1``, ``step-2``, ...: ``prefixItems``), so they are always unique;
* strings and arrays get caps (:data:`STRING_CAP`, :data:`ARRAY_CAP`) so that an answer fits a token budget.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

from grym_synth.planning.schema import plan_schema

# Longest string a constrained answer may write (an intent, a prompt): the schema allows 512-1000 characters, which
# a model with random weights would fill to the end, one byte-level token per character.
STRING_CAP = 160
# Most items of one array (steps, sections) in a constrained answer.
ARRAY_CAP = 8
# Properties whose values name other steps: a context-free grammar cannot make them resolve, and all have defaults.
REFERENCE_PROPERTIES = ("inputs", "depends_on", "output")
# Step types whose plans stay valid without references (analyze/store need an input, vary/recall a stored pattern).
DECODED_STEP_TYPES = ("generate",)
# Engine settings that the orchestrator sets better than a planner (defaults: 25 denoising steps, guidance 2.5, a seed
# derived from the plan): left out of answers, which then describe only the music (prompts, lengths, intensity).
ENGINE_PARAMS = ("steps", "guidance_scale", "seed", "scheduler", "model", "negative_prompt")
# Top-level values the orchestrator derives from others when absent (the piece's length from its sections).
DERIVED_PROPERTIES = ("duration_s",)
# Step ids of a constrained answer, by position: step-1, step-2, ...
STEP_ID_PREFIX = "step-"
_DROP = ("$schema", "$id", "title", "description")


def answer_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The decodable subset of ``schema`` (see the module docstring); a pure function of the published schema."""
    out = _rewrite(copy.deepcopy(dict(schema)))
    props = out.setdefault("properties", {})
    for name in REFERENCE_PROPERTIES:
        props.pop(name, None)
    if "sections" in props:
        _cap_section_lengths(out)
        for name in DERIVED_PROPERTIES:
            props.pop(name, None)
        props["steps"] = {"type": "array", "maxItems": 0}
        out["required"] = sorted(set(out.get("required", [])) | {"sections"},
                                 key=lambda k: list(props).index(k) if k in props else 0)
    out["required"] = [r for r in out.get("required", []) if r in props]
    out["properties"] = _ordered(props, ("version", "intent", "sections", "steps"))
    out["additionalProperties"] = False
    defs = out.get("$defs", {})
    for name, spec in defs.items():
        if name.endswith("_params") or name == "section":
            _drop_properties(spec, ENGINE_PARAMS)
    if "step" in defs:
        defs["step"] = _decoded_steps(defs["step"])
        steps = out["properties"].get("steps", {})
        if steps.get("maxItems", ARRAY_CAP) > 0:
            out["properties"]["steps"] = _numbered_steps(steps, defs["step"])
    return out


@functools.lru_cache(maxsize=1)
def plan_answer_schema() -> dict[str, Any]:
    """:func:`answer_schema` of the published plan schema, derived once per process."""
    return answer_schema(plan_schema())


# ---------------------------------------------------------------------------------------------------- rewriting
def _rewrite(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _rewrite(v) for k, v in node.items() if k not in _DROP}
    node = _expand_discriminator(node)
    if "propertyNames" in node:
        node = _named_properties(node)
    if node.pop("uniqueItems", False):
        node["maxItems"] = min(int(node.get("maxItems", 1)), 1)
    if "maxLength" in node or node.get("type") == "string" and "pattern" not in node and "enum" not in node:
        node["maxLength"] = min(int(node.get("maxLength", STRING_CAP)), STRING_CAP)
    if node.get("type") == "array":
        node["maxItems"] = min(int(node.get("maxItems", ARRAY_CAP)), ARRAY_CAP)
    if "maxProperties" in node and node.get("properties") and node.get("additionalProperties") is False:
        node.pop("maxProperties")  # named properties only: the count is bounded by them
    return node


def _discriminator(entry: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(property, value) of an ``if: {properties: {P: {const: V}}, required: [P]}`` entry, else None."""
    cond = entry.get("if")
    if not isinstance(cond, Mapping) or "then" not in entry:
        return None
    props = cond.get("properties") or {}
    if len(props) != 1:
        return None
    (name, spec), = props.items()
    return (name, spec["const"]) if isinstance(spec, Mapping) and "const" in spec else None


def _expand_discriminator(node: dict[str, Any]) -> dict[str, Any]:
    """``allOf`` of if/then on one enum property -> ``anyOf`` with one merged variant per enum value."""
    entries = node.get("allOf")
    if not isinstance(entries, list) or not entries:
        return node
    conds = [_discriminator(e) for e in entries]
    if any(c is None for c in conds) or len({c[0] for c in conds if c}) != 1:
        return node
    key = conds[0][0]  # type: ignore[index]
    base = {k: v for k, v in node.items() if k != "allOf"}
    values = list((base.get("properties", {}).get(key) or {}).get("enum") or [c[1] for c in conds if c])
    variants = []
    for value in values:
        variant = copy.deepcopy(base)
        variant.setdefault("properties", {})[key] = {"const": value}
        for cond, entry in zip(conds, entries):
            if cond and cond[1] == value:
                _merge(variant, _rewrite(entry["then"]))
        variants.append(_rewrite(variant))
    return {"anyOf": variants}


def _merge(target: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Conjunction of two object schemas, as far as a variant needs it (properties merged key by key)."""
    for key, value in extra.items():
        if key == "required":
            target["required"] = list(dict.fromkeys([*target.get("required", []), *value]))
        elif key == "properties":
            props = target.setdefault("properties", {})
            for name, spec in value.items():
                old = props.get(name)
                if isinstance(old, dict) and isinstance(spec, Mapping) and "$ref" not in spec:
                    merged = dict(old)
                    _merge(merged, spec)
                    props[name] = merged
                else:
                    props[name] = copy.deepcopy(spec)
        else:
            target[key] = copy.deepcopy(value)
    props = target.get("properties", {})
    for name, spec in list(props.items()):
        if isinstance(spec, Mapping) and spec.get("maxProperties") == 0:
            props.pop(name)  # "no inputs": the property is simply absent


def _named_properties(node: dict[str, Any]) -> dict[str, Any]:
    names = node.pop("propertyNames")
    value = node.get("additionalProperties", {})
    if isinstance(names, Mapping) and "enum" in names:
        node["properties"] = {name: copy.deepcopy(value) for name in names["enum"]}
        node["additionalProperties"] = False
    elif isinstance(names, Mapping) and "pattern" in names:
        node["patternProperties"] = {names["pattern"]: value}
        node["additionalProperties"] = False
    return node


def _decoded_steps(step: Mapping[str, Any]) -> dict[str, Any]:
    """Only the variants of :data:`DECODED_STEP_TYPES`, without the properties that name other steps."""
    variants = step.get("anyOf", [step])
    kept = []
    for variant in variants:
        kind = (variant.get("properties", {}).get("type") or {}).get("const")
        if kind is not None and kind not in DECODED_STEP_TYPES:
            continue
        variant = copy.deepcopy(variant)
        for name in REFERENCE_PROPERTIES:
            variant.get("properties", {}).pop(name, None)
        variant["required"] = [r for r in variant.get("required", []) if r in variant.get("properties", {})]
        kept.append(variant)
    return kept[0] if len(kept) == 1 else {"anyOf": kept}


def _cap_section_lengths(out: dict[str, Any]) -> None:
    """Each section at most (the piece's longest) / (most sections), so that their sum, the piece's length, is
    always within the piece's limit (a grammar cannot bound a sum; it can bound each term)."""
    total = (out["properties"].get("duration_s") or {}).get("maximum")
    section = out.get("$defs", {}).get("section", {}).get("properties", {}).get("duration_s")
    count = out["properties"]["sections"].get("maxItems", ARRAY_CAP)
    if total is None or not isinstance(section, dict) or not count:
        return
    section["maximum"] = min(float(section.get("maximum", total)), float(total) / int(count))


def _drop_properties(spec: dict[str, Any], names: tuple[str, ...]) -> None:
    props = spec.get("properties", {})
    for name in names:
        if name not in spec.get("required", []):
            props.pop(name, None)


def _numbered_steps(steps: Mapping[str, Any], step: Mapping[str, Any]) -> dict[str, Any]:
    """The steps array with the id of each position fixed (``step-<n>``): unique ids by construction."""
    count = int(steps.get("maxItems", ARRAY_CAP))
    positions = []
    for n in range(1, count + 1):
        variants = copy.deepcopy(list(step.get("anyOf", [step])))
        for variant in variants:
            variant.setdefault("properties", {})["id"] = {"const": f"{STEP_ID_PREFIX}{n}"}
        positions.append(variants[0] if len(variants) == 1 else {"anyOf": variants})
    out = {k: v for k, v in steps.items() if k != "items"}
    return {**out, "prefixItems": positions, "items": False}


def _ordered(props: Mapping[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    """Properties in writing order: a grammar emits them in the order given (intent before the sections)."""
    names = [n for n in first if n in props] + [n for n in props if n not in first]
    return {n: props[n] for n in names}
