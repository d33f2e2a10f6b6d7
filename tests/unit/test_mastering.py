"""Mastering (loudness, true peak, fades) and the long-form joiner (placement, crossfades, level matching, section
finality, join measurement) on synthetic audio."""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest

from grym_synth.compose.longform import (PieceJoiner, equal_power, match_gain, measure_joins, place_windows)
from grym_synth.compose.mastering import (MasterSettings, fades, integrated_loudness, limit, master,
                                          predicted_gain_db, true_peak_db)
from grym_synth.compose.service import ProgressTracker, validate_duration
from grym_synth.core.errors import InvalidArgument
from grym_synth.planning.rules import RuleBasedPlanner

RATE = 16_000


def noise(seconds: float, level: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * level).astype(np.float32)


@pytest.mark.parametrize("level", [0.005, 0.05, 0.5])
def test_master_reaches_the_target_with_peaks_under_the_ceiling(level: float) -> None:
    x = noise(20, level)
    x[RATE * 5: RATE * 5 + 400] *= 8  # a transient the limiter has to catch
    y, report = master(x, RATE, MasterSettings())
    meter = pyloudnorm.Meter(RATE)
    assert meter.integrated_loudness(y.astype(np.float64)) == pytest.approx(-14.0, abs=0.2)
    assert true_peak_db(y, RATE) <= -1.0 + 1e-6
    assert report.true_peak_dbtp <= -1.0 + 1e-6 and report.loudness_lufs == pytest.approx(-14.0, abs=0.2)


def test_master_of_silence_and_of_very_short_audio() -> None:
    y, report = master(np.zeros(RATE), RATE, MasterSettings())
    assert not np.any(y) and report.gain_db == 0.0 and math.isinf(report.loudness_lufs)
    y, report = master(noise(0.5, 0.1), RATE, MasterSettings(target_lufs=-20))
    assert report.loudness_lufs == pytest.approx(-20.0, abs=0.5)
    assert math.isinf(integrated_loudness(np.ones(10), RATE))


def test_limiter_leaves_quiet_audio_alone() -> None:
    x = noise(2, 0.01)
    assert np.array_equal(limit(x, RATE, -1.0), x)
    assert len(limit(np.zeros(0), RATE, -1.0)) == 0 and math.isinf(true_peak_db(np.zeros(0)))


def test_fades_shape_the_ends() -> None:
    env = fades(RATE * 10, RATE, MasterSettings(fade_in_s=0.1, fade_out_s=2.0))
    assert env[0] == 0.0 and env[-1] == 0.0 and env[RATE * 5] == 1.0
    assert env[int(RATE * 8.5)] < 1.0 and env[int(RATE * 7.9)] == 1.0
    short = fades(RATE // 2, RATE, MasterSettings())
    assert short[RATE // 4] == 1.0, "fades take at most a quarter of a short piece each"


def test_equal_power_crossfade_keeps_power_for_uncorrelated_signals() -> None:
    a, b = noise(1, 0.1, 1).astype(np.float64), noise(1, 0.1, 2).astype(np.float64)
    mixed = equal_power(a, b)
    assert np.sqrt(np.mean(mixed**2)) == pytest.approx(0.1, rel=0.05)
    assert match_gain(a, b * 1.5) == pytest.approx(1 / 1.5, rel=0.05)
    assert match_gain(a, b * 100) == pytest.approx(10 ** (-6 / 20)), "clamped to 6 dB"
    assert match_gain(np.zeros(10), b[:10]) == 1.0


def windows_of(plan):  # type: ignore[no-untyped-def]
    return [s for s in plan.steps if s.type == "generate"]


def test_joiner_makes_the_exact_length_and_finalises_sections_in_order() -> None:
    plan = RuleBasedPlanner().plan("90 second ambient piece, rain, slow build", [])
    joiner = PieceJoiner(plan, RATE)
    gens = windows_of(plan)
    finals: list[int] = []
    # Out of order: nothing is final until the first windows are in.
    for i, step in reversed(list(enumerate(gens))):
        got = joiner.add(step.id, noise(step.params["duration_s"] - 0.01, 0.1 * (1 + i % 3), i))
        finals += got
    assert finals == [0, 1, 2, 3]
    piece = joiner.piece()
    assert len(piece) == round(90 * RATE)
    assert len(joiner.join_positions) == len(gens) - 1
    assert np.concatenate([joiner.section_audio(i) for i in range(4)]).shape == piece.shape
    stats = measure_joins(piece, RATE, joiner.join_positions, int(plan.overlap_s * RATE))
    assert stats.joins == len(gens) - 1
    # Windows at different levels (x1, x2, x3) are matched at the joins: no bigger loudness step than inside.
    assert stats.join_loudness_step_lu < stats.inside_loudness_step_lu + 1.5


def test_joiner_reports_sections_as_they_become_final() -> None:
    plan = RuleBasedPlanner().plan("intro, verse, outro of folk", [], duration_s=40)
    joiner = PieceJoiner(plan, RATE)
    seen = []
    for step in windows_of(plan):
        seen.append(joiner.add(step.id, noise(step.params["duration_s"], 0.1)))
        if seen[-1]:
            assert joiner.final_sections == seen[-1][-1] + 1
            assert len(joiner.audio_so_far()) == joiner.bounds[joiner.final_sections]
    assert [s for got in seen for s in got] == [0, 1, 2]
    with pytest.raises(ValueError):
        PieceJoiner(plan, RATE).section_audio(0)
    with pytest.raises(ValueError):
        PieceJoiner(plan, RATE).piece()


def test_level_envelope_follows_the_plan() -> None:
    plan = RuleBasedPlanner().plan("90 second ambient piece, slow build, fade out", [])
    joiner = PieceJoiner(plan, RATE, MasterSettings(fade_out_s=0.0, fade_in_s=0.0))
    for step in windows_of(plan):
        joiner.add(step.id, noise(step.params["duration_s"], 0.1, 3))
    piece = joiner.piece()
    b = joiner.bounds
    loud = [integrated_loudness(piece[b[i]:b[i + 1]], RATE) for i in range(4)]
    assert loud[2] > loud[0] + 3, "the climax is louder than the intro"
    assert joiner.planned_db() > joiner.planned_db(b[1])


def test_provisional_gain_predicts_the_final_gain_on_steady_material() -> None:
    plan = RuleBasedPlanner().plan("60 second ambient piece, slow build", [])
    joiner = PieceJoiner(plan, RATE)
    for step in windows_of(plan):
        joiner.add(step.id, noise(step.params["duration_s"], 0.1, 4))
    settings = MasterSettings()
    first = joiner.bounds[1]
    provisional = predicted_gain_db(joiner.section_audio(0), RATE, joiner.planned_db(first), joiner.planned_db(),
                                    settings)
    final = master(joiner.piece(), RATE, settings)[1].gain_db
    assert provisional == pytest.approx(final, abs=1.5)
    assert predicted_gain_db(np.zeros(RATE), RATE, 0, 0, settings) == 0.0


def test_place_windows_rounds_once() -> None:
    plan = RuleBasedPlanner().plan("ambient", [], duration_s=33.3333)
    placed, bounds = place_windows(plan, RATE)
    assert bounds[-1] == round(33.3333 * RATE)
    assert sum(w.core for w in placed) == bounds[-1] and placed[-1].tail == 0


def test_progress_counts_steps_joins_and_master() -> None:
    plan = RuleBasedPlanner().plan("30 seconds of piano, 4 steps", [])
    tracker = ProgressTracker(plan)
    windows = list(tracker.totals)
    assert tracker.total == 4 * len(windows) + len(windows) - 1 + 1
    assert tracker.step(windows[0], 2) and not tracker.step(windows[0], 1) and not tracker.step("other", 3)
    tracker.t0 -= 10.0  # as if 10 s had passed: 2 units in 10 s, so the rest takes 5 s a unit
    event = tracker.event()
    assert event.done == 2 and event.total == tracker.total
    assert event.eta_s == pytest.approx(5.0 * (tracker.total - 2), rel=0.01)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 0.2, 601.0, 1e9])
def test_hostile_durations_are_refused(bad: float) -> None:
    with pytest.raises(InvalidArgument, match="duration_seconds must be 0.5 to 600"):
        validate_duration(bad)
    assert validate_duration(0.0) is None and validate_duration(600.0) == 600.0
