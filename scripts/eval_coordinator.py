#!/usr/bin/env python
"""How often the coordinator's constrained plans are used, and (for a trained model) whether they follow the request.

What runs: the ``coordinator`` model in a real embedded tritonserver (a repository holding only it, exported by the
same code as ``grym-synth export``), streamed through the orchestrator's TritonCoordinatorBackend with the plan's
answer schema (grym_synth.coordinator.grammar), with the prompt Compose sends (compose_prompt) and Compose's sampling
defaults; each answer then goes through the server's plan choice (grym_synth.planning.choose.choose_plan, i.e.
plan extraction and validate_plan, falling back to the rule planner). Audio is not generated: this measures planning.

Reported per model: plans from the coordinator vs the rule fallback (and the fallback reasons), schema-valid
answers, and keyword checks of whether the plan follows the request:
  * duration: the plan's length (sum of its sections' duration_s, else of its generate steps' duration_s, default
    10 s each) within 10% of the requested length;
  * mood: one of the request's mood words (or a listed synonym) appears in the plan's intent or prompts;
  * instruments: every instrument named in the request appears in the plan's intent or prompts.

    .venv/bin/python scripts/eval_coordinator.py --llm seeded-qwen2
    .venv/bin/python scripts/eval_coordinator.py --llm smollm2 --limit 10 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from grym_synth.compose.service import compose_prompt
from grym_synth.coordinator.grammar import plan_answer_schema
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.inference.export.coordinator import COORDINATOR_LLM_WEIGHTS, GENERATION_DEFAULTS
from grym_synth.inference.export.repository import build_repository
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import EmbeddedTriton
from grym_synth.planning.choose import choose_plan
from grym_synth.planning.extract import extract_plan
from grym_synth.planning.rules import RuleBasedPlanner

MOODS = {
    "calm": ("calm", "peaceful", "gentle", "soft", "relax", "serene", "quiet"),
    "dark": ("dark", "ominous", "sinister", "gloomy", "brooding"),
    "happy": ("happy", "joyful", "cheerful", "bright", "uplifting", "upbeat"),
    "sad": ("sad", "melanchol", "somber", "sorrow", "mournful"),
    "energetic": ("energetic", "energy", "driving", "intense", "powerful", "fast"),
    "dreamy": ("dream", "ethereal", "floating", "hazy"),
    "tense": ("tense", "tension", "suspense", "anxious"),
    "epic": ("epic", "heroic", "grand", "majestic", "cinematic"),
    "romantic": ("romantic", "love", "tender", "warm"),
    "mysterious": ("myster", "enigmatic", "eerie", "strange"),
}

# (request, seconds, mood, instruments): lengths from 5 s to 4 min, ten moods, structures and variations.
REQUESTS: list[tuple[str, float, str, tuple[str, ...]]] = [
    ("a 10 second calm piano melody", 10, "calm", ("piano",)),
    ("30 seconds of dark ambient drone with cello", 30, "dark", ("cello",)),
    ("a happy 20 second ukulele tune", 20, "happy", ("ukulele",)),
    ("sad violin solo, 15 seconds", 15, "sad", ("violin",)),
    ("energetic drum and bass loop for 12 seconds", 12, "energetic", ("drum", "bass")),
    ("a dreamy synth pad, 45 seconds, slow build", 45, "dreamy", ("synth",)),
    ("tense orchestral strings for a 25 second chase scene", 25, "tense", ("strings",)),
    ("epic 60 second cinematic piece with brass and timpani", 60, "epic", ("brass", "timpani")),
    ("romantic acoustic guitar ballad, 40 seconds", 40, "romantic", ("guitar",)),
    ("mysterious 18 second flute melody in a cave", 18, "mysterious", ("flute",)),
    ("90 second ambient piece, rain, slow build, calm piano", 90, "calm", ("piano",)),
    ("a 5 second happy xylophone jingle", 5, "happy", ("xylophone",)),
    ("two minutes of dark techno with a heavy kick drum", 120, "dark", ("drum",)),
    ("sad piano and cello duet, 35 seconds, fade out", 35, "sad", ("piano", "cello")),
    ("an energetic 8 second guitar riff", 8, "energetic", ("guitar",)),
    ("dreamy harp arpeggios for 22 seconds", 22, "dreamy", ("harp",)),
    ("tense 30 second ticking clock with low synth bass", 30, "tense", ("synth", "bass")),
    ("epic choir and organ, 50 seconds, loud climax", 50, "epic", ("choir", "organ")),
    ("romantic saxophone jazz, 28 seconds", 28, "romantic", ("saxophone",)),
    ("mysterious music box lullaby, 16 seconds", 16, "mysterious", ("music box",)),
    ("calm lo-fi beat with soft piano and vinyl crackle, 75 seconds", 75, "calm", ("piano",)),
    ("happy marimba groove, intro verse chorus, 36 seconds", 36, "happy", ("marimba",)),
    ("4 minute dark cinematic score with strings and piano, slow build and fade out", 240, "dark",
     ("strings", "piano")),
    ("sad 3 minute rainy day guitar instrumental", 180, "sad", ("guitar",)),
    ("energetic 45 second rock song with drums and electric guitar", 45, "energetic", ("drums", "guitar")),
    ("dreamy 1 minute shoegaze with reverb guitar", 60, "dreamy", ("guitar",)),
    ("a variation of a calm flute pattern, 14 seconds", 14, "calm", ("flute",)),
    ("epic trumpet fanfare, 6 seconds", 6, "epic", ("trumpet",)),
    ("tense horror soundscape with violin scratches, 32 seconds", 32, "tense", ("violin",)),
    ("a 2.5 minute calm meditation with singing bowls and soft pads", 150, "calm", ("singing bowl",)),
]


@dataclass
class Outcome:
    request: str
    planner: str
    reason: str | None
    answer_json: bool
    duration_ok: bool
    mood_ok: bool
    instruments_ok: bool
    plan_seconds: float
    tokens: int
    seconds: float
    answer: str = field(repr=False, default="")


def plan_text(data: dict) -> str:
    """The words a plan puts to the music: its intent and every prompt."""
    parts = [str(data.get("intent", ""))]
    for section in data.get("sections") or []:
        parts.append(str(section.get("prompt", "")))
    for step in data.get("steps") or []:
        params = step.get("params") or {}
        parts += [str(params.get("prompt", "")), str(params.get("prompt_suffix", ""))]
    return " ".join(parts).lower()


def plan_seconds(data: dict) -> float:
    sections = data.get("sections") or []
    if sections:
        return float(sum(float(s.get("duration_s", 0)) for s in sections))
    return float(sum(float((s.get("params") or {}).get("duration_s", 10.0)) for s in data.get("steps") or []
                     if s.get("type") in ("generate", "vary")))


def judge(request: tuple[str, float, str, tuple[str, ...]], answer: str, tokens: int, seconds: float) -> Outcome:
    text, want_s, mood, instruments = request
    plan = choose_plan(answer, text, [], RuleBasedPlanner())
    data = extract_plan(answer) or {}
    words = plan_text(data)
    got_s = plan_seconds(data) if data else 0.0
    return Outcome(
        request=text, planner=plan.planner, reason=plan.fallback_reason, answer_json=bool(data),
        duration_ok=plan.planner == "coordinator" and abs(got_s - want_s) <= 0.1 * want_s,
        mood_ok=plan.planner == "coordinator" and any(w in words for w in MOODS[mood]),
        instruments_ok=plan.planner == "coordinator" and all(i in words for i in instruments),
        plan_seconds=got_s, tokens=tokens, seconds=seconds, answer=answer,
    )


async def run_requests(backend: TritonCoordinatorBackend, requests, max_tokens: int, temperature: float,
                       top_p: float) -> list[Outcome]:
    outcomes = []
    for i, request in enumerate(requests):
        started = time.perf_counter()
        answer, tokens = [], 0
        stream = backend.stream(compose_prompt(request[0], []), max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, seed=1000 + i, deadline_s=1800)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                tokens = max(tokens, event.token_index + 1)
                if event.kind == "answer":
                    answer.append(event.text)
        outcome = judge(request, "".join(answer), tokens, time.perf_counter() - started)
        outcomes.append(outcome)
        print(f"[{i + 1}/{len(requests)}] {outcome.planner:11s} {outcome.seconds:6.1f}s {outcome.tokens:4d} tok "
              f"dur={outcome.plan_seconds:g}/{request[1]:g} mood={outcome.mood_ok} instr={outcome.instruments_ok} "
              f"{(outcome.reason or '')[:80]} | {''.join(answer)[:160]!r}", flush=True)
    return outcomes


def summary(llm: str, outcomes: list[Outcome], load_s: float) -> dict:
    n = len(outcomes)
    tokens = sum(o.tokens for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.reason:
            key = o.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "llm": llm, "requests": n,
        "coordinator_rate": sum(o.planner == "coordinator" for o in outcomes) / n,
        "json_rate": sum(o.answer_json for o in outcomes) / n,
        "duration_rate": sum(o.duration_ok for o in outcomes) / n,
        "mood_rate": sum(o.mood_ok for o in outcomes) / n,
        "instruments_rate": sum(o.instruments_ok for o in outcomes) / n,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "median_plan_s": statistics.median(o.seconds for o in outcomes),
        "load_s": load_s, "fallback_reasons": reasons,
    }


def markdown(row: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    reasons = ", ".join(f"{k} x{v}" for k, v in row["fallback_reasons"].items()) or "none"
    return (f"| {row['llm']} | {row['requests']} | {pct(row['coordinator_rate'])} | {pct(row['json_rate'])} | "
            f"{pct(row['duration_rate'])} | {pct(row['mood_rate'])} | {pct(row['instruments_rate'])} | "
            f"{row['tokens_per_s']:.1f} | {row['median_plan_s']:.1f} | {row['load_s']:.0f} | {reasons} |")


async def evaluate(llm: str, limit: int, max_tokens: int, temperature: float, top_p: float, work: Path) -> dict:
    repo = work / "repo"
    started = time.perf_counter()
    build_repository("tiny", repo, weights={"coordinator": COORDINATOR_LLM_WEIGHTS[llm]}, seed=0,
                     models=["coordinator"])
    export_s = time.perf_counter() - started
    server = EmbeddedTriton(repo, work / "triton.log")
    server.start()
    try:
        server.wait_models_ready(["coordinator"], timeout_s=600)
        load_s = time.perf_counter() - started
        print(f"{llm}: export {export_s:.1f}s, export + Triton start + model load {load_s:.1f}s", flush=True)
        client = TritonClient(server.grpc_url, headers=server.auth_headers or None)
        backend = TritonCoordinatorBackend(client, token_timeout_s=600, json_schema=plan_answer_schema())
        try:
            outcomes = await run_requests(backend, REQUESTS[:limit], max_tokens, temperature, top_p)
        finally:
            await client.close()
    finally:
        server.stop()
    return summary(llm, outcomes, load_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", choices=sorted(COORDINATOR_LLM_WEIGHTS), default="seeded-qwen2")
    parser.add_argument("--limit", type=int, default=len(REQUESTS), help="first N of the 30 requests")
    parser.add_argument("--max-tokens", type=int, default=512, help="Compose's default token budget")
    parser.add_argument("--temperature", type=float, default=GENERATION_DEFAULTS["temperature"])
    parser.add_argument("--top-p", type=float, default=GENERATION_DEFAULTS["top_p"])
    parser.add_argument("--work-dir", type=Path, help="keep the exported repository here (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print the result as a docs/benchmarks.md row")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval-coordinator-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        row = asyncio.run(evaluate(args.llm, args.limit, args.max_tokens, args.temperature, args.top_p, work))
    print(json.dumps(row, indent=2))
    if args.markdown:
        print(markdown(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
