"""The rule-based planner: the fallback when the coordinator is down, slow, or writes an invalid plan.

A request for new music becomes a *piece of sections* (see :func:`piece_sections`): one section up to 12 s, else intro
/ body / outro, or intro / build / climax / outro when the request asks for a build, or the section names the request
lists ("intro, verse, chorus, outro"); "slow build", "fade in/out" and "loud climax" become the sections' intensity
curves. Validation lays sections out as model windows. Lengths come from ComposeRequest.duration_seconds, else the
text ("90 second", "4 minutes", "1:30"), else the default; beyond ``max_duration_s`` (600 s) they are clamped and the
intent says so. A variation of a stored pattern keeps the older form: vary steps of at most ``MAX_SEGMENT_S``;
"continue pattern X" is one continue step that carries X's stored audio on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from grym_synth.memory.store import MAX_TAG_VALUE, PatternRecord
from grym_synth.planning.plan import (AUDIO_STEPS, CONTINUE_DEFAULTS, GENERATE_DEFAULTS, PLAN_VERSION, VARY_DEFAULTS,
                                      Plan, derive_seed, wrap_seed)
from grym_synth.planning.request import (RequestFeatures, build_prompt, negative_prompt, parse_request,
                                         variation_suffix)
from grym_synth.planning.schema import (MAX_GUIDANCE, MAX_INTENT_CHARS, MAX_PIECE_S, MAX_PROMPT_CHARS, MAX_SEGMENT_S,
                                        MAX_PROMPT_SUFFIX_CHARS, MAX_STEPS, MIN_SEGMENT_S, SCHEDULERS)
from grym_synth.planning.sections import WindowSpec, split_durations
from grym_synth.planning.validation import DEFAULT_WINDOW, validate_plan

# (name, share of the piece, intensity, curve, words added to the prompt) per section template.
SectionTemplate = tuple[str, float, float, str, str]
SINGLE: tuple[SectionTemplate, ...] = (("main", 1.0, 0.7, "steady", ""),)
PLAIN: tuple[SectionTemplate, ...] = (
    ("intro", 0.2, 0.45, "rise", "intro, sparse opening"),
    ("main", 0.6, 0.7, "steady", ""),
    ("outro", 0.2, 0.5, "fall", "outro, ending"),
)
BUILD: tuple[SectionTemplate, ...] = (
    ("intro", 0.15, 0.3, "steady", "intro, sparse opening"),
    ("build", 0.45, 0.75, "rise", "building, growing"),
    ("climax", 0.25, 0.95, "steady", "climax, full arrangement"),
    ("outro", 0.15, 0.45, "fall", "outro, ending"),
)
# Section names a request may list ("intro, verse, chorus, outro"), with their intensity and prompt words.
NAMED_SECTIONS: dict[str, tuple[float, str]] = {
    "intro": (0.4, "intro, sparse opening"), "verse": (0.6, "verse"), "chorus": (0.85, "chorus, full"),
    "bridge": (0.55, "bridge"), "build": (0.75, "building, growing"), "drop": (1.0, "drop, powerful"),
    "breakdown": (0.35, "breakdown, stripped back"), "climax": (0.95, "climax, full arrangement"),
    "outro": (0.45, "outro, ending"),
}
SINGLE_SECTION_MAX_S = 12.0  # up to about one model window a request gets one section
_SECTION_WORD = re.compile(r"\b(" + "|".join(NAMED_SECTIONS) + r")s?\b", re.I)
_BUILD = re.compile(r"\b(slow[- ]?build(?:ing)?|build(?:s|ing)?(?: up)?|crescendo|rising|swell(?:ing)?)\b", re.I)
_DYNAMIC_BUILD = re.compile(r"\b(slow(?:ly)?[- ]?build(?:s|ing)?(?: up)?)\b", re.I)
_FADE_OUT = re.compile(r"\b(fades? out|fading out|fade-out|fade away|dies? away|decrescendo)\b", re.I)
_FADE_IN = re.compile(r"\b(fades? in|fading in|fade-in)\b", re.I)
_LOUD_CLIMAX = re.compile(r"\b(loud|big|huge|massive|epic|powerful)\s+(climax|finale|ending|drop)\b", re.I)
_QUIET = ("calm", "soft", "gentle", "peaceful", "serene", "minimal", "relaxing", "relaxed", "chill")


def kept_music(record: PatternRecord | None, f: RequestFeatures) -> str:
    """What a variation keeps of the recalled pattern's music: "at 120 BPM in A minor" from its stored descriptors
    (AudioLDM reads tempo and key words in a prompt). A tempo the request asks for itself ("faster", "90 bpm") wins;
    unknown descriptors (tempo 0, no key) are left out."""
    music = record.music if record is not None else None
    if music is None:
        return ""
    parts = []
    if music.tempo_bpm > 0 and not (f.tempo_word or f.tempo_bpm):
        parts.append(f"at {round(music.tempo_bpm)} BPM")
    if music.key:
        parts.append(f"in {music.key}")
    return " ".join(parts)


@dataclass(frozen=True)
class RuleBasedPlanner:
    """Plans without a model: the fallback when the coordinator is down, slow, or writes an invalid plan.

    Every plan it returns went through :func:`validate_plan`, so it obeys the same schema as the coordinator's."""

    default_duration_s: float = GENERATE_DEFAULTS["duration_s"]
    max_duration_s: float = MAX_PIECE_S
    steps: int = GENERATE_DEFAULTS["steps"]
    guidance_scale: float = GENERATE_DEFAULTS["guidance_scale"]
    scheduler: str = GENERATE_DEFAULTS["scheduler"]
    store_results: bool = True
    window: WindowSpec = DEFAULT_WINDOW

    def plan(self, request: str, recalled: Sequence[PatternRecord] = (), *, duration_s: float | None = None) -> Plan:
        """Deterministic: the same request and recalled patterns always give the same plan (and seeds).
        ``duration_s`` (ComposeRequest.duration_seconds, validated by the caller) overrides a length in the text."""
        f = parse_request(request, (p.id for p in recalled))
        if duration_s:
            f = replace(f, duration_s=float(duration_s))
        duration, clamped = self._duration(f)
        base_seed = f.seed if f.seed is not None else derive_seed(" ".join(request.lower().split()))
        data: dict[str, Any]
        if f.pattern_id and f.continues:
            named = next((r for r in recalled if r.id == f.pattern_id), None)
            steps, intent = self._continuation_steps(f, kept_music(named, f))
            data = {"steps": steps, "output": [s["id"] for s in steps if s["type"] in AUDIO_STEPS]}
        elif f.pattern_id:
            named = next((r for r in recalled if r.id == f.pattern_id), None)
            steps, intent = self._variation_steps(f, _split(duration), kept_music(named, f))
            data = {"steps": steps, "output": [s["id"] for s in steps if s["type"] in AUDIO_STEPS]}
        else:
            data, intent = self._piece(f, request, duration, base_seed, recalled)
        if clamped:
            intent += f" (clamped from {clamped:g} s to the {self.max_duration_s:g} s limit)"
        data = {"version": PLAN_VERSION, "intent": intent[:MAX_INTENT_CHARS], **data}
        return validate_plan(data, planner="rules", window=self.window)

    def _piece(self, f: RequestFeatures, request: str, duration: float, base_seed: int,
               recalled: Sequence[PatternRecord]) -> tuple[dict[str, Any], str]:
        """Sections (with their prompts, intensities and curves) and, per section, analyze + store of its first
        window so that pattern memory learns from what was composed."""
        prompt = build_prompt(f, request)
        settings = self._settings(recalled)
        sections = piece_sections(request, f, prompt, duration)
        for i, section in enumerate(sections):
            section["seed"] = wrap_seed(base_seed + 1000 * i)
            section["steps"] = f.steps if f.steps is not None else settings["steps"]
            section["negative_prompt"] = negative_prompt(f)
        steps: list[dict[str, Any]] = []
        if self.store_results:
            for i, section in enumerate(sections, start=1):
                steps += [
                    {"id": f"analyze-{i}", "type": "analyze", "inputs": {"audio": f"s{i}-w1.audio"}},
                    {"id": f"store-{i}", "type": "store", "inputs": {"from": f"analyze-{i}.embedding"},
                     "params": {"tags": {**_tags(f, i, len(sections)), "section": section["name"]}}},
                ]
        names = "/".join(s["name"] for s in sections)
        return {"duration_s": duration, "sections": sections, "steps": steps}, f"{duration:g} s: {prompt} ({names})"

    def _duration(self, f: RequestFeatures) -> tuple[float, float | None]:
        requested = f.duration_s if f.duration_s is not None else self.default_duration_s
        duration = min(max(requested, MIN_SEGMENT_S), self.max_duration_s)
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
            if 1 <= steps <= MAX_STEPS and 0 <= guidance <= MAX_GUIDANCE and scheduler in SCHEDULERS:
                return {"steps": steps, "guidance_scale": guidance, "scheduler": scheduler}
        return settings

    def _variation_steps(self, f: RequestFeatures, segments: list[float],
                         keep: str = "") -> tuple[list[dict[str, Any]], str]:
        """Variations of the named pattern; ``keep`` (:func:`kept_music`) joins the prompt suffix so that the
        variation stays at the pattern's tempo and key."""
        steps: list[dict[str, Any]] = [{"id": "recall", "type": "recall",
                                        "params": {"pattern_id": f.pattern_id, "top_k": 1}}]
        suffix = ", ".join(p for p in (variation_suffix(f), keep) if p)[:MAX_PROMPT_SUFFIX_CHARS]
        for i, seconds in enumerate(segments, start=1):
            vary_id = f"vary-{i}" if len(segments) > 1 else "vary"
            strength = f.strength if f.strength is not None else VARY_DEFAULTS["strength"]
            params: dict[str, Any] = {"strength": strength, "variation": i}
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

    def _continuation_steps(self, f: RequestFeatures, keep: str = "") -> tuple[list[dict[str, Any]], str]:
        """New audio carrying the named pattern on from its stored audio (one continue step: the model's window
        holds the pattern's last seconds plus the new part), kept in pattern memory like any rendered segment."""
        suffix = ", ".join(p for p in (variation_suffix(f), keep) if p)[:MAX_PROMPT_SUFFIX_CHARS]
        params: dict[str, Any] = {}
        if f.duration_s is not None:
            params["duration_s"] = min(max(f.duration_s, MIN_SEGMENT_S), MAX_SEGMENT_S)
        if suffix:
            params["prompt_suffix"] = suffix
        if f.seed is not None:
            params["seed"] = f.seed
        if f.steps is not None:
            params["steps"] = f.steps
        steps: list[dict[str, Any]] = [
            {"id": "recall", "type": "recall", "params": {"pattern_id": f.pattern_id, "top_k": 1}},
            {"id": "continue", "type": "continue", "params": params, "inputs": {"from": "recall.pattern"}},
            *self._keep_steps("continue", f, 1, 1)]
        seconds = params.get("duration_s", CONTINUE_DEFAULTS["duration_s"])
        return steps, f"{seconds:g} s continuing pattern {f.pattern_id}" + (f", {suffix}" if suffix else "")

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
    """Equal segments of at most MAX_SEGMENT_S (30 s): 90 → [30, 30, 30], 45 → [22.5, 22.5]."""
    count = max(1, math.ceil(duration / MAX_SEGMENT_S - 1e-9))
    return [round(duration / count, 3)] * count


def _tags(f: RequestFeatures, index: int, total: int) -> dict[str, str]:
    tags = {"source": "compose", "planner": "rules"}
    if f.moods:
        tags["mood"] = ",".join(f.moods)[:MAX_TAG_VALUE]
    if f.genres:
        tags["genre"] = ",".join(f.genres)[:MAX_TAG_VALUE]
    if f.instruments:
        tags["instruments"] = ",".join(f.instruments)[:MAX_TAG_VALUE]
    if f.tempo_bpm:
        tags["tempo_bpm"] = str(f.tempo_bpm)
    if f.tempo_word:
        tags["tempo"] = f.tempo_word
    if f.era:
        tags["era"] = f.era
    if f.pattern_id:
        tags["continued_from" if f.continues else "varied_from"] = f.pattern_id
    if total > 1:
        tags["segment"] = f"{index}/{total}"
    return tags


def piece_sections(request: str, f: RequestFeatures, prompt: str, duration: float) -> list[dict[str, Any]]:
    """The sections of a new piece, in schema form: their names, prompts, durations (adding up to ``duration``
    exactly), intensities and curves, from what the request says about structure and dynamics."""
    listed = _LOUD_CLIMAX.sub(" ", _DYNAMIC_BUILD.sub(" ", request))  # "loud climax", "slow build": dynamics
    named = list(dict.fromkeys(m.group(1).lower() for m in _SECTION_WORD.finditer(listed)))
    templates: tuple[SectionTemplate, ...]
    if duration <= SINGLE_SECTION_MAX_S:
        templates = SINGLE
    elif len(named) >= 2:
        templates = tuple((n, 0.6 if n in ("intro", "outro") else 1.0, *NAMED_SECTIONS[n][:1], "steady",
                           NAMED_SECTIONS[n][1]) for n in named)
    elif _BUILD.search(request) or "climax" in request.lower():
        templates = BUILD
    else:
        templates = PLAIN
    max_sections = max(1, int(duration // 1.0))  # every section at least about a second
    templates = templates[:max_sections]
    durations = split_durations(duration, [t[1] for t in templates])
    quiet = 0.75 if any(m in _QUIET for m in f.moods) else 1.0
    sections = []
    for (name, _, intensity, curve, words), seconds in zip(templates, durations):
        section_prompt = f"{prompt}, {words}" if words else prompt
        sections.append({"name": name, "prompt": section_prompt[:MAX_PROMPT_CHARS], "duration_s": seconds,
                         "intensity": round(intensity * quiet, 3), "curve": curve})
    _apply_dynamics(request, sections)
    return sections


def _apply_dynamics(request: str, sections: list[dict[str, Any]]) -> None:
    """"fade out" -> the last section falls; "fade in" -> the first rises; "loud climax" -> the loudest section is
    at full intensity; "slow build" on a single section -> it rises."""
    if _FADE_OUT.search(request):
        sections[-1]["curve"] = "fall"
    if _FADE_IN.search(request):
        sections[0]["curve"] = "rise"
    if _LOUD_CLIMAX.search(request):
        loudest = max(sections, key=lambda s: s["intensity"])
        loudest["intensity"] = 1.0
    if len(sections) == 1 and _BUILD.search(request):
        sections[0]["curve"] = "rise"
