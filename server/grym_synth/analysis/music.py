"""What the music is: tempo, beats and key by signal analysis; notes, tags, embedding and voice from trained models.

Tempo and key need no trained weights: librosa's beat tracker (dynamic programming over an onset envelope) and
chroma key profiles (Krumhansl-Schmuckler and Temperley, major and minor) are permissive (ISC) and good on tonal
music. madmom is not used: its weights are CC BY-NC-SA. Notes, tags, the "sounds similar" embedding and vocal
segments come from the trained models served on Triton (:class:`grym_synth.inference.music_models.MusicModels`):
basic-pitch, musicnn (MagnaTagATune) and silero-vad.

Bad input is no error: silence, noise and clips too short for a component give that component's "unknown"
(tempo 0 with confidence 0, empty key, no notes); a component is never asked about audio it cannot judge, so a
model never fails on it. Long audio (a whole stream) is described window by window and merged
(:func:`merge`): chroma sums, tag scores and embeddings average, notes and beats shift by each window's start.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from grym_synth.core.compute import run_cpu
from grym_synth.inference.music_models import BASIC_PITCH, MUSICNN, SILERO_VAD

log = logging.getLogger(__name__)

PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")


class Detail(enum.IntEnum):
    """How much a request wants (grym.v1.MusicDetail without the protobuf)."""

    NONE = 1
    SUMMARY = 2
    FULL = 3


class Category(enum.IntEnum):
    """grym.v1.TagCategory's values."""

    UNSPECIFIED = 0
    INSTRUMENT = 1
    GENRE = 2
    MOOD = 3
    OTHER = 4


# The one table that sorts the MagnaTagATune vocabulary (musicnn's 50 tags). A label missing here is OTHER.
TAG_CATEGORIES: dict[str, Category] = {
    **{t: Category.INSTRUMENT for t in (
        "guitar", "strings", "drums", "piano", "violin", "vocal", "synth", "harpsichord", "flute", "sitar", "choir",
        "voice", "harp", "cello", "vocals", "female vocal", "male vocal", "female voice", "male voice", "singing",
        "female", "male", "woman", "man", "choral", "beat", "beats", "opera")},
    **{t: Category.GENRE for t in (
        "classical", "techno", "electronic", "rock", "ambient", "indian", "pop", "classic", "new age", "dance",
        "country", "metal")},
    **{t: Category.MOOD for t in ("slow", "fast", "loud", "quiet", "soft", "weird")},
    **{t: Category.OTHER for t in ("no vocals", "no vocal", "no voice", "solo")},
}

# Shortest audio each component can judge; shorter audio gets that component's "unknown" without asking it.
MIN_SECONDS = {"tempo": 2.0, "key": 0.5, "notes": 0.1, "tags": 1.0, "voice": 0.5}
SILENCE_RMS = 1e-4            # below: silence (about -80 dBFS), nothing is estimated
MIN_TEMPO_CONFIDENCE = 0.15   # below: no periodic pulse (noise, a drone): tempo unknown
MIN_KEY_CONFIDENCE = 0.3      # below: no tonal centre (noise, drums only): key unknown
MAX_DOUBLED_BPM = 200.0       # the beat tracker's tempo is doubled only up to this ...
DOUBLE_TEMPO_RATIO = 0.7      # ... when the doubled pulse is at least this periodic relative to the tracked one
BEAT_PRIOR_BPM = 100.0        # centre of the beat tracker's tempo prior (librosa's default: 120)
THREE_HALVES_RATIO = 0.8      # tempo x 3/2 (up to MAX_DOUBLED_BPM) when that pulse is at least this periodic
# The low band (kick drum, bass): its onsets, from LOW_BAND_MELS mel bands over the whole spectrum, those centred
# below LOW_BAND_HZ. A low band pulsing at the tracked tempo (at least LOW_BAND_PULSE) but not at twice it (below
# DOUBLE_TEMPO_RATIO of that) vetoes doubling.
LOW_BAND_HZ, LOW_BAND_MELS, LOW_BAND_PULSE = 150.0, 64, 0.6
# SuperFlux onset envelope (Boeck & Widmer, DAFx 2013): flux against the frame 2 hops back, after a maximum filter
# over 3 neighbouring bands of 138 mel bands from 27.5 Hz, so vibrato and bow noise that wobble by a band do not
# read as onsets.
FLUX_LAG, FLUX_MAX_BANDS, FLUX_MELS, FLUX_FMIN_HZ = 2, 3, 138, 27.5
TOP_TAGS = 10                 # tags returned, highest first
# Pitched-instrument tags (INSTRUMENT but not the percussive ones) weigh the taggers' score on the clip's harmonic
# part by this much (blend_tags).
HARMONIC_TAG_WEIGHT = 0.3
PERCUSSIVE_TAGS = frozenset({"drums", "beat", "beats"})
ANALYSIS_RATE_HZ = 16_000     # the orchestrator's audio rate (core.audio.TARGET_RATE_HZ)
HOP = 256                     # onset/chroma hop at 16 kHz: 16 ms

# Key profiles (C major / C minor; rotate for other tonics). Krumhansl & Kessler (1982) probe-tone ratings and
# Temperley's (1999) revision: the estimate averages the two correlations (each errs differently).
KRUMHANSL = (np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88]),
             np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17]))
TEMPERLEY = (np.array([5.0, 2.0, 3.5, 2.0, 4.5, 4.0, 2.0, 4.5, 2.0, 3.5, 1.5, 4.0]),
             np.array([5.0, 2.0, 3.5, 4.5, 2.0, 4.0, 2.0, 4.5, 3.5, 2.0, 1.5, 4.0]))


@dataclass(frozen=True)
class Note:
    pitch: int
    start_s: float
    end_s: float
    velocity: int


@dataclass(frozen=True)
class Tag:
    label: str
    score: float
    category: Category


@dataclass
class MusicDescription:
    """grym.v1.MusicDescription without the protobuf; every field empty/zero when unknown."""

    tempo_bpm: float = 0.0
    tempo_confidence: float = 0.0
    beats_s: list[float] = field(default_factory=list)
    key: str = ""
    key_confidence: float = 0.0
    notes: list[Note] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    vocal_segments: list[tuple[float, float]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    models: str = ""
    # Merge state (not in the API): the summed chroma behind the key, all tag scores, the analysed seconds.
    chroma: np.ndarray | None = None
    tag_scores: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0

    def top_labels(self, n: int = 5) -> list[str]:
        return [t.label for t in self.tags[:n]]

    def summary(self) -> "MusicDescription":
        """The description without notes and beats (what SUMMARY detail and stored patterns carry)."""
        return replace(self, notes=[], beats_s=[])


class MusicModelsLike(Protocol):
    """What this module needs of :class:`grym_synth.inference.music_models.MusicModels`."""

    async def transcribe(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None) -> list[Any]: ...
    async def tag(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None) -> Any: ...
    async def voice(self, audio: np.ndarray, sample_rate: int, *,
                    deadline: float | None = None) -> list[tuple[float, float]]: ...
    def available(self) -> frozenset[str]: ...


def key_name(tonic: int, mode: str) -> str:
    return f"{PITCH_NAMES[tonic % 12]} {mode}"


def category(label: str) -> Category:
    return TAG_CATEGORIES.get(label, Category.OTHER)


# --- tempo ----------------------------------------------------------------------------------------------------------
def onset_envelope(y: np.ndarray, sr: int) -> np.ndarray:
    """SuperFlux onset strength, the mean over bands. Chosen on the development set (make_music_testset.py
    --start 100 --seed 11), with the tracker settings above: 35 of 36 tempos within 4 %, against 30 with
    librosa's plain mel flux (median over bands) and its 120 BPM prior; the bowed-violin pieces had no pulse."""
    import librosa

    return librosa.onset.onset_strength(y=y, sr=sr, hop_length=HOP, lag=FLUX_LAG, max_size=FLUX_MAX_BANDS,
                                        n_mels=FLUX_MELS, fmin=FLUX_FMIN_HZ, fmax=sr / 2, aggregate=np.mean)


def low_band_envelope(y: np.ndarray, sr: int) -> np.ndarray:
    """Onset strength of the mel bands centred below :data:`LOW_BAND_HZ`: where the kick drum and the bass play."""
    import librosa

    mel = librosa.feature.melspectrogram(y=y, sr=sr, hop_length=HOP, n_mels=LOW_BAND_MELS, fmax=sr / 2)
    low = librosa.mel_frequencies(n_mels=LOW_BAND_MELS, fmax=sr / 2) < LOW_BAND_HZ
    return librosa.onset.onset_strength(S=librosa.power_to_db(mel[low]), sr=sr, hop_length=HOP)


def low_band_keeps_tempo(y: np.ndarray, sr: int, bpm: float) -> bool:
    """Whether the kick/bass band pulses at ``bpm`` and much less at twice it: then ``bpm`` is the beat.

    Why: the doubling check below tells a fast backbeat that the tracker halved (its kick and snare alternate, so
    the tracked period is two beats) from a slow one under an eighth-note melody only by how periodic the doubled
    pulse is, and a busy melody makes both look alike (a guitar at 79 BPM read as 157). The low band separates
    them: under a halved fast backbeat it still pulses at the doubled rate (kick, then the snare's body), under a
    slow one its pulse stops at the beat. On the three development sets this kept a 69 BPM piece and vetoed no
    correct doubling (every correct doubling with drums had a doubled low-band pulse of at least 0.9 of the
    tracked one; without drums the low band has no clear pulse and never vetoes)."""
    low = low_band_envelope(y, sr)
    at = periodicity(low, bpm, sr)
    return at >= LOW_BAND_PULSE and periodicity(low, 2 * bpm, sr) < DOUBLE_TEMPO_RATIO * at


def _autocorrelation(x: np.ndarray, lag: int) -> float:
    """Autocorrelation of the zero-mean envelope ``x`` at an integer lag, over its energy, corrected for overlap."""
    return float(np.dot(x[:-lag], x[lag:])) / float(np.dot(x, x)) * len(x) / (len(x) - lag)


def periodicity(onset_env: np.ndarray, bpm: float, sr: int) -> float:
    """How strongly the onset envelope repeats at the beat period: its normalised autocorrelation at that lag
    (0 for noise or a drone, towards 1 for a steady pulse). This is the tempo's confidence."""
    if bpm <= 0 or len(onset_env) < 8:
        return 0.0
    x = onset_env - onset_env.mean()
    if float(np.dot(x, x)) <= 1e-12:
        return 0.0
    lag = 60.0 * sr / (HOP * bpm)
    best = 0.0
    for lo in (int(np.floor(lag)), int(np.ceil(lag))):
        for d in (-1, 0, 1):
            k = lo + d
            if 0 < k < len(x) - 1:
                best = max(best, _autocorrelation(x, k))
    return float(np.clip(best, 0.0, 1.0))


def refine_tempo(onset_env: np.ndarray, bpm: float, sr: int) -> float:
    """The beat period to a fraction of a frame: the envelope's autocorrelation peak within a frame of ``bpm``'s lag,
    interpolated by a parabola through it and its neighbours.

    Why: librosa's tracker reads the tempo off whole-frame lags (16 ms here), so a 146 BPM piece (25.7 frames) came
    out as 138.9 BPM (27 frames), 4.9 % off; at fast tempos one frame is several percent. On the three development
    sets (make_music_testset.py --start 100/200/300) the median error of the tempos within 10 % fell from 0.8 % to
    0.09 % (90th percentile 1.5 % -> 0.5 %), and one more tempo of 108 came within 4 %. Keeps ``bpm`` when no peak is
    there (a flat or too-short envelope)."""
    x = onset_env - onset_env.mean()
    if bpm <= 0 or float(np.dot(x, x)) <= 1e-12:
        return bpm
    k0 = int(round(60.0 * sr / (HOP * bpm)))
    lags = [k for k in (k0 - 1, k0, k0 + 1) if 2 <= k < len(x) - 2]
    if not lags:
        return bpm
    k = max(lags, key=lambda j: _autocorrelation(x, j))
    a, b, c = (_autocorrelation(x, j) for j in (k - 1, k, k + 1))
    curvature = a - 2 * b + c
    if not (b >= a and b >= c and curvature < 0):
        return bpm
    return float(60.0 * sr / (HOP * (k + 0.5 * (a - c) / curvature)))


def estimate_tempo(y: np.ndarray, sr: int) -> tuple[float, float, list[float]]:
    """(bpm, confidence, beat times); (0, 0, []) when there is no pulse to track."""
    if len(y) < MIN_SECONDS["tempo"] * sr or _rms(y) < SILENCE_RMS:
        return 0.0, 0.0, []
    import librosa

    env = onset_envelope(y, sr)
    tempo, beats = librosa.beat.beat_track(onset_envelope=env, sr=sr, hop_length=HOP, units="time",
                                           start_bpm=BEAT_PRIOR_BPM)
    bpm = float(np.atleast_1d(tempo)[0])
    conf = periodicity(env, bpm, sr)
    # The tracker's prior (BEAT_PRIOR_BPM) halves fast tempos whose two-beat pattern (kick/snare) is strong: when the
    # pulse at twice the tempo is nearly as periodic, the faster reading is the beat, unless the low band says the
    # tracked tempo is the beat. The prior also reads fast melodies of eighths and quarters at two thirds of their
    # tempo (a dotted-quarter pulse): when the pulse at 3/2 the tempo is nearly as periodic, that is the beat.
    if 0 < bpm * 2 <= MAX_DOUBLED_BPM and periodicity(env, 2 * bpm, sr) >= DOUBLE_TEMPO_RATIO * conf \
            and not low_band_keeps_tempo(y, sr, bpm):
        bpm, beats = 2 * bpm, _halve_gaps(beats)
    elif 0 < bpm * 1.5 <= MAX_DOUBLED_BPM and periodicity(env, 1.5 * bpm, sr) >= THREE_HALVES_RATIO * conf:
        bpm = 1.5 * bpm
        _, beats = librosa.beat.beat_track(onset_envelope=env, sr=sr, hop_length=HOP, units="time", bpm=bpm)
    if conf < MIN_TEMPO_CONFIDENCE or not np.isfinite(bpm) or bpm <= 0:
        return 0.0, 0.0, []
    bpm = refine_tempo(env, bpm, sr)
    return round(bpm, 2), round(conf, 3), [round(float(b), 4) for b in beats]


def _halve_gaps(beats: np.ndarray) -> np.ndarray:
    """Beat times at twice the rate: the midpoints between tracked beats inserted."""
    b = np.asarray(beats, dtype=np.float64)
    if len(b) < 2:
        return b
    out = np.empty(2 * len(b) - 1)
    out[0::2] = b
    out[1::2] = (b[:-1] + b[1:]) / 2
    return out


# --- key ------------------------------------------------------------------------------------------------------------
def chroma_profile(y: np.ndarray, sr: int) -> np.ndarray | None:
    """The 12-bin pitch-class energy of the clip (summed over time), or None when there is nothing to judge."""
    if len(y) < MIN_SECONDS["key"] * sr or _rms(y) < SILENCE_RMS:
        return None
    import librosa

    # No harmonic/percussive separation first: on the test set it did not help (28 vs 29 of 36 keys) and cost
    # 7x the time of everything else in the signal analysis.
    chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=512, n_chroma=12, bins_per_octave=36)
    return chroma.sum(axis=1).astype(np.float64)


def _z(v: np.ndarray) -> np.ndarray:
    s = v.std()
    return (v - v.mean()) / s if s > 0 else v * 0.0


def key_scores(chroma: np.ndarray) -> np.ndarray:
    """Correlation of the chroma with each of the 24 keys (rows: major, minor; columns: tonic C..B), averaged over
    both profile sets."""
    c = _z(np.asarray(chroma, dtype=np.float64))
    out = np.zeros((2, 12))
    for profiles in (KRUMHANSL, TEMPERLEY):
        for m, prof in enumerate(profiles):
            p = _z(prof)
            for tonic in range(12):
                out[m, tonic] += float(np.dot(c, np.roll(p, tonic))) / 12.0
    return out / 2.0


def estimate_key(chroma: np.ndarray | None) -> tuple[str, float]:
    """("A minor", confidence) from a chroma profile; ("", 0) when no key stands out. The confidence is the best
    correlation scaled by its margin over the runner-up that is not its relative key (relative keys share their
    notes, so their near-tie says nothing against the key's tonality)."""
    if chroma is None or not np.isfinite(chroma).all() or float(np.max(chroma)) <= 0:
        return "", 0.0
    flat = chroma / chroma.max()
    if float(flat.min()) > 0.75:  # every pitch class nearly as strong as the top one: noise, not a key
        return "", 0.0
    scores = key_scores(chroma)
    mode, tonic = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = float(scores[mode, tonic])
    conf = float(np.clip(best, 0.0, 1.0))
    if conf < MIN_KEY_CONFIDENCE:
        return "", 0.0
    return key_name(int(tonic), MODES[int(mode)]), round(conf, 3)


def _rms(y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) if len(y) else 0.0


@dataclass
class SignalAnalysis:
    tempo_bpm: float
    tempo_confidence: float
    beats_s: list[float]
    chroma: np.ndarray | None


def analyse_signal(y: np.ndarray, sr: int) -> SignalAnalysis:
    """Tempo, beats and chroma (CPU, no model): run in the CPU pool."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    bpm, conf, beats = estimate_tempo(y, sr)
    return SignalAnalysis(bpm, conf, beats, chroma_profile(y, sr))


# --- the analyser ---------------------------------------------------------------------------------------------------
class MusicAnalyzer:
    """Describes audio: signal analysis in the CPU pool and the served models concurrently."""

    def __init__(self, models: MusicModelsLike | None, *, top_tags: int = TOP_TAGS) -> None:
        self.models = models
        self.top_tags = top_tags

    def available(self) -> frozenset[str]:
        return self.models.available() if self.models is not None else frozenset()

    def vocabulary(self) -> tuple[str, ...]:
        """The tagger's labels (what text search can name); MTT's 50 labels when the tagger is not served."""
        vocab = getattr(self.models, "tag_vocabulary", None) if MUSICNN in self.available() else None
        return tuple(vocab) if vocab else tuple(TAG_CATEGORIES)

    async def describe(self, samples: np.ndarray, sr: int = ANALYSIS_RATE_HZ, *, detail: Detail = Detail.SUMMARY,
                       deadline: float | None = None) -> MusicDescription | None:
        """The description at ``detail`` (None for NONE). Silence gets the empty description at once."""
        if detail == Detail.NONE:
            return None
        duration = len(samples) / sr
        if _rms(samples) < SILENCE_RMS:
            return MusicDescription(duration_s=duration)
        have = self.available()
        jobs: dict[str, Any] = {"signal": run_cpu(analyse_signal, samples, sr)}
        if self.models is not None:
            if detail == Detail.FULL and BASIC_PITCH in have and duration >= MIN_SECONDS["notes"]:
                jobs["notes"] = self.models.transcribe(samples, sr, deadline=deadline)
            if MUSICNN in have and duration >= MIN_SECONDS["tags"]:
                jobs["tags"] = self.models.tag(samples, sr, deadline=deadline)
            if SILERO_VAD in have and duration >= MIN_SECONDS["voice"]:
                jobs["voice"] = self.models.voice(samples, sr, deadline=deadline)
        started = time.perf_counter()
        results = dict(zip(jobs, await asyncio.gather(*jobs.values())))
        log.debug("music description of %.1f s in %.3f s", duration, time.perf_counter() - started)
        return self._assemble(results, duration, detail)

    def _assemble(self, results: dict[str, Any], duration: float, detail: Detail) -> MusicDescription:
        sig: SignalAnalysis = results["signal"]
        key, key_conf = estimate_key(sig.chroma)
        out = MusicDescription(tempo_bpm=sig.tempo_bpm, tempo_confidence=sig.tempo_confidence,
                               beats_s=sig.beats_s if detail == Detail.FULL else [], key=key,
                               key_confidence=key_conf, chroma=sig.chroma, duration_s=duration)
        used = []
        if "notes" in results:
            out.notes = [Note(int(n.pitch), float(n.start_seconds), float(n.end_seconds), int(n.velocity))
                         for n in sorted(results["notes"], key=lambda n: (n.start_seconds, n.pitch))]
            used.append("basic-pitch")
        if "tags" in results:
            tagging = results["tags"]
            out.tag_scores = blend_tags(tagging)
            out.tags = top_tags(out.tag_scores, self.top_tags)
            emb = np.asarray(tagging.embedding, dtype=np.float32).reshape(-1)
            out.embedding = emb if emb.size and np.isfinite(emb).all() and np.any(emb) else None
            used.append("musicnn")
        if "voice" in results:
            out.vocal_segments = [(float(a), float(b)) for a, b in results["voice"] if b > a]
            used.append("silero-vad")
        out.models = ", ".join(["librosa"] + used)
        return out


def blend_tags(tagging: Any) -> dict[str, float]:
    """Label -> score: the taggers' scores on the clip, each pitched-instrument tag mixed with its score on the
    clip's harmonic part (:data:`HARMONIC_TAG_WEIGHT`; tags without a harmonic score stay as they are).

    Why: with a drum kit the taggers hear mostly the kit and the instrument drops out of the top tags; on the clip
    with its percussive part filtered out they hear the instrument. Which instrument plays is what the harmonic part
    can tell; whether there are drums, the genre and the mood are judged on the whole clip. Chosen on the
    development sets (docs/benchmarks.md): the rendered instrument in the top 5 for 104 of 108 renders instead of 98,
    named first 64 times instead of 63, other instruments in the top 5 179 instead of 188, "drums" still in the top
    5 of 33 of the 51 renders with a kit (34 before), instrument and drums both there for 87 (84 before). Mixing
    every tag put the instrument in the top 5 as often but pushed "drums" out of it for 14 of those 34."""
    scores = np.asarray(tagging.scores, dtype=np.float64)
    if tagging.harmonic_scores is not None:
        pitched = np.array([category(label) == Category.INSTRUMENT and label not in PERCUSSIVE_TAGS
                            for label in tagging.labels])
        mixed = (1 - HARMONIC_TAG_WEIGHT) * scores + HARMONIC_TAG_WEIGHT * np.asarray(tagging.harmonic_scores)
        scores = np.where(pitched, mixed, scores)
    return {str(label): float(s) for label, s in zip(tagging.labels, scores)}


def top_tags(scores: dict[str, float], n: int = TOP_TAGS) -> list[Tag]:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [Tag(label, round(float(score), 4), category(label)) for label, score in ranked]


def merge(parts: Sequence[tuple[float, MusicDescription]], top_n: int = TOP_TAGS) -> MusicDescription:
    """One description of consecutive windows ((start seconds, description) each): the tempo of the most
    confident windows (confidence-weighted median), the key of the summed chroma, duration-weighted tag scores and
    embeddings, notes/beats/voice shifted to the stream's time."""
    parts = [(s, d) for s, d in parts if d is not None]
    if not parts:
        return MusicDescription()
    if len(parts) == 1 and parts[0][0] == 0.0:
        return parts[0][1]
    out = MusicDescription(duration_s=sum(d.duration_s for _, d in parts))
    tempos = [(d.tempo_bpm, d.tempo_confidence * d.duration_s) for _, d in parts if d.tempo_bpm > 0]
    if tempos:
        tempos.sort()
        total = sum(w for _, w in tempos)
        acc = 0.0
        for bpm, w in tempos:
            acc += w
            if acc >= total / 2:
                out.tempo_bpm = bpm
                break
        out.tempo_confidence = round(total / max(out.duration_s, 1e-9), 3)
    chromas = [d.chroma for _, d in parts if d.chroma is not None]
    if chromas:
        out.chroma = np.sum(chromas, axis=0)
        out.key, out.key_confidence = estimate_key(out.chroma)
    weights = [(d.duration_s, d) for _, d in parts if d.tag_scores]
    if weights:
        total = sum(w for w, _ in weights)
        labels = set().union(*(d.tag_scores for _, d in weights))
        out.tag_scores = {lb: sum(w * d.tag_scores.get(lb, 0.0) for w, d in weights) / total for lb in labels}
        out.tags = top_tags(out.tag_scores, top_n)
        embs = [(w, d.embedding) for w, d in weights if d.embedding is not None]
        if embs:
            out.embedding = (sum(w * e for w, e in embs) / sum(w for w, _ in embs)).astype(np.float32)
    for start, d in parts:
        out.beats_s.extend(round(start + b, 4) for b in d.beats_s)
        out.notes.extend(Note(n.pitch, start + n.start_s, start + n.end_s, n.velocity) for n in d.notes)
        out.vocal_segments.extend((start + a, start + b) for a, b in d.vocal_segments)
    out.vocal_segments = _join_spans(out.vocal_segments)
    out.models = max((d.models for _, d in parts), key=len)
    return out


def _join_spans(spans: list[tuple[float, float]], gap_s: float = 0.05) -> list[tuple[float, float]]:
    """Spans that touch across a window boundary become one."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a - out[-1][1] <= gap_s:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
