"""Context adapters: how an upstream step's outputs become a step's ``inputs``, and the provenance that travels
with audio so that every stored pattern can be regenerated exactly.

Adapters are small classes keyed by (source step type, target step type), e.g. :class:`RecallToVary` turns a
recalled pattern's provenance into generate parameters for a variation. Executors never look at other steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from grym_synth.core.errors import FailedPrecondition
from grym_synth.memory.store import PatternRecord
from grym_synth.planning.plan import (AUDIO_STEPS, CONTINUE_DEFAULTS, GENERATE_DEFAULTS, GENERATE_KEYS, VARY_DEFAULTS,
                                      Plan, Ref, Step, derive_seed, wrap_seed)
from grym_synth.planning.schema import MAX_PROMPT_CHARS, MAX_SEGMENT_S, MIN_SEGMENT_S

PROVENANCE_KEYS = GENERATE_KEYS


# --- provenance -----------------------------------------------------------------------------------------------------
def provenance(step: Step, params: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to render the same audio again, plus where it came from."""
    prov = {k: params[k] for k in PROVENANCE_KEYS if k in params}
    prov.update({"step_id": step.id, "step_type": step.type})
    prov.update({k: v for k, v in (extra or {}).items() if v is not None})
    return prov


def provenance_metadata(prov: Mapping[str, Any] | None, **extra: Any) -> dict[str, str]:
    """Pattern metadata is ``dict[str, str]``; numbers are written so they parse back exactly (repr of floats)."""
    out: dict[str, str] = {}
    for key, value in {**(prov or {}), **extra}.items():
        if value is None:
            continue
        out[key] = repr(value) if isinstance(value, float) else str(value)
    return out


def generate_params_from_pattern(record: PatternRecord) -> dict[str, Any]:
    """Generate parameters that re-render a stored pattern.

    Patterns made by generate steps (here or by the Generate RPC, same metadata keys) carry their exact
    provenance, which is reproduced as recorded — including schedulers and step counts beyond what plans may
    ask for; the generate executor validates them as it does any request. Only the duration is clamped to one
    segment (MAX_SEGMENT_S, 30 s). Patterns from plain audio uploads have no provenance: their tags become the prompt
    and the seed derives from the pattern id, so a variation is still possible."""
    meta = record.metadata
    prompt = (meta.get("prompt") or "").strip()
    if not prompt:
        words = [v for _, v in sorted(record.tags.items()) if v]
        prompt = ", ".join(["music", *words])[:MAX_PROMPT_CHARS]
    params: dict[str, Any] = {**GENERATE_DEFAULTS, "prompt": prompt}
    params["negative_prompt"] = meta.get("negative_prompt", params["negative_prompt"])
    params["seed"] = wrap_seed(_parse(meta.get("seed"), int, derive_seed(f"pattern:{record.id}")))
    params["steps"] = _parse(meta.get("steps"), int, params["steps"])
    params["guidance_scale"] = _parse(meta.get("guidance_scale"), float, params["guidance_scale"])
    duration = _parse(meta.get("duration_s"), float, record.duration_s or params["duration_s"])
    params["duration_s"] = _clamp(duration, MIN_SEGMENT_S, MAX_SEGMENT_S)
    if _IDENTIFIER.match(meta.get("scheduler", "")):
        params["scheduler"] = meta["scheduler"]
    if _IDENTIFIER.match(meta.get("model", "")):
        params["model"] = meta["model"]
    return params


_IDENTIFIER = re.compile(r"^[a-z0-9_]{1,32}$")


def _parse(text: str | None, kind: Callable[[str], Any], default: Any) -> Any:
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        return default
    return value if not isinstance(value, float) or math.isfinite(value) else default


def _clamp(value: float, lo: float, hi: float) -> float:
    return float(min(max(value, lo), hi))


# --- context adapters -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One input edge being resolved: output ``ref`` of ``source`` feeds input ``param`` of ``target``."""

    param: str
    ref: Ref
    source: Step
    outputs: Mapping[str, Any]
    target: Step
    workflow_id: str


class ContextAdapter(Protocol):
    sources: ClassVar[tuple[str, ...]]
    target: ClassVar[str]

    def __call__(self, link: Link) -> dict[str, Any]: ...


class GenerateToAnalyze:
    """Pass the waveform (and its provenance, which analysis hands on to a store step)."""

    sources: ClassVar[tuple[str, ...]] = AUDIO_STEPS
    target: ClassVar[str] = "analyze"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"audio": link.outputs["audio"], "sample_rate_hz": link.outputs.get("sample_rate_hz"),
                "provenance": link.outputs.get("provenance")}


class AnalysisToStore:
    """Embedding plus provenance metadata, so the stored pattern can be regenerated exactly."""

    sources: ClassVar[tuple[str, ...]] = ("analyze",)
    target: ClassVar[str] = "store"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"embedding": link.outputs["embedding"], "duration_s": float(link.outputs.get("duration_s") or 0.0),
                "metadata": provenance_metadata(link.outputs.get("provenance"), workflow_id=link.workflow_id),
                "tags": dict(link.target.params.get("tags") or {}),
                "audio_to_keep": link.outputs.get("analysed_audio")}  # stored with the pattern (16 kHz mono)


class GenerateToStore:
    """Store straight from audio: the store executor analyses it first."""

    sources: ClassVar[tuple[str, ...]] = AUDIO_STEPS
    target: ClassVar[str] = "store"

    def __call__(self, link: Link) -> dict[str, Any]:
        audio, rate = link.outputs["audio"], link.outputs.get("sample_rate_hz")
        prov = link.outputs.get("provenance") or {}
        duration = len(audio) / rate if rate and hasattr(audio, "__len__") else prov.get("duration_s", 0.0)
        return {"audio": audio, "sample_rate_hz": rate, "duration_s": float(duration),
                "metadata": provenance_metadata(prov, workflow_id=link.workflow_id),
                "tags": dict(link.target.params.get("tags") or {})}


class AnalysisToRecall:
    """Recall patterns similar to freshly analysed audio."""

    sources: ClassVar[tuple[str, ...]] = ("analyze",)
    target: ClassVar[str] = "recall"

    def __call__(self, link: Link) -> dict[str, Any]:
        return {"embedding": link.outputs["embedding"]}


class RecallToVary:
    """A recalled pattern's provenance becomes generate parameters for a variation.

    The prompt is kept (plus ``prompt_suffix``). ``strength`` 0 keeps the seed (an exact re-render); above 0 the
    seed moves by ``variation`` (default 1), which draws new noise for the same prompt and settings — the piece
    stays recognisably "like" the original. An explicit ``seed`` and other overrides on the vary step win."""

    sources: ClassVar[tuple[str, ...]] = ("recall",)
    target: ClassVar[str] = "vary"

    def __call__(self, link: Link) -> dict[str, Any]:
        record = _recalled_pattern(link)
        params = generate_params_from_pattern(record)
        p = link.target.params
        strength = float(p.get("strength", VARY_DEFAULTS["strength"]))
        variation = int(p.get("variation", VARY_DEFAULTS["variation"]))
        original_seed = params["seed"]
        params["seed"] = int(p["seed"]) if "seed" in p else (
            original_seed if strength == 0 else wrap_seed(original_seed + variation))
        _override(params, p)
        # A pattern with stored audio is varied audio-to-audio (VARY from its audio at this strength); one without
        # is re-rendered from its provenance with the moved seed, as before.
        return {"params": params, "varied_from": record.id, "strength": strength, "variation": variation,
                "original_seed": original_seed, "init_pattern_id": record.id if record.audio_sha256 else ""}


class RecallToContinue:
    """A recalled pattern's stored audio becomes the context of a continuation: the recalled prompt (plus
    ``prompt_suffix``), the pattern's seed + 1 unless the step gives one, and ``duration_s`` of new audio (default
    5 s). A pattern without stored audio cannot be continued: FAILED_PRECONDITION naming it."""

    sources: ClassVar[tuple[str, ...]] = ("recall",)
    target: ClassVar[str] = "continue"

    def __call__(self, link: Link) -> dict[str, Any]:
        record = _recalled_pattern(link)
        if not record.audio_sha256:
            raise FailedPrecondition(f"pattern {record.id!r} has no stored audio for continue step "
                                     f"{link.target.id!r} to carry on; continue a pattern made by Generate or Compose "
                                     "(they keep their audio), or vary it instead")
        params = generate_params_from_pattern(record)
        p = link.target.params
        original_seed = params["seed"]
        params["seed"] = int(p["seed"]) if "seed" in p else wrap_seed(original_seed + 1)
        params["duration_s"] = float(CONTINUE_DEFAULTS["duration_s"])
        _override(params, p)
        return {"params": params, "continued_from": record.id, "original_seed": original_seed,
                "init_pattern_id": record.id}


def _override(params: dict[str, Any], step_params: Mapping[str, Any]) -> None:
    """The vary/continue step's own settings over the recalled ones, and its prompt suffix."""
    for key in ("negative_prompt", "duration_s", "steps", "guidance_scale", "scheduler", "model"):
        if key in step_params:
            params[key] = step_params[key]
    if step_params.get("prompt_suffix"):
        params["prompt"] = f"{params['prompt']}, {step_params['prompt_suffix']}"[:MAX_PROMPT_CHARS]


def _recalled_pattern(link: Link) -> PatternRecord:
    value = link.outputs.get(link.ref.output)
    record = value[0] if isinstance(value, list) and value else value
    if not isinstance(record, PatternRecord):
        raise FailedPrecondition(f"recall step {link.source.id!r} found no pattern for {link.target.type} step "
                                 f"{link.target.id!r} to start from")
    return record


class AdapterRegistry:
    """Adapters by (source step type, target step type); the engine asks it to resolve every input edge."""

    def __init__(self, adapters: Iterable[ContextAdapter] = ()) -> None:
        self._by_pair: dict[tuple[str, str], ContextAdapter] = {}
        for adapter in adapters:
            self.register(adapter)

    def register(self, adapter: ContextAdapter) -> None:
        for source in adapter.sources:
            self._by_pair[(source, adapter.target)] = adapter

    def find(self, source_type: str, target_type: str) -> ContextAdapter:
        try:
            return self._by_pair[(source_type, target_type)]
        except KeyError:
            raise FailedPrecondition(f"no context adapter from {source_type} to {target_type} steps") from None

    def resolve(self, step: Step, plan: Plan, outputs: Mapping[str, Mapping[str, Any]],
                workflow_id: str) -> dict[str, Any]:
        """The executor's ``inputs``: its own base inputs merged with every adapted input edge."""
        inputs: dict[str, Any] = base_inputs(step)
        for param, ref in step.inputs.items():
            source = plan.step(ref.step)
            link = Link(param, ref, source, outputs[ref.step], step, workflow_id)
            inputs.update(self.find(source.type, step.type)(link))
        return inputs


def base_inputs(step: Step) -> dict[str, Any]:
    """A generate step's inputs come from its own params (defaults already filled by validation)."""
    if step.type == "generate":
        return {"params": {k: step.params[k] for k in GENERATE_KEYS if k in step.params}}
    return {}


def default_adapters() -> AdapterRegistry:
    return AdapterRegistry([GenerateToAnalyze(), AnalysisToStore(), GenerateToStore(), AnalysisToRecall(),
                            RecallToVary(), RecallToContinue()])
