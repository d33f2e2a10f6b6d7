"""Reasoning vs answer: splits a stream of raw text deltas at the ``<think>...</think>`` block."""

from __future__ import annotations

from typing import Literal

from grym_synth.coordinator.base import Kind

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ThinkSplitter:
    """Splits raw text deltas into ("thinking" | "answer", text) pieces, removing the ``<think>`` tags.

    Tags may arrive split across deltas (``"<thi"`` + ``"nk>"``): a suffix that could still become a tag is held
    back until the next delta decides it. ``start_in_thinking``:
      * True  — the prompt already opened the think block (DeepSeek's ``...<｜Assistant｜><think>\\n``), so text is
        reasoning until ``</think>``; this is the case for the Triton coordinator.
      * False — text is answer unless it *begins* with ``<think>``.
      * None (auto) — like False, but leading whitespace is held until the first visible character shows whether
        a think block opens the response.
    Only one think block is recognised, at the start (that is how R1 models reason); later tags are literal text.
    A stray ``</think>`` before any answer text has been closed out is dropped (a server whose template prefilled
    ``<think>`` without a reasoning parser) — pass ``start_in_thinking=True`` for such servers to label it right.
    """

    def __init__(self, start_in_thinking: bool | None = None) -> None:
        self._mode: Literal["undecided", "thinking", "answer"]
        if start_in_thinking is None:
            self._mode = "undecided"
        else:
            self._mode = "thinking" if start_in_thinking else "answer"
        self._closed = False  # a </think> has been consumed (or a think block can no longer appear)
        self._buf = ""

    @property
    def in_thinking(self) -> bool:
        return self._mode == "thinking"

    def feed(self, delta: str) -> list[tuple[Kind, str]]:
        self._buf += delta
        out: list[tuple[Kind, str]] = []
        while self._buf:
            if self._mode == "undecided":
                if not self._decide():
                    break
            elif self._mode == "thinking":
                if not self._scan(THINK_CLOSE, "thinking", out, next_mode="answer"):
                    break
            elif not self._closed:
                if not self._scan(THINK_CLOSE, "answer", out, next_mode="answer"):
                    break
            else:
                out.append(("answer", self._buf))
                self._buf = ""
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[Kind, str]]:
        """End of stream: whatever is held is literal text of the current kind."""
        held, self._buf = self._buf, ""
        kind: Kind = "thinking" if self._mode == "thinking" else "answer"
        return [(kind, held)] if held else []

    def _decide(self) -> bool:
        stripped = self._buf.lstrip()
        if not stripped or (len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped)):
            return False  # still ambiguous: wait for more text
        if stripped.startswith(THINK_OPEN):
            self._mode = "thinking"
            self._buf = stripped[len(THINK_OPEN) :]
        else:
            self._mode = "answer"
        return True

    def _scan(self, tag: str, kind: Kind, out: list[tuple[Kind, str]], next_mode: str) -> bool:
        """Emit text up to ``tag`` (consuming it and switching mode) or up to a possible partial tag.
        Returns True when the mode changed and the remaining buffer needs another pass."""
        at = self._buf.find(tag)
        if at >= 0:
            out.append((kind, self._buf[:at]))
            self._buf = self._buf[at + len(tag) :]
            self._mode = next_mode  # type: ignore[assignment]
            self._closed = True
            return True
        keep = _partial_suffix(self._buf, tag)
        out.append((kind, self._buf[: len(self._buf) - keep]))
        self._buf = self._buf[len(self._buf) - keep :]
        return False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
