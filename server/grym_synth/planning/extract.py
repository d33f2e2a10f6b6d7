"""Finding the JSON plan in an LLM answer: fenced blocks first, then balanced braces in the prose, with the repairs
LLMs need most (trailing commas, Python literals). Bounded work on hostile text."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

MAX_ANSWER_CHARS = 65_536
MAX_DECODE_STARTS = 256
MAX_LENIENT_STARTS = 32

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def extract_plan(text: str | None) -> dict[str, Any] | None:
    """Find the JSON plan in an LLM answer: fenced ```json blocks first, then balanced ``{...}`` in the prose.

    Prefers an object with a "steps" key; else returns the first JSON object found (so validation can say what
    is wrong with it); None when the answer holds no JSON object at all. Reasoning (``<think>...</think>``) is
    ignored: drafts there are not the answer."""
    if not text:
        return None
    text = strip_thinking(text)[:MAX_ANSWER_CHARS]
    candidates: list[dict[str, Any]] = []
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in ("", "json", "jsonc", "json5", "javascript", "js"):
            candidates.extend(_objects_in(match.group(2)))
    candidates.extend(_objects_in(text))
    for obj in candidates:
        if "steps" in obj:
            return obj
    return candidates[0] if candidates else None


def strip_thinking(text: str) -> str:
    """Drop reasoning blocks; Qwen-style templates may also leave a lone closing tag with the thinking before it."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def _objects_in(text: str) -> list[dict[str, Any]]:
    """JSON objects in ``text``: strict decoding at each '{' (fast, C); when that finds no plan-like object, also
    a lenient balanced-brace scan (a trailing comma breaks the outer object while its inner steps still parse)."""
    found = _decode_objects(text)
    if any("steps" in obj for obj in found):
        return found
    return found + _lenient_objects(text)


def _decode_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos, starts = 0, 0
    while starts < MAX_DECODE_STARTS and (pos := text.find("{", pos)) != -1:
        starts += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            pos += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end
    return found


def _lenient_objects(text: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    pos, starts = 0, 0
    while starts < MAX_LENIENT_STARTS and (pos := text.find("{", pos)) != -1:
        starts += 1
        end = _balanced_end(text, pos)
        obj = _loads_lenient(text[pos:end + 1]) if end is not None else None
        if isinstance(obj, dict):
            found.append(obj)
            pos = end + 1  # type: ignore[operator]
        else:
            pos += 1
    return found


def _balanced_end(text: str, start: int) -> int | None:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _loads_lenient(blob: str) -> Any:
    """Repairs the slips LLMs make most: trailing commas, and Python literals (single quotes, True/None)."""
    for attempt in (blob, _TRAILING_COMMA.sub(r"\1", blob)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, RecursionError):
            continue
    try:
        return ast.literal_eval(_TRAILING_COMMA.sub(r"\1", blob))
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None

