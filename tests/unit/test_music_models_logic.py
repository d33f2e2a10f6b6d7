"""Pure logic of grym_synth.inference.music_models: input checks, note conversion, musicnn patching, names."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from grym_synth.inference.music_models import (
    MIDI_LOWEST, MUSIC_MODEL_NAMES, MUSICNN_FRAMES, REDETECTION_GAP_S, MusicModels, NoteEvent, _mono,
    backtrack_onsets, merge_redetections, musicnn_log_mel, musicnn_patch_pair, musicnn_patches, notes_from_events,
    refine_events, resample, tag_scores,
)


def test_mono_rejects_what_the_caller_must_fix() -> None:
    assert _mono([0.0, 0.5], 16_000).dtype == np.float32
    with pytest.raises(ValueError, match="positive"):
        _mono(np.zeros(4), -1)
    with pytest.raises(ValueError, match="mono"):
        _mono(np.zeros((2, 4)), 16_000)
    with pytest.raises(ValueError, match="NaN"):
        _mono(np.array([np.inf]), 16_000)


def test_resample_keeps_length_ratio_and_identity() -> None:
    audio = np.random.default_rng(0).standard_normal(22_050).astype(np.float32)
    assert resample(audio, 22_050, 22_050) is audio
    assert resample(audio, 22_050, 16_000).shape == (16_000,)
    assert resample(np.zeros(0, np.float32), 44_100, 16_000).size == 0


def test_notes_from_basic_pitch_events() -> None:
    events = [(1.0, 1.5, 64, 0.5, None), (0.0, 0.4, 60, 0.0001, [1, 2]), (0.0, 0.3, 55, 1.7, None)]
    notes = notes_from_events(events)
    assert notes == [NoteEvent(55, 0.0, 0.3, 127), NoteEvent(60, 0.0, 0.4, 1), NoteEvent(64, 1.0, 1.5, 64)]


def _times(n: int) -> np.ndarray:
    from basic_pitch.note_creation import model_frames_to_time

    return model_frames_to_time(n)


def test_backtracking_moves_a_slow_attack_to_where_it_began_to_rise() -> None:
    """A pitch whose activation ramps up over 6 frames before the detected onset (a bowed attack) starts where the
    ramp crossed 30 % of the peak; the end, pitch and amplitude stay; another pitch's activation is not looked at."""
    note = np.zeros((100, 88), np.float32)
    k = 64 - MIDI_LOWEST
    note[40:60, k] = 0.9
    note[34:40, k] = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8]  # rises from frame 34; above 0.27 from frame 36
    note[20:60, 60 - MIDI_LOWEST] = 0.9  # a held neighbour: irrelevant to pitch 64
    onset = np.zeros_like(note)
    onset[33:42, k] = [0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.5]  # a broad onset bump: above 0.27 from frame 34
    times = _times(100)
    (start, end, pitch, amp, bends), = backtrack_onsets([(float(times[40]), 1.0, 64, 0.6, None)],
                                                         {"note": note, "onset": onset})
    assert start == pytest.approx(float(times[36])) and (end, pitch, amp, bends) == (1.0, 64, 0.6, None)


def test_backtracking_stops_where_the_onset_posterior_is_still_flat() -> None:
    """A struck note (a harpsichord): the "note" posterior rises over 6 frames, but the onset posterior peaks
    sharply at frame 40 and is flat before frame 39, so the start moves back one frame, not four."""
    note = np.zeros((100, 88), np.float32)
    k = 64 - MIDI_LOWEST
    note[40:60, k] = 0.9
    note[34:40, k] = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8]
    onset = np.zeros_like(note)
    onset[38:42, k] = [0.05, 0.4, 0.95, 0.3]
    times = _times(100)
    (start, *_), = backtrack_onsets([(float(times[40]), 1.0, 64, 0.6)], {"note": note, "onset": onset})
    assert start == pytest.approx(float(times[39]))


def test_backtracking_stops_at_a_dip_and_never_moves_a_note_later() -> None:
    """A repeated note: the walk back stops where the previous note's decay turns into the new attack, so two
    onsets never merge; a flat or falling activation leaves the start where it was."""
    note = np.zeros((100, 88), np.float32)
    k = 60 - MIDI_LOWEST
    note[10:28, k] = 0.8
    note[28:30, k] = [0.5, 0.4]  # decay of the first note, then the second rises from the dip at frame 29
    note[30:33, k] = [0.6, 0.7, 0.8]
    note[33:50, k] = 0.9
    onset = np.full_like(note, 0.8)  # the onset posterior never stops the walk here
    times = _times(100)
    starts = [s for s, *_ in backtrack_onsets([(float(times[10]), 0.3, 60, 0.5), (float(times[32]), 0.6, 60, 0.5)],
                                              {"note": note, "onset": onset})]
    assert starts == [pytest.approx(float(times[10])), pytest.approx(float(times[29]))]
    empty = np.zeros((0, 88), np.float32)
    assert backtrack_onsets([(0.0, 0.1, 60, 0.5)], {"note": empty, "onset": empty}) == [(0.0, 0.1, 60, 0.5)]


def _held_note(frames: int = 200) -> tuple[dict[str, np.ndarray], int]:
    """Posteriors of pitch 60 held from frame 10 to 150 (one attack at frame 10), and its column."""
    note = np.zeros((frames, 88), np.float32)
    onset = np.zeros_like(note)
    k = 60 - MIDI_LOWEST
    note[10:150, k] = 0.8
    onset[10, k] = 0.9
    return {"note": note, "onset": onset}, k


def test_a_held_note_cut_by_a_weak_onset_is_one_note() -> None:
    """A drum hit under a held chord tone: basic-pitch ends the note at frame 60 and starts it again (onset 0.5,
    no rise of the note activation). Merged: one note from the first start to the last end, first amplitude kept;
    another pitch's note in between does not interrupt it."""
    output, k = _held_note()
    output["onset"][60, k] = 0.5
    times = _times(200)
    events = [(float(times[10]), float(times[60]), 60, 0.7, None), (float(times[60]), float(times[150]), 60, 0.4, None),
              (float(times[60]), float(times[90]), 67, 0.5, None)]
    assert merge_redetections(events, output) == [(float(times[10]), float(times[150]), 60, 0.7, None),
                                                   (float(times[60]), float(times[90]), 67, 0.5, None)]


def test_a_played_repetition_stays_two_notes() -> None:
    """A re-attack: the activation dips and rises again with a strong onset, so the two notes stay apart. Beside it:
    a strong onset without a rise of the activation is merged (a vibrato peak), and a weak onset more than
    REDETECTION_GAP_S after the previous note is a new note."""
    output, k = _held_note()
    output["note"][58:60, k] = 0.3
    output["onset"][60, k] = 0.9
    times = _times(200)
    first, second = (float(times[10]), float(times[58]), 60, 0.7), (float(times[60]), float(times[150]), 60, 0.6)
    assert merge_redetections([second, first], output) == [first, second]

    flat, _ = _held_note()
    flat["onset"][60, k] = 0.9
    assert merge_redetections([first, second], flat) == [(first[0], second[1], 60, 0.7)]

    late = (float(first[1]) + REDETECTION_GAP_S + 0.05, 3.0, 60, 0.5)
    assert merge_redetections([first, late], flat) == [first, late]
    assert refine_events([first], {"note": np.zeros((0, 88), np.float32), "onset": np.zeros((0, 88), np.float32)}
                         ) == [first]


def test_musicnn_patches_match_the_extractors_cut() -> None:
    rate = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * rate) / rate)).astype(np.float32)
    rep = musicnn_log_mel(tone)
    patches = musicnn_patches(tone)
    # musicnn.extractor.batch_data: range(0, frames - 187 + 1, 187)
    assert patches.shape == (len(range(0, rep.shape[0] - MUSICNN_FRAMES + 1, MUSICNN_FRAMES)), 187, 96)
    np.testing.assert_array_equal(patches[1], rep[187:374].astype(np.float32))
    short = musicnn_patches(tone[:rate])  # 1 s: repeat-padded to one patch
    assert short.shape == (1, 187, 96)
    np.testing.assert_array_equal(short[0, :63], short[0, 63:126])


def test_tag_scores_average_the_patches_and_both_taggers() -> None:
    """A tag one tagger is sure of and the other doubts lands between them; patches weigh equally."""
    musicnn = np.array([[0.9, 0.1], [0.7, 0.1]], np.float32)  # per patch: mean 0.8, 0.1
    vgg = np.array([[0.2, 0.3], [0.4, 0.5]], np.float32)      # mean 0.3, 0.4
    scores = tag_scores({"taggram": musicnn, "vgg_taggram": vgg, "timbre": np.zeros((2, 408), np.float32)})
    np.testing.assert_allclose(scores, [0.55, 0.25], atol=1e-6)
    assert scores.dtype == np.float32


def test_the_harmonic_part_keeps_a_tone_and_drops_clicks() -> None:
    """musicnn_patch_pair: the clip's patches are exactly musicnn_patches'; its harmonic part keeps a held tone
    (within 0.1 of log-mel) and loses most of a click track's energy, which is what lets the taggers hear the
    instrument under a drum kit."""
    rate = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(7 * rate) / rate)).astype(np.float32)
    clip, harmonic = musicnn_patch_pair(tone)
    np.testing.assert_array_equal(clip, musicnn_patches(tone))
    assert harmonic.shape == clip.shape
    band = slice(10, 90)  # the tone's mel rows and its neighbours
    assert float(np.abs(harmonic[:, 20:-20, band] - clip[:, 20:-20, band]).max()) < 0.1
    clicks = np.zeros(7 * rate, np.float32)
    clicks[::rate // 2] = 1.0
    clip, harmonic = musicnn_patch_pair(clicks)
    # log10(10000 x + 1): the harmonic part's mean mel power is under a tenth of the clip's
    power = lambda p: float(np.mean(10 ** p.astype(np.float64) - 1))  # noqa: E731
    assert power(harmonic) < 0.1 * power(clip)
    short, short_harmonic = musicnn_patch_pair(tone[: rate // 5])  # 0.2 s: still one repeat-padded patch each
    assert short.shape == short_harmonic.shape == (1, 187, 96)


def test_unknown_served_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown music models"):
        MusicModels(object(), served=["basic_pitch", "madmom"])  # type: ignore[arg-type]
    models = MusicModels(object(), served=["crepe"])  # type: ignore[arg-type]
    assert models.available() == {"crepe"}
    assert set(MusicModels(object()).available()) == set(MUSIC_MODEL_NAMES)  # type: ignore[arg-type]


def test_probe_keeps_the_ready_models() -> None:
    class Triton:
        async def model_ready(self, name: str) -> bool:
            return name != "musicnn"

    models = MusicModels(Triton())  # type: ignore[arg-type]
    assert asyncio.run(models.probe()) == {"basic_pitch", "crepe", "silero_vad"}
    assert models.available() == {"basic_pitch", "crepe", "silero_vad"}
