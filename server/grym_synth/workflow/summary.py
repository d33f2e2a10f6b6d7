"""Step summaries: a JSON-safe, bounded picture of a step's outputs (never raw audio), as stored and streamed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from grym_synth.memory.store import PatternRecord
from grym_synth.workflow.store import truncate

MAX_SUMMARY_ITEMS = 16
MAX_SUMMARY_TEXT = 300


def summarize(value: Any, depth: int = 0) -> Any:
    """A JSON-safe, bounded picture of an output: arrays become shape/dtype (+ RMS for audio-sized 1-D arrays),
    patterns their id and tags, long lists and strings are cut."""
    if isinstance(value, np.ndarray):
        return _summarize_array(value)
    if isinstance(value, PatternRecord):
        return {"id": value.id, "tags": dict(value.tags), "score": value.score, "duration_s": value.duration_s,
                "prompt": truncate(value.metadata.get("prompt", ""), MAX_SUMMARY_TEXT)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    if isinstance(value, (bool, int, str)) or value is None:
        return truncate(value, MAX_SUMMARY_TEXT) if isinstance(value, str) else value
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if depth >= 4:
        return truncate(repr(value), MAX_SUMMARY_TEXT)
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {str(k): summarize(v, depth + 1) for k, v in items[:MAX_SUMMARY_ITEMS * 2]}
        if len(items) > MAX_SUMMARY_ITEMS * 2:
            out["..."] = f"{len(items) - MAX_SUMMARY_ITEMS * 2} more keys"
        return out
    if isinstance(value, (list, tuple)):
        if len(value) > 64 and all(isinstance(v, (int, float)) for v in value[:64]):
            return {"length": len(value)}
        head = [summarize(v, depth + 1) for v in value[:MAX_SUMMARY_ITEMS]]
        return head + ([f"... {len(value) - MAX_SUMMARY_ITEMS} more"] if len(value) > MAX_SUMMARY_ITEMS else [])
    return truncate(repr(value), MAX_SUMMARY_TEXT)


def _summarize_array(a: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size and np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        out["finite"] = bool(finite.all())
        if finite.any():
            out["rms"] = float(np.sqrt(np.mean(np.square(a[finite], dtype=np.float64))))
    return out


def summarize_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    return summarize(dict(outputs))  # type: ignore[no-any-return]
