"""Pure logic of the music description: key profiles, tempo confidence, window merging, filters, text-to-tag mapping,
captions, and the analyser's gating (fake models stand in for Triton here only; the served path is tested in
tests/integration/test_music_analysis.py)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from grym_synth.analysis import music as M
from grym_synth.analysis.describe import DescriptorCaptioner, Describer, caption_text
from grym_synth.api import convert
from grym_synth.api.v1 import common_pb2
from grym_synth.core.errors import InvalidArgument
from grym_synth.inference.music_models import BASIC_PITCH, MUSICNN, SILERO_VAD, NoteEvent, Tagging
from grym_synth.memory.music_index import (MusicFields, MusicQuery, descriptors_only, is_music_collection,
                                           normalise_key, text_rank, text_score, text_to_tags)

SR = 16_000


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("tonic", range(12))
def test_key_of_a_rotated_profile_is_that_key(tonic: int, mode: int) -> None:
    chroma = np.roll(M.KRUMHANSL[mode], tonic)
    key, conf = M.estimate_key(chroma)
    assert key == M.key_name(tonic, M.MODES[mode]) and conf > 0.8


def test_no_key_for_flat_missing_or_broken_chroma() -> None:
    assert M.estimate_key(None) == ("", 0.0)
    assert M.estimate_key(np.ones(12)) == ("", 0.0)
    assert M.estimate_key(np.zeros(12)) == ("", 0.0)
    assert M.estimate_key(np.full(12, np.nan)) == ("", 0.0)


def test_tempo_confidence_is_high_for_a_pulse_and_low_for_noise() -> None:
    env = np.zeros(2000)
    lag = 60 * SR / (M.HOP * 120)
    env[(np.arange(0, 2000, lag)).astype(int)] = 1.0
    assert M.periodicity(env, 120.0, SR) > 0.5
    rng = np.random.default_rng(0)
    assert M.periodicity(rng.random(2000), 120.0, SR) < 0.15
    assert M.periodicity(env, 0.0, SR) == 0.0 and M.periodicity(np.zeros(5), 120.0, SR) == 0.0
    assert M.periodicity(np.ones(100), 120.0, SR) == 0.0


def test_tempo_of_a_click_track_and_unknown_tempo_for_silence_and_short_clips() -> None:
    y = np.zeros(8 * SR, np.float32)
    for start in range(0, len(y) - 400, int(SR * 60 / 100)):
        y[start:start + 400] += np.sin(2 * np.pi * 1000 * np.arange(400) / SR).astype(np.float32) * np.hanning(400)
    bpm, conf, beats = M.estimate_tempo(y, SR)
    assert abs(bpm / 100 - 1) <= 0.04 and conf > 0.5 and len(beats) >= 8
    assert M.estimate_tempo(np.zeros(8 * SR, np.float32), SR) == (0.0, 0.0, [])
    assert M.estimate_tempo(y[: SR], SR) == (0.0, 0.0, [])
    assert list(M._halve_gaps(np.array([0.0, 1.0, 2.0]))) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert list(M._halve_gaps(np.array([1.0]))) == [1.0]


def _clicks(bpm: float, seconds: int = 12) -> np.ndarray:
    y = np.zeros(seconds * SR, np.float32)
    for start in np.arange(0, len(y) - 400, SR * 60 / bpm).astype(int):
        y[start:start + 400] += np.sin(2 * np.pi * 1000 * np.arange(400) / SR).astype(np.float32) * np.hanning(400)
    return y


@pytest.mark.parametrize("bpm", [63.0, 97.0, 146.0, 173.0])
def test_tempo_between_whole_frame_lags_is_read_to_a_fraction_of_a_percent(bpm: float) -> None:
    """These beat periods fall between two 16 ms frames (146 BPM: 25.7 frames); the tracker alone reads them 0.8 to
    1.2 % off, the refined autocorrelation peak within 0.3 %."""
    est, conf, _ = M.estimate_tempo(_clicks(bpm), SR)
    assert abs(est / bpm - 1) < 0.003 and conf > 0.5


def _tone(freq: float, n: int, decay_s: float) -> np.ndarray:
    t = np.arange(n) / SR
    return (np.sin(2 * np.pi * freq * t) * np.exp(-t / decay_s)).astype(np.float32)


def _rhythm(bpm: float, beats: tuple[float, ...], kick: bool, seconds: int = 12) -> np.ndarray:
    """A melody of decaying tones (above 600 Hz) whose durations cycle through ``beats`` (in beats), with a 60 Hz
    kick on every beat when ``kick``."""
    y = np.zeros(seconds * SR, np.float32)
    beat = 60 / bpm
    if kick:
        for start in (np.arange(0, seconds - 0.3, beat) * SR).astype(int):
            y[start:start + 4000] += 0.8 * _tone(60, 4000, 0.08)
    pos, i = 0.0, 0
    while pos < seconds - 0.3:
        start = int(pos * SR)
        y[start:start + 3000] += 0.5 * _tone(660 * 2 ** ((i * 5 % 12) / 12), 3000, 0.05)
        pos += beat * beats[i % len(beats)]
        i += 1
    return y


def test_a_slow_beat_under_eighth_notes_is_not_doubled() -> None:
    """72 BPM: a kick on every beat under eighths and quarters. The full-band pulse at 144 is nearly as periodic
    (this used to read 144); the low band pulses at 72 only, so the tempo stays. A kick on every beat at 160
    tracked at 80 pulses at 160 too: the low band does not veto that doubling; without a low band it never does."""
    slow = _rhythm(72, (0.5, 0.5, 0.5, 0.5, 1.0, 1.0), kick=True)
    bpm, conf, beats = M.estimate_tempo(slow, SR)
    assert abs(bpm / 72 - 1) < 0.01 and conf > 0.5
    assert abs(60 / np.median(np.diff(beats)) / 72 - 1) < 0.05
    assert M.low_band_keeps_tempo(slow, SR, 72)
    assert not M.low_band_keeps_tempo(_rhythm(160, (1.0,), kick=True), SR, 80)
    assert not M.low_band_keeps_tempo(_rhythm(72, (0.5,), kick=False), SR, 72)


def test_a_dotted_rhythm_at_a_fast_tempo_is_not_read_at_two_thirds() -> None:
    """165 BPM, dotted quarter, eighth, quarter, quarter: the tracker's prior reads the dotted-quarter pulse (110);
    the pulse at 3/2 of it is as periodic, so the tempo is 165, and the beats follow it."""
    bpm, conf, beats = M.estimate_tempo(_rhythm(165, (1.5, 0.5, 1.0, 1.0), kick=False), SR)
    assert abs(bpm / 165 - 1) < 0.01 and conf > 0.15
    assert abs(60 / np.median(np.diff(beats)) / 165 - 1) < 0.05


def test_tempo_refinement_keeps_the_tempo_where_there_is_no_peak() -> None:
    assert M.refine_tempo(np.ones(500), 120.0, SR) == 120.0  # flat envelope
    assert M.refine_tempo(np.random.default_rng(0).random(500), 0.0, SR) == 0.0
    ramp = np.arange(500, dtype=np.float64)  # autocorrelation falls with the lag: no peak near the beat
    assert M.refine_tempo(ramp, 120.0, SR) == 120.0
    assert M.refine_tempo(np.random.default_rng(0).random(20), 60.0, SR) == 60.0  # lag beyond the envelope


def test_blend_tags_lets_the_harmonic_part_weigh_on_pitched_instruments_only() -> None:
    """Pitched-instrument tags mix in the harmonic part's score; "drums", "beat", a genre and a mood keep the
    clip's; a tagging without harmonic scores is the clip's as it is."""
    labels = ("guitar", "violin", "drums", "beat", "rock", "slow")
    clip = np.array([0.2, 0.1, 0.6, 0.5, 0.4, 0.3], np.float32)
    harmonic = np.array([0.8, 0.5, 0.05, 0.05, 0.1, 0.9], np.float32)
    w = M.HARMONIC_TAG_WEIGHT
    blended = M.blend_tags(Tagging(labels, clip, np.ones(4, np.float32), harmonic))
    assert blended["guitar"] == pytest.approx((1 - w) * 0.2 + w * 0.8)
    assert blended["violin"] == pytest.approx((1 - w) * 0.1 + w * 0.5)
    assert [blended[k] for k in ("drums", "beat", "rock", "slow")] == pytest.approx([0.6, 0.5, 0.4, 0.3])
    assert M.blend_tags(Tagging(labels, clip, np.ones(4, np.float32))) == pytest.approx(dict(zip(labels, clip)))


def _desc(**kw) -> M.MusicDescription:  # type: ignore[no-untyped-def]
    return M.MusicDescription(**kw)


def test_merge_shifts_times_weights_tempo_and_sums_chroma() -> None:
    a = _desc(tempo_bpm=100.0, tempo_confidence=0.9, duration_s=10.0, chroma=np.roll(M.KRUMHANSL[1], 9),
              notes=[M.Note(60, 1.0, 1.5, 90)], beats_s=[0.5], vocal_segments=[(9.0, 10.0)],
              tag_scores={"guitar": 0.8, "piano": 0.2}, embedding=np.ones(4, np.float32), models="librosa, musicnn")
    b = _desc(tempo_bpm=50.0, tempo_confidence=0.1, duration_s=5.0, chroma=np.roll(M.KRUMHANSL[1], 9),
              notes=[M.Note(62, 0.5, 1.0, 80)], beats_s=[0.2], vocal_segments=[(0.0, 1.0)],
              tag_scores={"guitar": 0.2, "piano": 0.8}, embedding=np.zeros(4, np.float32), models="librosa")
    m = M.merge([(0.0, a), (10.0, b)])
    assert m.tempo_bpm == 100.0 and m.key == "A minor" and m.duration_s == 15.0
    assert [(n.pitch, n.start_s) for n in m.notes] == [(60, 1.0), (62, 10.5)]
    assert m.beats_s == [0.5, 10.2] and m.vocal_segments == [(9.0, 11.0)]
    assert m.tags[0].label == "guitar" and m.tags[0].score == pytest.approx((0.8 * 10 + 0.2 * 5) / 15, abs=1e-4)
    assert m.embedding is not None and m.embedding[0] == pytest.approx(10 / 15)
    assert m.models == "librosa, musicnn"
    assert M.merge([]).tempo_bpm == 0.0
    assert M.merge([(0.0, a)]) is a


def test_tag_categories_cover_the_mtt_vocabulary_once() -> None:
    from musicnn.configuration import MTT_LABELS

    assert set(MTT_LABELS) == set(M.TAG_CATEGORIES)
    assert M.category("guitar") == M.Category.INSTRUMENT and M.category("rock") == M.Category.GENRE
    assert M.category("slow") == M.Category.MOOD and M.category("unheard-of") == M.Category.OTHER


@pytest.mark.parametrize("text,key", [("a minor", "A minor"), ("Bb major", "A# major"), ("F#m", "F# minor"),
                                      (" c ", "C major"), ("Db min", "C# minor"), ("E# major", "F major"),
                                      ("G♭ major", "F# major")])
def test_keys_are_normalised(text: str, key: str) -> None:
    assert normalise_key(text) == key


@pytest.mark.parametrize("text", ["H major", "A dorian", "", "x" * 40, 'A minor" or "', "\x00"])
def test_bad_keys_are_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        normalise_key(text)


def test_music_query_validates_and_quotes() -> None:
    q = MusicQuery.parse(90, 120, "a minor", ["Guitar", 'x"y', "guitar"])
    assert q.tags == ("guitar", 'x"y')
    assert q.expr() == ('tempo_bpm > 0 and tempo_bpm >= 90.0 and tempo_bpm <= 120.0 and key == "A minor" and '
                        'array_contains(music_tags, "guitar") and array_contains(music_tags, "x\\"y")')
    assert not MusicQuery.parse(0, 0, "", []) and MusicQuery.parse(0, 0, "", []).expr() == ""
    for bad in [(math.nan, 0, "", []), (0, math.inf, "", []), (-1, 0, "", []), (130, 120, "", []),
                (0, 0, "", ["a\x00"]), (0, 0, "", ["x" * 65]), (0, 0, "", [" "]), (0, 0, "", ["a"] * 17)]:
        with pytest.raises(InvalidArgument):
            MusicQuery.parse(*bad)


def test_text_maps_onto_the_vocabulary() -> None:
    vocab = list(M.TAG_CATEGORIES)
    assert text_to_tags("dark guitar with drums", vocab) == ["slow", "quiet", "guitar", "drums"]
    assert text_to_tags("Calm PIANO, no vocals!", vocab) == ["no vocals", "quiet", "soft", "piano"]
    assert text_to_tags("new age synthesizer", vocab) == ["new age", "synth"]
    for bad in ["", "   ", "qwzx", "x" * 1001]:
        with pytest.raises(InvalidArgument):
            text_to_tags(bad, vocab)


def test_text_rank_puts_patterns_holding_more_of_the_labels_first() -> None:
    """A solo guitar with one strong tag scores higher on the mean than a guitar with drums, yet the query names
    both: the piece holding both ranks first; among equal counts the mean decides."""
    solo = MusicFields(tags=[("guitar", 0.68, 1), ("slow", 0.29, 3)], tag_scores={"guitar": 0.68, "drums": 0.01})
    both = MusicFields(tags=[("guitar", 0.5, 1), ("slow", 0.3, 3), ("drums", 0.17, 1)],
                       tag_scores={"guitar": 0.5, "drums": 0.17})
    labels = ["guitar", "drums"]
    assert text_score(solo, labels) > text_score(both, labels)
    assert text_rank(both, labels) > text_rank(solo, labels)
    assert text_rank(solo, labels) == (1, pytest.approx(0.345))
    assert text_rank(solo, ["guitar"]) > text_rank(both, ["guitar"])  # both hold "guitar": the higher score first
    # only the stored top tags count (what the filter matched), and a label named twice counts once
    sixth = MusicFields(tags=[(f"t{i}", 0.5, 4) for i in range(5)] + [("drums", 0.4, 1)])
    assert text_rank(sixth, ["drums", "drums"])[0] == 0


def test_text_score_and_stored_fields_round_trip() -> None:
    f = MusicFields(tempo_bpm=120, key="A minor", tags=[("guitar", 0.9, 1), ("rock", 0.5, 2)],
                    embedding=[0.5, 0.5], tag_scores={"guitar": 0.9, "rock": 0.5, "piano": 0.1})
    assert text_score(f, ["guitar", "piano"]) == pytest.approx(0.5)
    row = f.row("id-1", 2)
    assert row["music_tags"] == ["guitar", "rock"] and row["has_embedding"]
    back = MusicFields.from_row(row)
    assert back.tags == f.tags and back.embedding == [0.5, 0.5] and back.key == "A minor"
    no_emb = MusicFields(tempo_bpm=0).row("id-2", 3)
    assert no_emb["embedding"] == [1.0, 0.0, 0.0] and not no_emb["has_embedding"]
    assert MusicFields.from_row(no_emb).embedding is None


def test_captions_from_descriptors() -> None:
    tags = [M.Tag("guitar", 0.8, M.Category.INSTRUMENT), M.Tag("drums", 0.6, M.Category.INSTRUMENT),
            M.Tag("rock", 0.5, M.Category.GENRE), M.Tag("vocal", 0.4, M.Category.INSTRUMENT),
            M.Tag("piano", 0.01, M.Category.INSTRUMENT)]
    d = _desc(tempo_bpm=110.2, tempo_confidence=0.8, key="A minor", key_confidence=0.7, tags=tags, duration_s=10)
    assert caption_text(d) == "A minor, 110 BPM, guitar and drums, rock, no vocals"
    d.vocal_segments = [(0.0, 5.0)]
    d.tempo_confidence = 0.2
    assert caption_text(d) == "A minor, about 110 BPM, guitar and drums, rock, with vocals"
    assert caption_text(_desc()).startswith("No recognisable music")
    caption = asyncio.run(Describer().describe(None, d))
    assert caption.describer == DescriptorCaptioner.name and caption.text.startswith("A minor")


class FakeModels:
    """Stands in for MusicModels in this unit test only: records which calls the analyser makes."""

    def __init__(self, have: frozenset[str]) -> None:
        self.have = have
        self.calls: list[str] = []
        self.tag_vocabulary = ("guitar", "piano")

    def available(self) -> frozenset[str]:
        return self.have

    async def transcribe(self, audio, sr, *, deadline=None):  # type: ignore[no-untyped-def]
        self.calls.append("transcribe")
        return [NoteEvent(64, 0.5, 0.9, 80), NoteEvent(60, 0.1, 0.4, 90)]

    async def tag(self, audio, sr, *, deadline=None):  # type: ignore[no-untyped-def]
        self.calls.append("tag")
        return Tagging(("guitar", "piano"), np.array([0.2, 0.7]), np.ones(200, np.float32))

    async def voice(self, audio, sr, *, deadline=None):  # type: ignore[no-untyped-def]
        self.calls.append("voice")
        return [(0.2, 0.8), (0.9, 0.9)]


def test_analyser_asks_only_served_models_at_the_detail_asked() -> None:
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)).astype(np.float32)
    fake = FakeModels(frozenset({BASIC_PITCH, MUSICNN, SILERO_VAD}))
    analyzer = M.MusicAnalyzer(fake)
    full = asyncio.run(analyzer.describe(tone, SR, detail=M.Detail.FULL))
    assert sorted(fake.calls) == ["tag", "transcribe", "voice"]
    assert [n.pitch for n in full.notes] == [60, 64] and full.tags[0].label == "piano"
    assert full.vocal_segments == [(0.2, 0.8)] and full.embedding is not None
    assert full.models == "librosa, basic-pitch, musicnn, silero-vad"
    assert full.key.startswith("A ")  # one sustained A: its tonic, either mode
    fake.calls.clear()
    summary = asyncio.run(analyzer.describe(tone, SR, detail=M.Detail.SUMMARY))
    assert "transcribe" not in fake.calls and not summary.notes
    assert asyncio.run(analyzer.describe(tone, SR, detail=M.Detail.NONE)) is None
    fake.calls.clear()
    silent = asyncio.run(analyzer.describe(np.zeros(SR, np.float32), SR))
    assert fake.calls == [] and silent.tempo_bpm == 0 and silent.key == ""
    assert analyzer.vocabulary() == ("guitar", "piano")
    assert M.MusicAnalyzer(None).vocabulary() == tuple(M.TAG_CATEGORIES)
    only_voice = M.MusicAnalyzer(FakeModels(frozenset({SILERO_VAD})))
    assert asyncio.run(only_voice.describe(tone, SR)).models == "librosa, silero-vad"


def test_proto_conversions() -> None:
    assert convert.music_detail(common_pb2.MUSIC_DETAIL_UNSPECIFIED) == M.Detail.SUMMARY
    assert convert.music_detail(common_pb2.MUSIC_DETAIL_FULL) == M.Detail.FULL
    with pytest.raises(InvalidArgument):
        convert.music_detail(7)
    d = _desc(tempo_bpm=100, key="C major", notes=[M.Note(60, 0.0, 0.5, 100)],
              tags=[M.Tag("piano", 0.9, M.Category.INSTRUMENT)], vocal_segments=[(1.0, 2.0)],
              embedding=np.ones(3, np.float32))
    pb = convert.music(d)
    assert pb.notes[0].pitch == 60 and pb.tags[0].category == common_pb2.TAG_CATEGORY_INSTRUMENT
    assert list(pb.embedding) == [1.0, 1.0, 1.0] and pb.vocal_segments[0].end_seconds == 2.0
    assert convert.music(None) is None and convert.stored_music(None) is None
    f = MusicFields(tempo_bpm=90, key="D minor", tags=[("rock", 0.5, 2), ("odd", 0.1, 42)], embedding=[1.0])
    assert convert.stored_music(f).tags[0].category == common_pb2.TAG_CATEGORY_GENRE
    back = convert.description_of(f, 3.0)
    assert back.tags[1].category == M.Category.OTHER and back.duration_s == 3.0 and back.embedding is not None
    assert convert.music_query(None) is None


def test_clusters_are_labelled_by_shared_music_descriptors() -> None:
    from grym_synth.memory.learning import _common_music
    from grym_synth.memory.store import PatternRecord

    def rec(i: int, music: MusicFields | None) -> PatternRecord:
        return PatternRecord(id=str(i), model="m", profile="p", duration_s=1.0, tags={}, created_at_us=i, source="s",
                             music=music)

    members = [rec(1, MusicFields(tempo_bpm=100, key="A minor", tags=[("guitar", 0.9, 1)])),
               rec(2, MusicFields(tempo_bpm=110, key="A minor", tags=[("piano", 0.9, 1)])),
               rec(3, MusicFields(tempo_bpm=0, key="C major", tags=[("guitar", 0.8, 1)]))]
    assert _common_music(members) == {"music.key": "A minor", "music.tag": "guitar", "music.tempo_bpm": "105"}
    assert _common_music([rec(1, None), rec(2, None), members[0]]) == {}


def test_companion_collections_are_told_from_pattern_collections() -> None:
    assert is_music_collection("grym_patterns_wav2vec2_tiny_music")        # the 200-d layout
    assert is_music_collection("grym_patterns_wav2vec2_tiny_music408")
    assert not is_music_collection("grym_patterns_wav2vec2_tiny")
    assert not is_music_collection("grym_patterns_musical_tiny")


def test_a_moved_row_keeps_its_descriptors_and_drops_the_other_spaces_embedding() -> None:
    old = MusicFields(tempo_bpm=120.0, key="A minor", tags=[("guitar", 0.5, 1)], embedding=[0.3, 0.4]).row("p1", 2)
    moved = descriptors_only(old, 4)
    assert moved["embedding"] == [1.0, 0.0, 0.0, 0.0] and moved["has_embedding"] is False
    assert {k: moved[k] for k in ("id", "tempo_bpm", "key", "music_tags")} == {
        "id": "p1", "tempo_bpm": 120.0, "key": "A minor", "music_tags": ["guitar"]}
    assert MusicFields.from_row(moved).embedding is None and MusicFields.from_row(moved).tags == [("guitar", 0.5, 1)]
