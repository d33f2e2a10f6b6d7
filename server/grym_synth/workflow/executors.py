"""What an executor sees (:class:`StepContext`), the executor protocol, and the executors over pattern memory.

Executor contract per step type (``inputs`` as built by the default adapters, :mod:`grym_synth.workflow.adapters`):

=========  ======================================================================  ============================
type       inputs                                                                  must return
=========  ======================================================================  ============================
generate   ``params``: prompt, negative_prompt, duration_s, steps, guidance_scale,  ``audio`` (np.ndarray),
           seed, scheduler, model                                                  ``sample_rate_hz``
vary       same ``params`` (from the recalled pattern) + ``varied_from``,          same as generate
           ``strength``, ``variation``, ``init_pattern_id`` (its stored audio)
continue   same ``params`` (recalled prompt, seed + 1) + ``continued_from``,       same as generate (the new
           ``init_pattern_id`` (the stored audio whose end is the context)         audio only)
analyze    ``audio``, ``sample_rate_hz``, ``provenance``                            ``embedding``, ``duration_s``
store      ``embedding``, ``duration_s``, ``metadata``, ``tags`` — or ``audio``,    ``pattern_id``, ``pattern``
           ``sample_rate_hz``, ``duration_s``, ``metadata``, ``tags`` from audio
recall     ``{}`` or ``embedding`` (params: query, tags, pattern_id, top_k)          ``patterns``, ``pattern``
=========  ======================================================================  ============================

:class:`RecallExecutor` and :class:`StoreExecutor` below implement recall and store over pattern memory; the
model-backed executors (generate/vary/continue on AudioLDM, analyze on wav2vec2) live in
:mod:`grym_synth.compose.service`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from grym_synth.core.audio import TARGET_RATE_HZ
from grym_synth.core.errors import FailedPrecondition
from grym_synth.memory.learning import FeedbackStore, rank_recalled, recall_for_request
from grym_synth.memory.music_index import MusicFields
from grym_synth.memory.store import MAX_TOP_K, PatternRecord, PatternStore
from grym_synth.planning.plan import RECALL_DEFAULT_TOP_K, Step
from grym_synth.workflow.events import StepProgress
from grym_synth.workflow.store import truncate
from grym_synth.workflow.summary import MAX_SUMMARY_TEXT


@dataclass
class StepContext:
    """What an executor may know about its surroundings, and its one way to talk back: progress."""

    workflow_id: str
    step_id: str
    request_id: str
    deadline: float | None  # time.monotonic() value, as elsewhere in the orchestrator
    _emit: Callable[..., Any] = field(repr=False)

    async def progress(self, done: int, total: int, message: str = "") -> None:
        """Report progress (e.g. denoising step ``done`` of ``total``); shows up as a StepProgress event."""
        self._emit(StepProgress, step_id=self.step_id, done=int(done), total=int(total),
                   message=truncate(message, MAX_SUMMARY_TEXT))

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class StepExecutor(Protocol):
    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]: ...


# --- pattern-memory executors -----------------------------------------------------------------------------------------
class RecallExecutor:
    """recall: by id, by similarity to an analysed embedding, by words of a query, or by tags — ranked with
    ratings when a feedback store is given."""

    def __init__(self, patterns: PatternStore, feedback: FeedbackStore | None = None) -> None:
        self.patterns = patterns
        self.feedback = feedback

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        p = step.params
        top_k, tags = int(p.get("top_k", RECALL_DEFAULT_TOP_K)), dict(p.get("tags") or {})
        if p.get("pattern_id"):
            found = [await self.patterns.get(str(p["pattern_id"]))]
        elif inputs.get("embedding") is not None:
            found = await self._similar(np.asarray(inputs["embedding"], dtype=np.float32), top_k, tags)
        elif p.get("query"):
            found = await recall_for_request(self.patterns, self.feedback, str(p["query"]), top_k, tag_filter=tags)
        else:
            found, _ = await self.patterns.list(page_size=top_k, tag_filter=tags)
        await ctx.progress(1, 1, f"{len(found)} pattern(s) recalled")
        return {"patterns": found, "pattern": found[0] if found else None}

    async def _similar(self, vector: np.ndarray, top_k: int, tags: Mapping[str, str]) -> list[PatternRecord]:
        # Over-fetch so that ratings can re-order beyond the pure-similarity top k.
        matches = await self.patterns.search(vector.tolist(), top_k=min(MAX_TOP_K, top_k * 3), tag_filter=tags or None)
        ratings = await self.feedback.ratings([m.id for m in matches]) if self.feedback else {}
        return [r.as_record() for r in rank_recalled(matches, ratings)[:top_k]]


class StoreExecutor:
    """store: insert the embedding with its provenance metadata; from raw audio it first calls ``analyze``
    (an async callable returning (embedding, duration_s)) — the lead wires it to the wav2vec2 analysis."""

    def __init__(self, patterns: PatternStore, *,
                 analyze: Callable[[Any, int | None], Awaitable[tuple[Sequence[float], float]]] | None = None,
                 source: str = "compose") -> None:
        self.patterns = patterns
        self.analyze = analyze
        self.source = source

    async def __call__(self, step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        embedding, duration = inputs.get("embedding"), float(inputs.get("duration_s") or 0.0)
        if embedding is None:
            if self.analyze is None:
                raise FailedPrecondition(f"step {step.id!r} stores audio but this server has no analysis for it; "
                                      "add an analyze step")
            embedding, duration = await self.analyze(inputs["audio"], inputs.get("sample_rate_hz"))
        record = await self.patterns.insert(
            np.asarray(embedding, dtype=np.float32).tolist(), duration_s=duration,
            tags=inputs.get("tags") or step.params.get("tags") or {}, source=f"{self.source}:{ctx.workflow_id}",
            metadata=inputs.get("metadata") or {}, audio=_audio_to_keep(inputs), music=_music(inputs.get("music")))
        return {"pattern_id": record.id, "pattern": record}


def _music(record: Mapping[str, Any] | None) -> MusicFields | None:
    """A description passed to a store step (MusicFields as a dict, compose.service.music_record) for the pattern's
    music fields, so that SearchPatterns finds it by text and music_filter."""
    if not record:
        return None
    known = MusicFields.__dataclass_fields__
    return MusicFields(**{k: v for k, v in record.items() if k in known})


def _audio_to_keep(inputs: dict[str, Any]) -> np.ndarray | None:
    """The audio a store step keeps with its pattern: the analysed 16 kHz mono audio (analyze -> store), or the
    generated audio itself (generate -> store; AudioLDM's rate is 16 kHz)."""
    kept = inputs.get("audio_to_keep")
    if kept is not None:
        return np.asarray(kept, dtype=np.float32).reshape(-1)
    audio, rate = inputs.get("audio"), inputs.get("sample_rate_hz")
    if audio is None or (rate and int(rate) != TARGET_RATE_HZ):
        return None
    return np.asarray(audio, dtype=np.float32).reshape(-1)

