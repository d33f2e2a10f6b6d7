"""Laying sections out as model windows, and the intensity/loudness curves of sections.

Why windows: AudioLDM was trained on ~10 s clips; longer music is composed of windows of at most ``window_s`` that
overlap by ``overlap_s`` so the joiner (:mod:`grym_synth.compose.longform`) can crossfade them. A window renders
``core_s + overlap_s`` seconds (+ a small margin the joiner trims), except the last window of the piece, which has no
successor. The layout is pure arithmetic so that the plan records exactly which generate steps make the piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grym_synth.planning.plan import Window

# Extra seconds each window renders beyond what the joiner needs, so that rounding in the model's frame grid never
# leaves a window a few samples short (the joiner trims it).
RENDER_MARGIN_S = 0.05
# Section durations are kept to the millisecond; a plan's sum may differ from its duration_s by at most this much
# (the difference is given to the last section).
DURATION_TOLERANCE_S = 0.01


@dataclass(frozen=True)
class WindowSpec:
    """The model window and crossfade length used to lay sections out (server settings)."""

    window_s: float = 10.0
    overlap_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and 0 <= self.overlap_s and self.overlap_s + RENDER_MARGIN_S < self.window_s / 2):
            raise ValueError(f"window {self.window_s} s with overlap {self.overlap_s} s: the overlap must be "
                             "shorter than half the window")

    @property
    def max_core_s(self) -> float:
        """Longest part of the piece one window may own (its render adds the overlap and the margin)."""
        return self.window_s - self.overlap_s - RENDER_MARGIN_S


def window_ids(section_index: int, count: int) -> list[str]:
    return [f"s{section_index + 1}-w{k + 1}" for k in range(count)]


def layout(durations: list[float], spec: WindowSpec) -> list[tuple[Window, ...]]:
    """Windows of each section: ``ceil(duration / max_core)`` equal cores per section; every window but the piece's
    last renders its core plus the overlap (which lies under the start of the next window)."""
    sections: list[tuple[Window, ...]] = []
    for index, duration in enumerate(durations):
        count = max(1, math.ceil(duration / spec.max_core_s - 1e-9))
        core = duration / count
        last_section = index == len(durations) - 1
        windows = []
        for k, step_id in enumerate(window_ids(index, count)):
            last = last_section and k == count - 1
            render = core + (0.0 if last else spec.overlap_s) + RENDER_MARGIN_S
            windows.append(Window(step_id=step_id, core_s=core, render_s=round(render, 4)))
        sections.append(tuple(windows))
    return sections


def split_durations(total_s: float, weights: list[float]) -> list[float]:
    """``total_s`` split by ``weights`` into millisecond durations that add up to ``total_s`` exactly (the last
    takes the rounding)."""
    scale = total_s / sum(weights)
    parts = [round(w * scale, 3) for w in weights[:-1]]
    return [*parts, round(total_s - sum(parts), 6)]


def intensity_db(intensity: float) -> float:
    """Section level relative to the loudest: intensity 1 -> 0 dB, 0 -> -12 dB (the master normalises the piece)."""
    return -12.0 * (1.0 - min(max(intensity, 0.0), 1.0))


def curve_points(curve: str, intensity: float, previous: float | None) -> tuple[float, float, float]:
    """Level (dB) at the start, middle and end of a section for its curve; "rise" starts from the previous
    section's level (or well below its own), "fall" ends 12 dB down, "swell" peaks in the middle."""
    level = intensity_db(intensity)
    if curve == "rise":
        start = intensity_db(previous) if previous is not None and previous < intensity else level - 9.0
        return start, (start + level) / 2, level
    if curve == "fall":
        return level, level - 4.0, level - 12.0
    if curve == "swell":
        return level - 6.0, level, level - 6.0
    return level, level, level


def intensity_words(intensity: float) -> str:
    """Words that steer AudioLDM toward the section's intensity (its level is set by the curve as well)."""
    if intensity < 0.3:
        return "soft, sparse, quiet"
    if intensity < 0.55:
        return "gentle, moderate"
    if intensity < 0.8:
        return "full, energetic"
    return "intense, loud, powerful climax"
