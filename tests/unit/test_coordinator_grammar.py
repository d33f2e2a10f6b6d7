"""The coordinator's answer grammar is derived from the published plan schema, compiles for llguidance, and every
answer it admits is a valid plan (hypothesis draws answers from the derived schema's own structure)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grym_synth.coordinator import grammar
from grym_synth.coordinator.grammar import ARRAY_CAP, STRING_CAP, answer_schema, plan_answer_schema
from grym_synth.planning.schema import plan_schema
from grym_synth.planning.validation import validate_plan

llguidance = pytest.importorskip("llguidance")
MODEL_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "coordinator" / "1"

# A schema shaped like the sectioned plan format (sections + total duration), to check the derivation is generic.
SECTIONED = {
    "type": "object", "required": ["version", "intent", "steps"],
    "properties": {
        "version": {"const": 1}, "intent": {"type": "string", "minLength": 1, "maxLength": 1000},
        "duration_s": {"type": "number", "minimum": 0.5, "maximum": 600},
        "sections": {"type": "array", "minItems": 1, "maxItems": 16, "items": {"$ref": "#/$defs/section"}},
        "steps": {"type": "array", "minItems": 0, "maxItems": 32, "items": {"type": "object"}},
        "output": {"type": "array", "items": {"type": "string"}},
    },
    "$defs": {"section": {"type": "object", "required": ["name", "prompt", "duration_s"],
                          "additionalProperties": False,
                          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                         "prompt": {"type": "string", "minLength": 1, "maxLength": 512},
                                         "duration_s": {"type": "number", "minimum": 0.5, "maximum": 600}}}},
}


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_derived_from_the_published_schema_without_what_a_grammar_cannot_hold() -> None:
    derived = plan_answer_schema()
    assert derived == answer_schema(plan_schema())  # a pure function of the schema file, not a copy
    keys = {k for node in _walk(derived) for k in node}
    assert not keys & {"if", "then", "propertyNames", "uniqueItems", "allOf"}
    assert not set(grammar.REFERENCE_PROPERTIES) & set(derived["properties"])
    for node in _walk(derived):
        if "maxLength" in node:
            assert node["maxLength"] <= STRING_CAP
        if node.get("type") == "array":
            assert node["maxItems"] <= ARRAY_CAP
    published = plan_schema()
    assert published == json.loads(Path(grammar.__file__).parent.parent.joinpath("planning", "plan.schema.json")
                                    .read_text())  # the source was not modified in place


def test_engine_settings_are_left_to_the_orchestrator() -> None:
    params = plan_answer_schema()["$defs"]["generate_params"]
    assert set(params["properties"]) == {"prompt", "duration_s"} and params["required"] == ["prompt"]


def test_only_reference_free_step_types_remain() -> None:
    step = plan_answer_schema()["$defs"]["step"]
    variants = step.get("anyOf", [step])
    assert {v["properties"]["type"]["const"] for v in variants} == set(grammar.DECODED_STEP_TYPES)
    for variant in variants:
        assert "inputs" not in variant["properties"] and "depends_on" not in variant["properties"]


def test_if_then_becomes_one_variant_per_discriminator_value() -> None:
    schema = {"type": "object", "required": ["kind"], "additionalProperties": False,
              "properties": {"kind": {"enum": ["a", "b"]}, "x": {"type": "object"}},
              "allOf": [{"if": {"properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                         "then": {"required": ["x"], "properties": {"x": {"maxProperties": 0}}}},
                        {"if": {"properties": {"kind": {"const": "b"}}, "required": ["kind"]},
                         "then": {"properties": {"x": {"propertyNames": {"enum": ["y"]}}}}}]}
    out = answer_schema({"type": "object", "properties": {"item": schema}})["properties"]["item"]
    a, b = out["anyOf"]
    assert a["properties"]["kind"] == {"const": "a"} and "x" not in a["properties"]
    assert b["properties"]["x"]["properties"] == {"y": {}} and b["properties"]["x"]["additionalProperties"] is False


def test_sectioned_schema_keeps_sections_and_drops_the_derived_total() -> None:
    out = answer_schema(SECTIONED)
    assert list(out["properties"]) == ["version", "intent", "sections", "steps"]
    assert out["properties"]["steps"] == {"type": "array", "maxItems": 0}
    assert "sections" in out["required"] and "duration_s" not in out["properties"]
    assert out["$defs"]["section"]["properties"]["prompt"]["maxLength"] == STRING_CAP
    # the sum of the sections (the piece's length) stays within the top-level limit
    assert out["$defs"]["section"]["properties"]["duration_s"]["maximum"] * ARRAY_CAP == 600
    before = copy.deepcopy(SECTIONED)
    answer_schema(SECTIONED)
    assert SECTIONED == before


@pytest.mark.parametrize("schema", [plan_answer_schema(), answer_schema(SECTIONED)])
def test_llguidance_compiles_it_without_warnings(schema) -> None:
    ok_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_json_schema(schema))
    assert not ok_error and messages == []


_PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_characters='"\\',
                                   exclude_categories=("Cc", "Cs")),
                     min_size=1, max_size=STRING_CAP)


@st.composite
def _answers(draw) -> dict:
    """Answers shaped by the derived schema: sections (the published schema has them) with any allowed values."""
    schema = plan_answer_schema()
    section = schema["$defs"]["section"]["properties"]
    sections = []
    for _ in range(draw(st.integers(1, schema["properties"]["sections"]["maxItems"]))):
        item = {"name": draw(st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,12}", fullmatch=True)),
                "prompt": draw(_PRINTABLE),
                "duration_s": round(draw(st.floats(section["duration_s"]["minimum"],
                                                   section["duration_s"]["maximum"])), 3)}
        if draw(st.booleans()):  # decimals as a model writes them (exponent forms are not in the JSON grammar)
            item["intensity"] = round(draw(st.floats(0, 1)), 3)
        if draw(st.booleans()):
            item["curve"] = draw(st.sampled_from(section["curve"]["enum"]))
        sections.append(item)
    return {"version": 1, "intent": draw(_PRINTABLE), "sections": sections, "steps": []}


def _accepts(schema: dict, answer: dict, **overrides: bool) -> bool:
    tokenizer = llguidance.LLTokenizer("byte")  # one token per byte: any text can be fed
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides=overrides or None), log_level=0)
    data = json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode()
    return matcher.consume_tokens(tokenizer.tokenize_bytes(data)) and matcher.is_accepting()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_answers())
def test_answers_the_grammar_accepts_are_valid_plans(answer: dict) -> None:
    """What llguidance accepts byte by byte from the derived grammar also passes the server's plan validation."""
    assert _accepts(plan_answer_schema(), answer, whitespace_flexible=False)
    assert validate_plan(answer).planner == "coordinator"


def test_sectioned_answers_leave_the_steps_to_the_orchestrator() -> None:
    """With sections in the published schema, the answer's steps stay empty (the orchestrator lays the windows
    out), so a model cannot write step ids that collide or reference nothing."""
    schema = plan_answer_schema()
    assert schema["properties"]["steps"] == {"type": "array", "maxItems": 0}
    one = {"name": "intro", "prompt": "p", "duration_s": 5.0}
    assert _accepts(schema, {"version": 1, "intent": "x", "sections": [one], "steps": []})
    with_step = {"version": 1, "intent": "x", "sections": [one],
                 "steps": [{"id": "step-1", "type": "generate", "params": {"prompt": "p"}}]}
    assert not _accepts(schema, with_step)


def test_grammar_refuses_what_the_plan_schema_refuses() -> None:
    tokenizer = llguidance.LLTokenizer("byte")
    bad = {"version": 1, "intent": "x", "steps": [{"id": "a", "type": "analyze", "inputs": {"audio": "b.audio"}}]}
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(plan_answer_schema()),
                                   log_level=0)
    assert not matcher.consume_tokens(tokenizer.tokenize_bytes(json.dumps(bad).encode()))


# ----------------------------------------------------------------------------- the model's constraint (no Triton)
@pytest.fixture(scope="module")
def constrained():
    sys.path.insert(0, str(MODEL_DIR))
    try:
        import constrained as module
    finally:
        sys.path.remove(str(MODEL_DIR))
    return module


class _Matcher:
    def __init__(self) -> None:
        self.consumed: list[int] = []

    def consume_token(self, token: int) -> bool:
        self.consumed.append(token)
        return True

    def is_stopped(self) -> bool:
        return False

    def is_accepting(self) -> bool:
        return False

    def is_error(self) -> bool:
        return False


_BYTES = {0: b'"', 1: b"}", 2: b"]}", 3: b"a", 4: b'"}', 5: b"</think>", 6: b"\\"}


def test_thinking_is_cut_at_its_budget_and_the_answer_keeps_its_reserve(constrained) -> None:
    scores = constrained.closing_scores(lambda t: _BYTES.get(t, b""), 8)
    c = constrained.AnswerConstraint(_Matcher(), think_close_ids=[5], max_tokens=10, answer_reserve=4,
                                     close_margin=2, closing_scores=scores, token_bytes=lambda t: _BYTES.get(t, b""))
    assert c.think_budget == 5 and c.thinking
    assert [c.forced(p) for p in range(5)] == [None] * 5 and c.forced(5) == 5
    c.advance(5, forced=True)
    assert not c.thinking and c.forced(6) is None


def test_closing_prefers_the_quote_inside_strings_and_brackets_outside(constrained) -> None:
    data = lambda t: _BYTES.get(t, b"")  # noqa: E731
    scores = constrained.closing_scores(data, 8)
    c = constrained.AnswerConstraint(_Matcher(), think_close_ids=None, max_tokens=10, answer_reserve=10,
                                     close_margin=3, closing_scores=scores, token_bytes=data)
    everything = np.ones(8, dtype=bool)
    assert c.closing_choice(everything, produced=2) is None  # not yet in the last 3 tokens
    c.advance(0)  # opens a string
    assert c.closing_choice(everything, produced=8) == 4  # '"}' closes the string and the object
    c.advance(6)  # a backslash: the next quote is escaped, still inside the string
    c.advance(0)
    c.advance(0)  # closes it
    assert c.closing_choice(everything, produced=8) == 2  # ']}' outside strings
    only_text = np.zeros(8, dtype=bool)
    only_text[3] = True
    assert c.closing_choice(only_text, produced=8) is None


def test_a_bad_schema_is_the_requests_fault_and_a_good_one_is_cached(constrained) -> None:
    from grym_synth.inference.export.coordinator import build_tokenizer

    tokenizer = build_tokenizer()
    grammars = constrained.Grammars(tokenizer, len(tokenizer))
    with pytest.raises(ValueError, match="not JSON"):
        grammars.matcher("{nope")
    with pytest.raises(ValueError, match="JSON object"):
        grammars.matcher("[1]")
    with pytest.raises(ValueError, match="cannot be used"):
        grammars.matcher(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))
    text = json.dumps(plan_answer_schema())
    first = grammars.matcher(text)
    assert grammars.matcher(text) is not first and len(grammars._grammars) == 1
    assert not first.is_error() and not first.is_accepting()
