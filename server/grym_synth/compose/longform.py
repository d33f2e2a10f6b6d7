"""Long-form rendering: the windows of a sectioned plan joined into one piece, section by section, as they finish.

A plan's sections are laid out as model windows (:mod:`grym_synth.planning.sections`); every window's generate step
runs concurrently (they share the Generate concurrency budget, and their UNet steps batch in Triton). This module
places finished windows on the piece's timeline *in order*:

* window k+1 starts where window k's own part (its core) ends; window k rendered ``overlap`` more seconds, which lie
  under the start of window k+1 and are joined by an **equal-power crossfade** (cos/sin gains, constant power for
  uncorrelated material);
* before the crossfade the incoming window is **loudness matched**: its gain at the join makes the RMS of its head
  equal to that of the outgoing tail (clamped to +-6 dB), and eases back to its own level over its core, so the
  section's planned dynamics stay;
* the section intensity/loudness curve (:func:`level_envelope`) and the piece's fades are applied on top;
* a section is final as soon as its last window is placed (its tail belongs to the next section's first join).

The joiner is a strategy (:class:`Crossfade`): a latent continuation (Generate mode CONTINUE, where available) would
render window k+1's head *from* window k's tail and could then join with a short crossfade through the same
interface; the crossfade works alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from grym_synth.compose.mastering import MasterSettings, fades, short_term_loudness
from grym_synth.planning.plan import Plan, Section
from grym_synth.planning.sections import curve_points

MAX_MATCH_DB = 6.0
MIN_RMS = 1e-6


@dataclass(frozen=True)
class PlacedWindow:
    """Where a window's audio goes: its core starts at ``start`` (samples) and lasts ``core``; ``overlap`` samples
    of it are crossfaded with the previous window's tail (0 for the first window)."""

    step_id: str
    section: int
    start: int
    core: int
    tail: int  # samples rendered beyond the core (crossfaded into the next window; 0 for the last)


def place_windows(plan: Plan, rate: int) -> tuple[list[PlacedWindow], list[int]]:
    """Sample positions of every window and the section boundaries (``len(sections) + 1`` sample indices). Section
    boundaries are rounded once from the cumulative durations, so the piece is exactly ``round(duration * rate)``
    samples long however many sections it has."""
    bounds = [0]
    total = 0.0
    for section in plan.sections:
        total += section.duration_s
        bounds.append(int(round(total * rate)))
    overlap = int(round(plan.overlap_s * rate))
    placed: list[PlacedWindow] = []
    for index, section in enumerate(plan.sections):
        edges = np.linspace(bounds[index], bounds[index + 1], len(section.windows) + 1).round().astype(int)
        for k, window in enumerate(section.windows):
            last = index == len(plan.sections) - 1 and k == len(section.windows) - 1
            placed.append(PlacedWindow(window.step_id, index, int(edges[k]), int(edges[k + 1] - edges[k]),
                                       0 if last else overlap))
    return placed, bounds


class Crossfade(Protocol):
    """How the head of a window is joined to the previous window's tail (same length, both at their gains)."""

    def __call__(self, tail: np.ndarray, head: np.ndarray) -> np.ndarray: ...


def equal_power(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Equal-power crossfade: cos/sin gains keep the summed power constant for uncorrelated signals."""
    n = len(head)
    t = (np.arange(n) + 0.5) / n * (math.pi / 2)
    return tail * np.cos(t) + head * np.sin(t)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def match_gain(tail: np.ndarray, head: np.ndarray) -> float:
    """Linear gain that gives ``head`` the RMS of ``tail`` (clamped to +-MAX_MATCH_DB; 1 for silence)."""
    a, b = rms(tail), rms(head)
    if a < MIN_RMS or b < MIN_RMS:
        return 1.0
    limit = 10 ** (MAX_MATCH_DB / 20)
    return float(min(max(a / b, 1 / limit), limit))


def level_envelope(sections: Sequence[Section], bounds: Sequence[int],
                   rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Control points (sample positions, dB) of the planned level: each section's curve at its start, middle and
    end, the start/end points set in from the boundary by up to a second so level changes between sections ramp
    instead of jumping. ``np.interp`` over them gives the level of every sample."""
    xs: list[float] = []
    ys: list[float] = []
    previous: float | None = None
    for i, section in enumerate(sections):
        a, b = bounds[i], bounds[i + 1]
        ramp = min((b - a) / 4, float(rate))
        start, mid, end = curve_points(section.curve, section.intensity, previous)
        xs += [a + ramp, (a + b) / 2, b - ramp]
        ys += [start, mid, end]
        previous = section.intensity
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def energy_db(levels_db: np.ndarray) -> float:
    """Energy mean of a level envelope in dB (what a loudness meter would see of it on steady material)."""
    if not len(levels_db):
        return 0.0
    return float(10 * np.log10(np.mean(10 ** (levels_db / 10))))


@dataclass
class PieceJoiner:
    """Collects window audio as windows finish (in any order) and places them on the timeline in order.

    ``add`` returns the indices of sections that became final; ``section_audio``/``piece`` give the joined audio
    with the level envelope and fades applied (before the master's gain and limiter)."""

    plan: Plan
    rate: int
    master: MasterSettings = field(default_factory=MasterSettings)
    crossfade: Crossfade = equal_power

    def __post_init__(self) -> None:
        self.windows, self.bounds = place_windows(self.plan, self.rate)
        self.length = self.bounds[-1]
        self.out = np.zeros(self.length, dtype=np.float32)
        self._pending: dict[str, np.ndarray] = {}
        self._next = 0
        self._tail: np.ndarray | None = None
        self._final_sections = 0
        self.join_positions: list[int] = []  # sample index where each crossfade starts
        xs, ys = level_envelope(self.plan.sections, self.bounds, self.rate)
        self._env_x, self._env_y = xs, ys
        self._fades = fades(self.length, self.rate, self.master)

    @property
    def placed(self) -> int:
        return self._next

    @property
    def final_sections(self) -> int:
        return self._final_sections

    def add(self, step_id: str, audio: np.ndarray) -> list[int]:
        self._pending[step_id] = np.asarray(audio, dtype=np.float32).reshape(-1)
        newly: list[int] = []
        while self._next < len(self.windows) and self.windows[self._next].step_id in self._pending:
            self._place(self.windows[self._next], self._pending.pop(self.windows[self._next].step_id))
            self._next += 1
            section = self.windows[self._next - 1].section
            if self._next == len(self.windows) or self.windows[self._next].section != section:
                self._final_sections = section + 1
                newly.append(section)
        return newly

    def _place(self, w: PlacedWindow, audio: np.ndarray) -> None:
        need = w.core + w.tail
        if len(audio) < need:  # the model's frame grid may fall a few samples short: hold the last value
            audio = np.pad(audio, (0, need - len(audio)), mode="edge" if len(audio) else "constant")
        audio = audio[:need].astype(np.float64)
        overlap = 0 if self._tail is None else min(len(self._tail), w.core)
        if overlap:
            gain = match_gain(self._tail[:overlap], audio[:overlap])
            # Ease from the matched gain back to the window's own level over its core.
            ease = np.interp(np.arange(need), [0, overlap, max(overlap + 1, w.core)],
                             [gain, gain, 1.0])
            audio = audio * ease
            audio[:overlap] = self.crossfade(self._tail[:overlap], audio[:overlap])
            self.join_positions.append(w.start)
        self.out[w.start: w.start + w.core] = audio[: w.core]
        self._tail = audio[w.core: w.core + w.tail] if w.tail else None

    def levels_db(self, start: int, end: int) -> np.ndarray:
        return np.interp(np.arange(start, end), self._env_x, self._env_y)

    def _shaped(self, start: int, end: int) -> np.ndarray:
        gain = 10 ** (self.levels_db(start, end) / 20) * self._fades[start:end]
        return (self.out[start:end] * gain).astype(np.float32)

    def section_audio(self, index: int) -> np.ndarray:
        if index >= self._final_sections:
            raise ValueError(f"section {index} is not final yet")
        return self._shaped(self.bounds[index], self.bounds[index + 1])

    def audio_so_far(self) -> np.ndarray:
        return self._shaped(0, self.bounds[self._final_sections])

    def piece(self) -> np.ndarray:
        if self._next < len(self.windows):
            raise ValueError(f"only {self._next} of {len(self.windows)} windows are in")
        return self._shaped(0, self.length)

    def planned_db(self, end: int | None = None) -> float:
        """Energy mean of the planned level (with fades) over [0, end) — for the provisional master gain."""
        end = self.length if end is None else end
        step = max(1, end // 20_000)
        idx = np.arange(0, end, step)
        if not len(idx):
            return 0.0
        fade_db = 20 * np.log10(np.maximum(self._fades[idx], 1e-6))
        return energy_db(np.interp(idx, self._env_x, self._env_y) + fade_db)


# --- measuring joins --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JoinStats:
    """Discontinuity at joins versus inside sections: the largest sample-to-sample jump within +-5 ms and the
    step in short-term (400 ms) loudness across the point, at every join and at as many points inside windows."""

    join_jump: float
    inside_jump: float
    join_loudness_step_lu: float
    inside_loudness_step_lu: float
    joins: int


def _jump(x: np.ndarray, at: int, rate: int) -> float:
    half = max(1, int(0.005 * rate))
    seg = x[max(0, at - half): at + half]
    return float(np.max(np.abs(np.diff(seg)))) if len(seg) > 1 else 0.0


def _loudness_step(x: np.ndarray, at: int, rate: int) -> float:
    n = int(0.4 * rate)
    before = short_term_loudness(x, rate, at - n)
    after = short_term_loudness(x, rate, at)
    if not (math.isfinite(before) and math.isfinite(after)):
        return 0.0
    return abs(after - before)


def measure_joins(piece: np.ndarray, rate: int, joins: Sequence[int], overlap: int) -> JoinStats:
    """Compare each join (the middle of its crossfade) with a point in the middle of the window that follows it:
    a seamless join is no worse than the music inside a window."""
    x = np.asarray(piece, dtype=np.float64)
    n = int(0.4 * rate)
    points = [j + overlap // 2 for j in joins if n <= j + overlap // 2 <= len(x) - n]
    inside = []
    for i, j in enumerate(joins):
        nxt = joins[i + 1] if i + 1 < len(joins) else len(x)
        mid = (j + overlap + nxt) // 2
        if n <= mid <= len(x) - n:
            inside.append(mid)
    mean = (lambda v: float(np.mean(v)) if v else 0.0)
    return JoinStats(
        join_jump=mean([_jump(x, p, rate) for p in points]),
        inside_jump=mean([_jump(x, p, rate) for p in inside]),
        join_loudness_step_lu=mean([_loudness_step(x, p, rate) for p in points]),
        inside_loudness_step_lu=mean([_loudness_step(x, p, rate) for p in inside]),
        joins=len(points),
    )
