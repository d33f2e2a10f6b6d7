"""Sections of a piece: the rule planner's structure and dynamics, validation of sectioned plans (durations that add
up, windows that fit the model), and the window layout."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from grym_synth.core.errors import InvalidArgument
from grym_synth.planning.choose import choose_plan, with_duration
from grym_synth.planning.request import parse_request
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.planning.sections import (RENDER_MARGIN_S, WindowSpec, curve_points, intensity_db, layout,
                                          split_durations)
from grym_synth.planning.validation import validate_plan

SECTIONED: dict[str, Any] = {
    "version": 1, "intent": "a 60 s piece", "duration_s": 60,
    "sections": [
        {"name": "intro", "prompt": "soft piano", "duration_s": 15, "intensity": 0.3},
        {"name": "climax", "prompt": "full orchestra", "duration_s": 30, "intensity": 1.0, "curve": "rise"},
        {"name": "outro", "prompt": "soft piano", "duration_s": 15, "curve": "fall"},
    ],
    "steps": [],
}


def names(plan: Any) -> list[str]:
    return [s.name for s in plan.sections]


def test_slow_build_becomes_intro_build_climax_outro() -> None:
    plan = RuleBasedPlanner().plan("90 second ambient piece, rain, slow build", [])
    assert names(plan) == ["intro", "build", "climax", "outro"]
    assert plan.duration_s == pytest.approx(90.0)
    build = plan.sections[1]
    assert build.curve == "rise" and build.intensity > plan.sections[0].intensity
    assert plan.sections[-1].curve == "fall"
    assert all("rain" in s.prompt for s in plan.sections)
    assert "slow tempo" not in plan.sections[0].prompt, "'slow build' is dynamics, not tempo"


def test_requested_section_names_fade_out_and_loud_climax() -> None:
    plan = RuleBasedPlanner().plan("intro, verse, chorus and outro, pop, loud climax, fade out", [], duration_s=80)
    assert names(plan) == ["intro", "verse", "chorus", "outro"]
    assert max(s.intensity for s in plan.sections) == 1.0
    assert plan.sections[-1].curve == "fall"
    assert plan.duration_s == pytest.approx(80.0)


def test_short_pieces_are_one_section_and_fade_in() -> None:
    plan = RuleBasedPlanner().plan("a 6 second drone that fades in", [])
    assert names(plan) == ["main"] and plan.sections[0].curve == "rise"
    tiny = RuleBasedPlanner().plan("a short blip", [], duration_s=0.5)
    assert tiny.duration_s == pytest.approx(0.5) and len(tiny.sections[0].windows) == 1


@pytest.mark.parametrize(("text", "seconds"), [("90 second", 90), ("4 minutes", 240), ("1:30", 90),
                                               ("ten minutes", 600)])
def test_lengths_in_the_text(text: str, seconds: float) -> None:
    plan = RuleBasedPlanner().plan(f"{text} of ambient music", [])
    assert plan.duration_s == pytest.approx(seconds)


def test_request_duration_overrides_the_text_and_steps_are_read() -> None:
    plan = RuleBasedPlanner().plan("90 second ambient, 5 steps", [], duration_s=240.0)
    assert plan.duration_s == pytest.approx(240.0)
    assert {s.params["steps"] for s in plan.steps if s.type == "generate"} == {5}
    assert parse_request("quick draft in 8 denoising steps").steps == 8


def test_stores_wait_for_every_window() -> None:
    plan = RuleBasedPlanner().plan("2 minutes of calm piano", [])
    windows = {w.step_id for s in plan.sections for w in s.windows}
    stores = [s for s in plan.steps if s.type == "store"]
    assert len(stores) == len(plan.sections)
    assert all(windows <= set(s.upstream) for s in stores), "a failed piece stores nothing"


def test_sectioned_plan_validates_and_round_trips() -> None:
    plan = validate_plan(copy.deepcopy(SECTIONED))
    assert names(plan) == ["intro", "climax", "outro"]
    assert plan.sections[2].intensity == 0.6 and plan.sections[0].curve == "steady"  # defaults
    assert validate_plan(json.loads(plan.to_json())).to_dict() == plan.to_dict(), "validation is idempotent"
    assert plan.output == tuple(s.id for s in plan.steps if s.type == "generate")


def test_section_rounding_is_fixed_and_real_mismatch_refused() -> None:
    data = copy.deepcopy(SECTIONED)
    data["sections"][0]["duration_s"] = 15.004
    plan = validate_plan(data)
    assert sum(s.duration_s for s in plan.sections) == pytest.approx(60.0, abs=1e-9)
    data["sections"][0]["duration_s"] = 20
    with pytest.raises(InvalidArgument, match="add up to 65 s, but duration_s is 60 s"):
        validate_plan(data)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["sections"][0].update(duration_s=math.nan), "must be a finite number"),
    (lambda d: d.update(duration_s=math.inf), "duration_s"),
    (lambda d: d["sections"][0].update(curve="zigzag"), "curve"),
    (lambda d: d["sections"][0].update(intensity=2), "intensity"),
    (lambda d: d.update(duration_s=700, sections=[{"name": "a", "prompt": "x", "duration_s": 700}]), "600"),
    (lambda d: d.update(sections=[{"name": "a", "prompt": "x", "duration_s": 400}] * 2, duration_s=None) or
     d.pop("duration_s"), "at most 600 s"),
])
def test_bad_sections_are_refused(mutate: Any, message: str) -> None:
    data = copy.deepcopy(SECTIONED)
    mutate(data)
    with pytest.raises(InvalidArgument, match=message):
        validate_plan(data)


def test_layout_windows_fit_and_cover_each_section() -> None:
    spec = WindowSpec(10.0, 1.0)
    sections = layout([0.5, 13.5, 40.5], spec)
    for duration, windows in zip([0.5, 13.5, 40.5], sections):
        assert sum(w.core_s for w in windows) == pytest.approx(duration)
        assert all(w.render_s <= spec.window_s for w in windows)
    assert sections[-1][-1].render_s == pytest.approx(sections[-1][-1].core_s + RENDER_MARGIN_S), "no tail at the end"
    assert sections[0][0].render_s == pytest.approx(0.5 + 1.0 + RENDER_MARGIN_S)
    with pytest.raises(ValueError):
        WindowSpec(2.0, 1.0)


def test_split_durations_add_up_exactly() -> None:
    parts = split_durations(95.5, [0.15, 0.45, 0.25, 0.15])
    assert sum(parts) == pytest.approx(95.5, abs=1e-9) and parts[0] == round(95.5 * 0.15, 3)


def test_curves() -> None:
    assert intensity_db(1.0) == 0.0 and intensity_db(0.0) == -12.0
    start, _, end = curve_points("rise", 0.9, 0.3)
    assert start == intensity_db(0.3) and end == intensity_db(0.9)
    assert curve_points("fall", 0.5, None)[2] < curve_points("fall", 0.5, None)[0]
    s = curve_points("swell", 0.5, None)
    assert s[1] > s[0] and s[1] > s[2]
    assert len(set(curve_points("steady", 0.5, 0.1))) == 1


def test_coordinator_sections_are_stretched_to_the_requested_length() -> None:
    answer = json.dumps(SECTIONED)
    plan = choose_plan(answer, "piece", [], RuleBasedPlanner(), duration_s=90.0)
    assert plan.planner == "coordinator" and plan.duration_s == pytest.approx(90.0)
    assert [s.duration_s for s in plan.sections] == pytest.approx([22.5, 45.0, 22.5])
    assert with_duration(SECTIONED, 30.0)["duration_s"] == 30.0
    old_style = json.dumps({"version": 1, "intent": "x", "steps": [{"id": "g", "type": "generate",
                                                                   "params": {"prompt": "p"}}]})
    fallback = choose_plan(old_style, "90 second piano", [], RuleBasedPlanner(), duration_s=90.0)
    assert fallback.planner == "rules" and "no sections" in (fallback.fallback_reason or "")
    assert choose_plan(old_style, "piano", [], RuleBasedPlanner()).planner == "coordinator"


def test_plan_without_sections_checks_its_duration_and_keeps_concatenation() -> None:
    steps = [{"id": "g", "type": "generate", "params": {"prompt": "p", "duration_s": 5}}]
    with pytest.raises(InvalidArgument, match="finite"):
        validate_plan({"version": 1, "intent": "x", "duration_s": math.nan, "steps": steps})
    plan = validate_plan({"version": 1, "intent": "x", "steps": steps})
    assert plan.sections == () and plan.duration_s is None and plan.output == ("g",)
    assert "sections" not in plan.to_dict()
