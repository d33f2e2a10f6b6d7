"""Plans: schema + semantic validation (every error path), extraction from messy LLM answers, the rule-based
planner, and the coordinator/rules choice."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from grym_synth.core.errors import InvalidArgument
from grym_synth.memory.store import PatternRecord
from grym_synth.planning.choose import choose_plan
from grym_synth.planning.extract import extract_plan
from grym_synth.planning.plan import derive_seed, topological_order
from grym_synth.planning.prompt import EXAMPLE_PLAN, plan_instructions
from grym_synth.planning.request import parse_request
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.planning.schema import SCHEMA_PATH
from grym_synth.planning.validation import validate_plan

GOOD: dict[str, Any] = {
    "version": 1,
    "intent": "a calm piano loop, analysed and kept",
    "steps": [
        {"id": "gen", "type": "generate", "params": {"prompt": "calm piano", "duration_s": 12}},
        {"id": "ana", "type": "analyze", "inputs": {"audio": "gen.audio"}},
        {"id": "keep", "type": "store", "params": {"tags": {"mood": "calm"}}, "inputs": {"from": "ana"}},
    ],
}


def plan_with(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "intent": "test", "steps": list(steps), **top}


def gen(step_id: str = "gen", **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "generate", "params": {"prompt": "calm piano", **params}}


# --- validation: the good path --------------------------------------------------------------------------------------
def test_valid_plan_is_normalised() -> None:
    plan = validate_plan(copy.deepcopy(GOOD))
    g = plan.step("gen").params
    assert g["duration_s"] == 12.0 and g["steps"] == 25 and g["scheduler"] == "ddim" and g["guidance_scale"] == 2.5
    assert g["seed"] == derive_seed(f"{GOOD['intent']}\ngen\ncalm piano"), "seed is derived, never random"
    assert str(plan.step("keep").inputs["from"]) == "ana.embedding", "a bare reference means the main output"
    assert plan.output == ("gen",)
    assert plan.planner == "coordinator" and plan.fallback_reason is None
    assert [s.id for s in topological_order(plan)] == ["gen", "ana", "keep"]


def test_normalised_plan_is_schema_valid_and_stable() -> None:
    plan = validate_plan(copy.deepcopy(GOOD))
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator(schema).validate(plan.to_dict())
    assert validate_plan(plan.to_dict()).to_dict() == plan.to_dict()


def test_vary_pattern_id_is_shorthand_for_recall() -> None:
    plan = validate_plan(plan_with({"id": "v", "type": "vary", "params": {"pattern_id": "p-1", "strength": 0.5}}))
    assert [s.type for s in plan.steps] == ["recall", "vary"]
    recall = plan.steps[0]
    assert recall.params == {"pattern_id": "p-1", "top_k": 1}
    assert str(plan.step("v").inputs["from"]) == f"{recall.id}.pattern"
    assert "pattern_id" not in plan.step("v").params


def test_continue_pattern_id_is_shorthand_for_recall_with_defaults() -> None:
    plan = validate_plan(plan_with({"id": "c", "type": "continue", "params": {"pattern_id": "p-1"}}))
    assert [s.type for s in plan.steps] == ["recall", "continue"] and plan.output == ("c",)
    assert str(plan.step("c").inputs["from"]) == f"{plan.steps[0].id}.pattern"
    assert plan.step("c").params == {"duration_s": 5.0}, "5 s of new audio unless the step says otherwise"


def test_continue_audio_feeds_analyze_and_store() -> None:
    plan = validate_plan(plan_with(
        {"id": "c", "type": "continue", "params": {"pattern_id": "p-1", "duration_s": 3, "steps": 4}},
        {"id": "a", "type": "analyze", "inputs": {"audio": "c.audio"}},
        {"id": "k", "type": "store", "inputs": {"from": "a.embedding"}}))
    assert plan.step("c").params == {"duration_s": 3.0, "steps": 4}
    with pytest.raises(InvalidArgument, match="strength"):  # vary's knob is not a continuation's
        validate_plan(plan_with({"id": "c", "type": "continue", "params": {"pattern_id": "p-1", "strength": 0.5}}))


# --- validation: every error path -----------------------------------------------------------------------------------
ERROR_CASES: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "must be a JSON object"),
    ("unknown type", plan_with({"id": "x", "type": "compose", "params": {}}),
     "step 'x': unknown step type 'compose'; known: analyze, continue, generate, recall, store, vary"),
    ("wrong version", {**plan_with(gen()), "version": 2}, "plan field 'version'"),
    ("missing intent", {"version": 1, "steps": [gen()]}, "'intent' is a required property"),
    ("no steps", plan_with(), "a plan needs 'sections'"),
    ("duration too long", plan_with(gen(duration_s=45)),
     "step 'gen' param 'duration_s' must be 0.5..30, got 45 (longer pieces are several generate steps)"),
    ("duration too short", plan_with(gen(duration_s=0.1)), "step 'gen' param 'duration_s' must be 0.5..30, got 0.1"),
    ("steps zero", plan_with(gen(steps=0)), "step 'gen' param 'steps' must be 1..100, got 0"),
    ("steps too many", plan_with(gen(steps=101)), "step 'gen' param 'steps' must be 1..100, got 101"),
    ("steps not int", plan_with(gen(steps=2.5)), "step 'gen' param 'steps' is invalid"),
    ("nan duration", plan_with(gen(duration_s=float("nan"))),
     "step 'gen' param 'duration_s' must be a finite number, got nan"),
    ("guidance", plan_with(gen(guidance_scale=25)), "step 'gen' param 'guidance_scale' must be 0..20, got 25"),
    ("seed too big", plan_with(gen(seed=2**63)), "step 'gen' param 'seed' must be 0..9223372036854775807"),
    ("negative seed", plan_with(gen(seed=-1)), "step 'gen' param 'seed' must be 0..9223372036854775807, got -1"),
    ("seed string", plan_with(gen(seed="42")), "step 'gen' param 'seed' is invalid"),
    ("empty prompt", plan_with(gen(prompt="")), "step 'gen' param 'prompt' must be 1..512 characters, got 0"),
    ("long prompt", plan_with(gen(prompt="x" * 513)), "step 'gen' param 'prompt' must be 1..512 characters"),
    ("scheduler", plan_with(gen(scheduler="euler")), "step 'gen' param 'scheduler' must be one of ddim, dpm"),
    ("unknown model", plan_with(gen(model="musicgen")),
     "step 'gen' param 'model': unknown model 'musicgen' for generate steps; known: audioldm"),
    ("unknown analyze model", plan_with(gen(), {"id": "a", "type": "analyze", "params": {"model": "clap"},
                                                "inputs": {"audio": "gen"}}),
     "step 'a' param 'model': unknown model 'clap' for analyze steps; known: wav2vec2"),
    ("unknown param", plan_with(gen(tempo=120)), "step 'gen': unknown param 'tempo'; generate params:"),
    ("missing prompt", plan_with({"id": "gen", "type": "generate", "params": {"duration_s": 3}}),
     "step 'gen': param 'prompt' is required"),
    ("missing params", plan_with({"id": "gen", "type": "generate"}), "step 'gen': 'params' is a required"),
    ("bad id", plan_with(gen("1gen")), "step '1gen' field 'id'"),
    ("extra field", plan_with({**gen(), "param": {}}), "step 'gen': Additional properties"),
    ("duplicate id", plan_with(gen(), gen()), "duplicate step id 'gen'"),
    ("unknown ref step", plan_with(gen(), {"id": "a", "type": "analyze", "inputs": {"audio": "gen2.audio"}}),
     "step 'a' input 'audio' references unknown step 'gen2'"),
    ("unknown output", plan_with(gen(), {"id": "a", "type": "analyze", "inputs": {"audio": "gen.wave"}}),
     "step 'a' input 'audio' references gen.wave, but generate steps output: audio, sample_rate_hz"),
    ("wrong source type", plan_with({"id": "r", "type": "recall", "params": {"query": "piano"}},
                                    {"id": "a", "type": "analyze", "inputs": {"audio": "r.pattern"}}),
     "step 'a' input 'audio' must come from a generate, vary or continue step, not recall step 'r'"),
    ("wrong output for input", plan_with(gen(), {"id": "s", "type": "store", "inputs": {"from": "gen.params"}}),
     "step 's' input 'from' takes audio of generate step 'gen', not 'params'"),
    ("unknown input", plan_with(gen(), {"id": "a", "type": "analyze", "inputs": {"wave": "gen.audio"}}),
     "step 'a': has no input 'wave'; analyze inputs: audio"),
    ("generate with inputs", plan_with(gen("g0"), {**gen(), "inputs": {"x": "g0"}}),
     "step 'gen': generate steps take no inputs"),
    ("analyze without input", plan_with(gen(), {"id": "a", "type": "analyze"}), "step 'a': 'inputs' is a required"),
    ("vary without source", plan_with({"id": "v", "type": "vary", "params": {"strength": 0.2}}),
     "step 'v' needs input 'from' (from a recall step) or param 'pattern_id'"),
    ("vary with both", plan_with({"id": "r", "type": "recall", "params": {"query": "piano"}},
                                 {"id": "v", "type": "vary", "params": {"pattern_id": "p"}, "inputs": {"from": "r"}}),
     "step 'v': give either input 'from' or param 'pattern_id', not both"),
    ("vary strength", plan_with({"id": "v", "type": "vary", "params": {"pattern_id": "p", "strength": 1.5}}),
     "step 'v' param 'strength' must be 0..1, got 1.5"),
    ("empty recall", plan_with({"id": "r", "type": "recall", "params": {"top_k": 2}}),
     "step 'r': a recall needs one of params 'query', 'tags', 'pattern_id' or input 'embedding'"),
    ("recall top_k", plan_with({"id": "r", "type": "recall", "params": {"query": "x", "top_k": 11}}),
     "step 'r' param 'top_k' must be 1..10, got 11"),
    ("bad tag key", plan_with(gen(), {"id": "s", "type": "store", "params": {"tags": {"bad key": "x"}},
                                      "inputs": {"from": "gen"}}), "step 's' param 'tags' is invalid"),
    ("unknown dependency", plan_with({**gen(), "depends_on": ["nope"]}), "step 'gen' depends on unknown step 'nope'"),
    ("self dependency", plan_with({**gen(), "depends_on": ["gen"]}), "plan has a cycle: gen -> gen"),
    ("cycle", plan_with({**gen("a"), "depends_on": ["b"]}, {**gen("b"), "depends_on": ["c"]},
                        {**gen("c"), "depends_on": ["a"]}), "plan has a cycle: a -> "),
    ("output unknown", plan_with(gen(), output=["nope"]), "plan output names unknown step 'nope'"),
    ("output not audio", plan_with(gen(), {"id": "a", "type": "analyze", "inputs": {"audio": "gen"}},
                                   output=["a"]), "plan output 'a' is a analyze step"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_validation_errors_name_step_and_param(data: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_plan(data)
    assert message in info.value.message


def test_cycle_message_names_the_whole_cycle() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_plan(plan_with({**gen("a"), "depends_on": ["b"]}, {**gen("b"), "depends_on": ["a"]}))
    assert info.value.message in ("plan has a cycle: a -> b -> a", "plan has a cycle: b -> a -> b")


# --- extract_plan -----------------------------------------------------------------------------------------------------
PLAN_TEXT = json.dumps(GOOD, indent=2)


@pytest.mark.parametrize("answer", [
    f"Sure! Here is the plan:\n```json\n{PLAN_TEXT}\n```\nLet me know if you want changes.",
    f"```\n{PLAN_TEXT}\n```",
    f"```JSON   \n{PLAN_TEXT}",  # unterminated fence (the model ran out of tokens after the JSON)
    f"I'll do this {{carefully}}. {json.dumps(GOOD)} -- done {{!}}",
    f"<think>maybe {{\"version\": 1, \"steps\": []}} is enough?</think>\nFinal: {json.dumps(GOOD)}",
    f"thinking about it...\n</think>\n{json.dumps(GOOD)}",
    f"Here: {{\"note\": \"first object\"}} and the plan {json.dumps(GOOD)}",
    PLAN_TEXT.replace('"calm piano",', '"calm piano",\n').replace("}\n  ]", "},\n  ]"),  # trailing comma
    repr(GOOD),  # a Python dict literal with single quotes
])
def test_extract_plan_from_messy_answers(answer: str) -> None:
    assert extract_plan(answer) == GOOD


def test_extract_plan_trailing_comma_really_is_repaired() -> None:
    broken = '{"version": 1, "intent": "x", "steps": [{"id": "g", "type": "generate", "params": {"prompt": "a",},},],}'
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)
    assert extract_plan(f"plan: {broken}")["steps"][0]["id"] == "g"  # type: ignore[index]


@pytest.mark.parametrize("answer", [None, "", "no json here", "{unclosed", "{'a': }", "} { ] [",
                                    "<think>{\"steps\": []}</think> I cannot help with that."])
def test_extract_plan_returns_none_without_an_object(answer: str | None) -> None:
    assert extract_plan(answer) is None


def test_extract_plan_returns_first_object_when_no_plan() -> None:
    assert extract_plan('result: {"error": "I do not know"}') == {"error": "I do not know"}


def test_extract_plan_is_fast_on_garbage() -> None:
    garbage = "{" * 30_000 + '"x": [' * 5_000 + "}" * 100
    t0 = time.monotonic()
    assert extract_plan(garbage) is None
    assert time.monotonic() - t0 < 3.0


# --- rule-based planner -----------------------------------------------------------------------------------------------
def audio_steps(plan: Any) -> list[Any]:
    return [s for s in plan.steps if s.type in ("generate", "vary")]


@pytest.mark.parametrize(("request_text", "seconds"), [
    ("Compose a calm 90 second piano piece", 90.0),
    ("2 minutes of dark techno", 120.0),
    ("a 30s dreamy ambient loop", 30.0),
    ("45 seconds of jazz", 45.0),
    ("1 minute 30 seconds of 80s synthwave", 90.0),
    ("half a minute of flute", 30.0),
    ("1:15 of strings", 75.0),
    ("an 8s stinger", 8.0),
    ("happy ukulele tune", 10.0),  # the default duration
])
def test_planner_durations(request_text: str, seconds: float) -> None:
    plan = RuleBasedPlanner().plan(request_text, [])
    assert plan.duration_s == pytest.approx(seconds, abs=1e-9)
    assert sum(s.duration_s for s in plan.sections) == pytest.approx(seconds, abs=1e-9)
    gens = audio_steps(plan)
    assert plan.output == tuple(s.id for s in gens) == tuple(w.step_id for s in plan.sections for w in s.windows)
    assert all(s.params["duration_s"] <= 10.0 for s in gens), "every window fits the model window"
    assert plan.planner == "rules"


def test_planner_clamps_very_long_requests() -> None:
    plan = RuleBasedPlanner(max_duration_s=120).plan("20 minutes of drone", [])
    assert plan.duration_s == pytest.approx(120)
    assert "clamped from 1200 s" in plan.intent


def test_planner_builds_prompt_from_mood_tempo_instruments() -> None:
    plan = RuleBasedPlanner().plan("a calm, dreamy ambient piece with piano and strings at 72 bpm, no drums", [])
    assert plan.sections[0].prompt == "calm, dreamy ambient music with piano and strings, 72 BPM"
    g = plan.step("s1-w1").params
    assert g["prompt"].startswith(plan.sections[0].prompt)
    assert "drums" in g["negative_prompt"]
    tags = plan.step("store-1").params["tags"]
    assert tags["mood"] == "calm,dreamy" and tags["instruments"] == "piano,strings" and tags["tempo_bpm"] == "72"
    slow = RuleBasedPlanner().plan("slow melancholic cello", []).sections[0].prompt
    assert slow == "melancholic music with cello, slow tempo"


def test_planner_keeps_unrecognised_content_words() -> None:
    prompt = RuleBasedPlanner().plan("dreamy ambient with rain and vinyl crackle", []).sections[0].prompt
    assert prompt == "dreamy ambient music, rain vinyl crackle"


def test_planner_decades_are_not_durations() -> None:
    f = parse_request("80s synthwave with 90s drums")
    assert f.duration_s is None and f.era == "80s"
    assert parse_request("a 30s loop").duration_s == 30.0
    assert parse_request("the 1980s sound").duration_s is None


def test_planner_seeds_are_deterministic_and_distinct() -> None:
    planner = RuleBasedPlanner()
    a = planner.plan("90 seconds of calm piano", [])
    b = planner.plan("90 seconds of calm piano", [])
    c = planner.plan("90 seconds of calm guitar", [])
    seeds_a = [s.params["seed"] for s in audio_steps(a)]
    assert seeds_a == [s.params["seed"] for s in audio_steps(b)]
    assert len(set(seeds_a)) == len(seeds_a), "every window draws its own noise"
    first = a.sections[0].windows
    assert a.step(first[1].step_id).params["seed"] == a.step(first[0].step_id).params["seed"] + 1
    assert seeds_a[0] != audio_steps(c)[0].params["seed"]
    assert planner.plan("piano, seed 42", []).step("s1-w1").params["seed"] == 42


def test_planner_like_pattern_recalls_and_varies() -> None:
    plan = RuleBasedPlanner().plan("something like pattern abc123 but slower, with strings", [])
    assert [s.type for s in plan.steps] == ["recall", "vary", "analyze", "store"]
    assert plan.step("recall").params == {"pattern_id": "abc123", "top_k": 1}
    vary = plan.step("vary")
    assert str(vary.inputs["from"]) == "recall.pattern"
    assert vary.params["prompt_suffix"] == "with strings, slower tempo"
    assert vary.params["strength"] == 0.35 and vary.params["variation"] == 1
    assert "duration_s" not in vary.params, "without a duration the variation keeps the pattern's own"
    assert plan.step("store").params["tags"]["varied_from"] == "abc123"


def test_planner_like_uuid_and_long_variation() -> None:
    pid = "6f1c2d3e-1111-2222-3333-444455556666"
    plan = RuleBasedPlanner().plan(f"make it like {pid}, very different, 45 seconds", [])
    varies = audio_steps(plan)
    assert plan.step("recall").params["pattern_id"] == pid
    assert [v.params["variation"] for v in varies] == [1, 2]
    assert all(v.params["duration_s"] == 22.5 and v.params["strength"] == 0.7 for v in varies)


def test_planner_like_known_recalled_id_but_not_ordinary_words() -> None:
    recalled = [PatternRecord(id="sunrise", model="m", profile="tiny", duration_s=5, tags={}, created_at_us=0,
                              source="t")]
    assert RuleBasedPlanner().plan("like sunrise, but darker", recalled).step("recall").params["pattern_id"] == \
        "sunrise"
    assert parse_request("feels like a dream, like summer").pattern_id is None


def test_planner_variation_keeps_the_recalled_patterns_tempo_and_key() -> None:
    from grym_synth.memory.music_index import MusicFields
    music = MusicFields(tempo_bpm=119.6, tempo_confidence=0.8, key="A minor", key_confidence=0.7)
    recalled = [PatternRecord(id="sunrise", model="m", profile="tiny", duration_s=5, tags={}, created_at_us=0,
                              source="t", music=music)]
    plan = RuleBasedPlanner().plan("like sunrise, with strings", recalled)
    assert plan.step("vary").params["prompt_suffix"] == "with strings, at 120 BPM in A minor"
    assert "at 120 BPM in A minor" in plan.intent
    # A tempo the request asks for wins over the pattern's; the key stays.
    assert RuleBasedPlanner().plan("like sunrise but faster", recalled).step("vary").params["prompt_suffix"] == \
        "faster tempo, in A minor"
    # Unknown descriptors add nothing, and a pattern that was never described keeps the old suffix.
    unknown = [PatternRecord(id="sunrise", model="m", profile="tiny", duration_s=5, tags={}, created_at_us=0,
                             source="t", music=MusicFields())]
    assert "prompt_suffix" not in RuleBasedPlanner().plan("like sunrise", unknown).step("vary").params
    assert RuleBasedPlanner().plan("like pattern sunrise, with strings", []).step("vary").params["prompt_suffix"] == \
        "with strings"


def test_planner_reuses_settings_of_recalled_patterns() -> None:
    recalled = [
        PatternRecord(id="a", model="m", profile="tiny", duration_s=5, tags={}, created_at_us=0, source="t",
                      metadata={"prompt": "x"}),  # no settings: skipped
        PatternRecord(id="b", model="m", profile="tiny", duration_s=5, tags={}, created_at_us=0, source="t",
                      metadata={"steps": "40", "guidance_scale": "3.5", "scheduler": "dpm"}),
    ]
    g = RuleBasedPlanner().plan("calm piano", recalled).step("s1-w1").params
    assert g["steps"] == 40


def test_planner_without_store_results() -> None:
    plan = RuleBasedPlanner(store_results=False).plan("calm piano", [])
    assert {s.type for s in plan.steps} == {"generate"}


def test_plan_instructions_come_from_the_schema() -> None:
    recalled = [PatternRecord(id="p-7", model="m", profile="tiny", duration_s=5, tags={"mood": "calm"},
                              created_at_us=0, source="t", metadata={"prompt": "calm piano"}, score=0.91)]
    text = plan_instructions(recalled)
    assert "duration_s (0.5..30)" in text and "top_k (1..10)" in text and "scheduler (ddim|dpm)" in text
    assert "inputs audio <- generate.audio/vary.audio" in text
    assert "- p-7: 'calm piano' [mood=calm] score=0.91" in text
    example = extract_plan(text)
    assert example == EXAMPLE_PLAN and validate_plan(example).output == ("gen-1", "gen-2")


# --- coordinator or rules ---------------------------------------------------------------------------------------------
def test_choose_plan_takes_a_valid_coordinator_plan() -> None:
    plan = choose_plan(f"```json\n{PLAN_TEXT}\n```", "calm piano", [], RuleBasedPlanner())
    assert plan.planner == "coordinator" and plan.fallback_reason is None
    assert plan.step("gen").params["duration_s"] == 12.0


@pytest.mark.parametrize(("answer", "error", "reason"), [
    ("I would love to compose that for you!", None, "no JSON in the answer"),
    (json.dumps(plan_with(gen(duration_s=60))), None,
     "schema violation: step 'gen' param 'duration_s' must be 0.5..30, got 60"),
    (None, "deadline exceeded", "coordinator unavailable: deadline exceeded"),
])
def test_choose_plan_falls_back_with_a_reason(answer: str | None, error: str | None, reason: str) -> None:
    plan = choose_plan(answer, "90 seconds of calm piano", [], RuleBasedPlanner(), coordinator_error=error)
    assert plan.planner == "rules"
    assert plan.fallback_reason is not None and plan.fallback_reason.startswith(reason)
    assert plan.duration_s == pytest.approx(90.0)


def test_planning_limits_are_read_from_the_published_schema() -> None:
    """The schema is the one definition of a plan's ranges; the planner code reads them, never restates them."""
    from grym_synth.planning import schema
    from grym_synth.planning.plan import GENERATE_DEFAULTS

    generate = json.loads(SCHEMA_PATH.read_text())["$defs"]["generate_params"]["properties"]
    assert (schema.MIN_SEGMENT_S, schema.MAX_SEGMENT_S) == (generate["duration_s"]["minimum"],
                                                            generate["duration_s"]["maximum"]) == (0.5, 30)
    assert schema.SCHEDULERS == tuple(generate["scheduler"]["enum"])
    assert GENERATE_DEFAULTS["scheduler"] in schema.SCHEDULERS
    assert (schema.MAX_STEPS, schema.MAX_GUIDANCE, schema.MAX_PROMPT_CHARS) == (100, 20, 512)
    rules = RuleBasedPlanner()
    assert (rules.default_duration_s, rules.steps, rules.guidance_scale, rules.scheduler) == tuple(
        GENERATE_DEFAULTS[k] for k in ("duration_s", "steps", "guidance_scale", "scheduler"))


def test_rules_continue_a_named_pattern() -> None:
    plan = RuleBasedPlanner().plan("continue pattern abc-123 for 6 seconds, darker, 3 steps, seed 9", [])
    assert [s.type for s in plan.steps] == ["recall", "continue", "analyze", "store"] and plan.output == ("continue",)
    assert plan.step("recall").params == {"pattern_id": "abc-123", "top_k": 1}
    assert plan.step("continue").params == {"duration_s": 6.0, "prompt_suffix": "darker", "steps": 3, "seed": 9}
    assert plan.step("store").params["tags"]["continued_from"] == "abc-123"
    assert plan.intent.startswith("6 s continuing pattern abc-123")
    for text in ("extend pattern abc-123", "a continuation of pattern abc-123 with strings"):
        assert RuleBasedPlanner().plan(text, []).step("continue").inputs["from"].step == "recall"
    assert "continue" not in {s.type for s in RuleBasedPlanner().plan("like pattern abc-123", []).steps}
