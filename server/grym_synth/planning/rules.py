"""The rule-based planner: the fallback when the coordinator is down, slow, or writes an invalid plan.

A request longer than one segment is *split* into equal segments of at most ``MAX_SEGMENT_S`` (90 s -> 3 x 30 s),
each with its own seed (base seed + segment index). Requests beyond ``max_duration_s`` (default 300 s) are clamped,
and the plan's intent says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grym_synth.memory.store import MAX_TAG_VALUE, PatternRecord
from grym_synth.planning.plan import (AUDIO_STEPS, GENERATE_DEFAULTS, PLAN_VERSION, VARY_DEFAULTS, Plan, derive_seed,
                                      wrap_seed)
from grym_synth.planning.request import (RequestFeatures, build_prompt, negative_prompt, parse_request,
                                         variation_suffix)
from grym_synth.planning.schema import (MAX_GUIDANCE, MAX_INTENT_CHARS, MAX_SEGMENT_S, MAX_STEPS, MIN_SEGMENT_S,
                                        SCHEDULERS)
from grym_synth.planning.validation import validate_plan


@dataclass(frozen=True)
class RuleBasedPlanner:
    """Plans without a model: the fallback when the coordinator is down, slow, or writes an invalid plan.

    Every plan it returns went through :func:`validate_plan`, so it obeys the same schema as the coordinator's."""

    default_duration_s: float = GENERATE_DEFAULTS["duration_s"]
    max_duration_s: float = 300.0
    steps: int = GENERATE_DEFAULTS["steps"]
    guidance_scale: float = GENERATE_DEFAULTS["guidance_scale"]
    scheduler: str = GENERATE_DEFAULTS["scheduler"]
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
        data = {"version": PLAN_VERSION, "intent": intent[:MAX_INTENT_CHARS], "steps": steps,
                "output": [s["id"] for s in steps if s["type"] in AUDIO_STEPS]}
        return validate_plan(data, planner="rules")

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
        tags["varied_from"] = f.pattern_id
    if total > 1:
        tags["segment"] = f"{index}/{total}"
    return tags


def _intent(f: RequestFeatures, prompt: str, segments: list[float]) -> str:
    total = sum(segments)
    split = f" in {len(segments)} segments of {segments[0]:g} s" if len(segments) > 1 else ""
    return f"{total:g} s: {prompt}{split}"

