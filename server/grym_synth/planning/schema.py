"""The published plan JSON Schema (``plan.schema.json``, package data beside this module) and the limits read from it.

The same file is what clients and the coordinator prompt see (README links it), so the limits that planning code
applies (segment length, step counts, text lengths, the schedulers a plan may name) are read from it here rather
than written a second time.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(str(resources.files("grym_synth.planning") / "plan.schema.json"))


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The published schema, loaded once: the service validates against exactly what clients read."""
    return json.loads(SCHEMA_PATH.read_text())


def _param(step_type: str, name: str) -> dict[str, Any]:
    return plan_schema()["$defs"][f"{step_type}_params"]["properties"][name]  # type: ignore[no-any-return]


MIN_SEGMENT_S = float(_param("generate", "duration_s")["minimum"])
MAX_SEGMENT_S = float(_param("generate", "duration_s")["maximum"])  # one generate step renders at most this long
MAX_STEPS = int(_param("generate", "steps")["maximum"])
MAX_GUIDANCE = float(_param("generate", "guidance_scale")["maximum"])
SCHEDULERS: tuple[str, ...] = tuple(_param("generate", "scheduler")["enum"])  # a subset of generation's
MAX_PROMPT_CHARS = int(_param("generate", "prompt")["maxLength"])
MAX_PROMPT_SUFFIX_CHARS = int(_param("vary", "prompt_suffix")["maxLength"])
MAX_INTENT_CHARS = int(plan_schema()["properties"]["intent"]["maxLength"])
MAX_PIECE_S = float(plan_schema()["properties"]["duration_s"]["maximum"])  # a sectioned piece is at most this long
MIN_PIECE_S = float(plan_schema()["properties"]["duration_s"]["minimum"])
MAX_SECTIONS = int(plan_schema()["properties"]["sections"]["maxItems"])
