"""Trained music models served on Triton: notes (basic-pitch), tags + embedding (musicnn), pitch (torchcrepe),
voice (silero-vad). The one place the rest of grym-synth gets musical facts from a model.

Interface (owned by the "models" branch; change it only with a note here):

* ``MusicModels(triton, served=...)``; ``available()`` says which of the four the repository serves (the
  ``served`` names given, by default all four; :meth:`MusicModels.probe` narrows it to the ready ones).
* ``await transcribe(audio, sample_rate)`` -> ``list[NoteEvent]`` (basic-pitch incl. its own note creation, then
  :func:`refine_events`: onsets backtracked, re-detections of held notes merged),
  ``await tag(...)`` -> :class:`Tagging` (musicnn's two MTT taggers: 50 labels, their scores on the clip and on its
  harmonic part, and the 408-d timbre embedding, means over the clip's 3-second patches), ``await voice(...)`` ->
  speech spans in seconds (silero-vad), ``await pitch(...)`` -> ``(times_s, f0_hz, periodicity)`` (torchcrepe
  ``tiny``, Viterbi decoding; keyword ``hop_seconds``, default 0.01 as torchcrepe's, added to the interface so
  long clips can ask for fewer frames).
* Any mono float32 audio at any rate; each call resamples as its model needs (librosa's default soxr_hq, what
  ``librosa.load(sr=...)`` inside basic-pitch's and musicnn's own loaders does; torchcrepe resamples itself with
  resampy, as ``torchcrepe.predict`` does; silero at 16 kHz). Long audio is cut into fixed-shape pieces and sent
  as several requests at once (at most :data:`MAX_IN_FLIGHT` per call), so 10 minutes work.
* Empty, silent or very short audio gives empty notes, zero scores/embedding (digital silence, or no audio),
  no spans, empty pitch arrays — never an exception from a model. Non-finite samples or a non-positive rate are
  the caller's error: ValueError.

Why the pre/post-processing runs here with the packages' own functions (basic-pitch's windowing, unwrapping and
``model_output_to_notes``; torchcrepe's ``preprocess``/``postprocess``; silero's ``frame_blocks`` and
``get_speech_timestamps_from_probs``) and only the networks run on Triton: the networks are the compute, and
reusing the packages' code makes the served results equal to each package's in-process reference (checked to
1e-4 by tests/integration/test_music_models.py) instead of equal to a re-implementation of it.
Additions beyond the interface: :meth:`MusicModels.transcription` (basic-pitch's unwrapped posteriors) and
:meth:`MusicModels.speech_probabilities` (silero's per-frame probabilities), used by the reference tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grym_synth.core.compute import run_cpu
from grym_synth.inference.triton_client import TritonClient

log = logging.getLogger(__name__)

BASIC_PITCH = "basic_pitch"
MUSICNN = "musicnn"
CREPE = "crepe"
SILERO_VAD = "silero_vad"
MUSIC_MODEL_NAMES: tuple[str, ...] = (BASIC_PITCH, MUSICNN, CREPE, SILERO_VAD)

# Requests one call keeps in flight at once (a long clip is many requests; the dynamic batcher joins them).
MAX_IN_FLIGHT = 4
# Pieces per request: basic-pitch windows (2 s each), crepe frames (10 ms each), musicnn patches (3 s each),
# silero frames (32 ms each, one block of one clip per request).
BASIC_PITCH_WINDOWS_PER_REQUEST = 16
CREPE_FRAMES_PER_REQUEST = 1024
MUSICNN_PATCHES_PER_REQUEST = 16
SILERO_FRAMES_PER_REQUEST = 4096

# Note creation: basic-pitch's own ``model_output_to_notes`` with these thresholds, then onset backtracking.
# predict()'s defaults are onset 0.5 and frame 0.3. These values were chosen on a development set of 36 renders
# (scripts/make_music_testset.py --start 100 --seed 11), apart from the benchmark set, by note-onset F1 (mir_eval,
# 50 ms): with predict's defaults mono 0.67 / poly 0.43, with these 0.92 / 0.60. Higher thresholds drop the
# re-triggered onsets of sustained and vibrato notes, and drum hits heard as pitches; backtracking moves slow
# attacks (bowed strings, flute) back from the activation's peak to where it began to rise.
ONSET_THRESHOLD = 0.7
FRAME_THRESHOLD = 0.4
MINIMUM_NOTE_LENGTH_MS = 127.70
# A note's start moves back over frames where its pitch's "note" activation still rises and stays above this
# fraction of its peak in the first frames after the detected onset, and its onset activation above this fraction of
# its own peak there.
ONSET_BACKTRACK_LEVEL = 0.3
ONSET_PEAK_FRAMES = 10
# A note that starts at most REDETECTION_GAP_S after the previous note of its pitch ended continues that note
# unless it has a real attack: an onset activation reaching ONSET_THRESHOLD (from ONSET_LEAD_FRAMES before its
# start to ONSET_PEAK_FRAMES after) and a "note" activation that rises by REDETECTION_RISE across its start (the
# mean of RISE_BEFORE_FRAMES up to the start -> the peak of RISE_AFTER_FRAMES from it). Chosen on the three
# development sets (108 renders, see docs/benchmarks.md): polyphonic F1 0.68 -> 0.74, with drums 0.48 -> 0.58.
REDETECTION_GAP_S = 0.5
REDETECTION_RISE = 0.05
ONSET_LEAD_FRAMES = 2
RISE_BEFORE_FRAMES = 3
RISE_AFTER_FRAMES = 6
MIDI_LOWEST = 21  # basic-pitch's first pitch bin (A0)
MIDI_TEMPO = 120.0
# basic_pitch.inference.run_inference: 30 overlapping frames of 256 samples between windows.
BASIC_PITCH_OVERLAP_FRAMES = 30

# musicnn (musicnn.configuration / extractor): 16 kHz, 512-point STFT, hop 256, 96 mel bands, 187-frame patches.
MUSICNN_SR = 16_000
MUSICNN_N_FFT = 512
MUSICNN_HOP = 256
MUSICNN_MELS = 96
MUSICNN_FRAMES = 187
# The clip embedding: musicnn's "timbral" front-end features (408 vertical filters, max-pooled over frequency),
# averaged over frames. Chosen over the 200-d "penultimate" layer on the development set (make_music_testset.py
# --start 100 --seed 11): precision@5 "shares the instrument" 0.91 vs 0.56 (seeded Wav2Vec2: 0.39). The tagger's
# last layers are trained to say genre and mood as much as instrument, the front-end's filters describe timbre.
MUSICNN_EMBEDDING = 408
# The clip's tags: the mean of the sigmoid scores of the package's two MagnaTagATune taggers, MTT_musicnn and MTT_vgg
# (one served graph, same labels), over the clip's patches. Chosen on three development sets (make_music_testset.py
# --start 100/200/300 with seeds 11/13/17, 108 renders, none from the benchmark set), each tagger alone vs the mean:
# the rendered instrument in the top-5 tags 91 / 94 / 98 of 108, the top-scoring of the six test instruments right
# 55 / 60 / 63, other instruments in the top-5 200 / 171 / 188 (docs/models.md).
MUSICNN_TAGGERS = ("taggram", "vgg_taggram")
# The clip's harmonic part for the taggers (MusicModels.tag): librosa's median-filtering HPSS with this margin,
# applied to musicnn's own power spectrogram.
HPSS_MARGIN = 2.0
MUSICNN_OUTPUTS = ("taggram", "embedding", "timbre", "vgg_taggram")

# torchcrepe.predict defaults, model "tiny" (the one exported).
CREPE_FMIN = 50.0
CREPE_FMAX = 2006.0
CREPE_SR = 16_000
CREPE_HOP_SECONDS = 0.01

SILERO_SR = 16_000
SILERO_FRAME = 512
SILERO_CONTEXT = 64
SILERO_STATE = (1, 1, 128)


@dataclass(frozen=True)
class NoteEvent:
    """One note from basic-pitch: MIDI pitch, onset/offset in seconds, velocity (round(127 * amplitude))."""

    pitch: int
    start_seconds: float
    end_seconds: float
    velocity: int


@dataclass(frozen=True)
class Tagging:
    """musicnn tags for a clip: ``scores[i]`` is the sigmoid score of ``labels[i]``, averaged over the clip's 3-second
    patches and both MTT taggers (:func:`tag_scores`); ``embedding`` the mean of the clip's 408-d ``timbral``
    front-end features (:data:`MUSICNN_EMBEDDING`); ``harmonic_scores`` the same scores on the clip's harmonic part
    (:func:`musicnn_patch_pair`), None where not computed. The description weighs them per tag
    (grym_synth.analysis.music.blend_tags)."""

    labels: tuple[str, ...]
    scores: np.ndarray
    embedding: np.ndarray
    harmonic_scores: np.ndarray | None = None


def tag_scores(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The 50 tag scores from musicnn's per-patch outputs: the mean over patches and both taggers
    (:data:`MUSICNN_TAGGERS`). Two taggers trained on the same data but built differently (musically motivated
    filters vs small square ones) err on different pieces, so their mean ranks the right instrument higher more often
    than either does alone (docs/benchmarks.md)."""
    return np.mean([outputs[name].mean(axis=0) for name in MUSICNN_TAGGERS], axis=0).astype(np.float32)


def _mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 1-D samples, or ValueError for what the caller must fix (shape, rate, non-finite values)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {list(samples.shape)}")
    if not np.isfinite(samples).all():
        raise ValueError("audio contains NaN or infinite values")
    return samples


def resample(audio: np.ndarray, sample_rate: int, target: int) -> np.ndarray:
    """``audio`` at ``target`` Hz with librosa's default resampler (what ``librosa.load(sr=target)`` does)."""
    if sample_rate == target or audio.size == 0:
        return audio
    import librosa

    return librosa.resample(audio, orig_sr=sample_rate, target_sr=target).astype(np.float32, copy=False)


def quiet_import_basic_pitch() -> None:
    """Import basic_pitch without its three root-logger warnings about TensorFlow, CoreML and TFLite being absent
    (grym-synth runs its ONNX model only; the warnings would read as faults in the orchestrator's log)."""
    import sys

    if "basic_pitch" in sys.modules:
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        import basic_pitch  # noqa: F401
    finally:
        logging.disable(previous)


def _chunks(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i:i + size] for i in range(0, array.shape[0], size)]


class MusicModels:
    """Client of the four music models on Triton (module docstring). Cheap to build; holds no model state."""

    def __init__(self, triton: TritonClient, *, served: Iterable[str] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        names = tuple(served) if served is not None else MUSIC_MODEL_NAMES
        unknown = sorted(set(names) - set(MUSIC_MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown music models {unknown}; known: {', '.join(MUSIC_MODEL_NAMES)}")
        self._triton = triton
        self._served = frozenset(names)
        self._max_in_flight = max(1, int(max_in_flight))

    def available(self) -> frozenset[str]:
        """The music models this repository serves (see :meth:`probe`)."""
        return self._served

    async def probe(self) -> frozenset[str]:
        """Ask Triton which of the served models are ready; keep only those. Returns the new set."""
        ready = await asyncio.gather(*(self._triton.model_ready(name) for name in sorted(self._served)))
        self._served = frozenset(name for name, ok in zip(sorted(self._served), ready) if ok)
        return self._served

    async def prepare(self) -> list[str]:
        """Import and run once, in the CPU pool, the served models' pre/post-processing (``prepare_packages``):
        done before the server reports SERVING, so no request waits for torch to import."""
        return await run_cpu(prepare_packages, self._served)

    @property
    def tag_vocabulary(self) -> tuple[str, ...]:
        """musicnn's MagnaTagATune labels, in score order."""
        from musicnn.configuration import MTT_LABELS

        return tuple(MTT_LABELS)

    async def _infer_all(self, model: str, name: str, pieces: Sequence[np.ndarray], outputs: Sequence[str],
                         deadline: float | None) -> list[dict[str, np.ndarray]]:
        """One request per piece, at most ``max_in_flight`` at a time, results in order."""
        gate = asyncio.Semaphore(self._max_in_flight)

        async def one(piece: np.ndarray) -> dict[str, np.ndarray]:
            async with gate:
                return await self._triton.infer(model, {name: np.ascontiguousarray(piece)}, outputs,
                                                deadline=deadline)

        return list(await asyncio.gather(*(one(piece) for piece in pieces)))

    # ---- basic-pitch -------------------------------------------------------------------------------------------

    async def transcription(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None
                            ) -> dict[str, np.ndarray] | None:
        """basic-pitch's unwrapped posteriors ``{"note", "onset", "contour"}`` (frames x bins) as
        ``basic_pitch.inference.run_inference`` returns them; None when the audio is shorter than one frame."""
        prepared = await run_cpu(_basic_pitch_windows, audio, sample_rate)
        if prepared is None:
            return None
        n_samples, windows = prepared
        names = ("note", "onset", "contour")
        parts = await self._infer_all(BASIC_PITCH, "audio", _chunks(windows, BASIC_PITCH_WINDOWS_PER_REQUEST),
                                      names, deadline)
        return await run_cpu(_basic_pitch_unwrap, parts, names, n_samples)

    async def transcribe(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None
                         ) -> list[NoteEvent]:
        """Notes by basic-pitch with its own note creation (thresholds above), onsets backtracked."""
        output = await self.transcription(audio, sample_rate, deadline=deadline)
        if output is None or output["note"].shape[0] == 0:
            return []
        return await run_cpu(_basic_pitch_notes, output)

    # ---- musicnn -----------------------------------------------------------------------------------------------

    async def tag(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None) -> Tagging:
        """musicnn MTT tags of the clip and of its harmonic part (:func:`tag_scores`) and the clip's embedding, means
        over non-overlapping 3-second patches; both parts go to Triton as one batch of patches."""
        labels = self.tag_vocabulary
        pair = await run_cpu(_musicnn_tag_input, audio, sample_rate)
        if pair is None:
            zeros = np.zeros(len(labels), np.float32)
            return Tagging(labels, zeros, np.zeros(MUSICNN_EMBEDDING, np.float32), zeros)
        clip, harmonic = pair
        out = await self._musicnn(np.concatenate([clip, harmonic]), deadline)  # one batch: both parts
        n = len(clip)
        clip_out = {name: value[:n] for name, value in out.items()}
        harmonic_out = {name: value[n:] for name, value in out.items()}
        return Tagging(labels, tag_scores(clip_out), clip_out["timbre"].mean(axis=0).astype(np.float32),
                       tag_scores(harmonic_out))

    async def taggram(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None
                      ) -> dict[str, np.ndarray]:
        """musicnn's per-patch outputs for a clip of at least one patch (3 s): ``taggram`` [patches, 50],
        ``embedding`` (penultimate) [patches, 200], ``timbre`` [patches, 408] and ``vgg_taggram`` [patches, 50] —
        what ``musicnn.extractor.extractor`` returns as MTT_musicnn's taggram, features["penultimate"] and
        features["timbral"] (averaged over each patch's frames), and as MTT_vgg's taggram."""
        return await self._musicnn(await run_cpu(_musicnn_input, audio, sample_rate), deadline)

    async def _musicnn(self, patches: np.ndarray, deadline: float | None) -> dict[str, np.ndarray]:
        parts = await self._infer_all(MUSICNN, "patches", _chunks(patches, MUSICNN_PATCHES_PER_REQUEST),
                                      MUSICNN_OUTPUTS, deadline)
        return {name: np.concatenate([p[name] for p in parts]) for name in MUSICNN_OUTPUTS}

    # ---- torchcrepe --------------------------------------------------------------------------------------------

    async def pitch(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None,
                    hop_seconds: float = CREPE_HOP_SECONDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """torchcrepe ``tiny`` pitch: frame times (s, one per ``hop_seconds``, torchcrepe's default 10 ms), f0 (Hz,
        Viterbi-decoded within 50-2006 Hz, with torchcrepe's own +-10-cent dither) and periodicity (the network's
        confidence, 0-1). The network costs ~5 ms of CPU per frame here: a 10 ms hop runs at about 2x real time
        on 2 cores, so long clips may ask for a coarser hop."""
        samples = _mono(audio, sample_rate)
        empty = np.zeros(0, np.float32)
        if samples.size == 0:
            return empty, empty, empty
        hop = int(sample_rate * hop_seconds)
        if hop < 1:
            raise ValueError(f"hop_seconds {hop_seconds} is less than one sample at {sample_rate} Hz")
        frames = await run_cpu(_crepe_frames, samples, sample_rate, hop)
        parts = await self._infer_all(CREPE, "frames", _chunks(frames, CREPE_FRAMES_PER_REQUEST),
                                      ("probabilities",), deadline)
        f0, periodicity = await run_cpu(_crepe_decode, np.concatenate([p["probabilities"] for p in parts]))
        hop_16k = int(hop * CREPE_SR / sample_rate)
        times = np.arange(frames.shape[0], dtype=np.float32) * hop_16k / CREPE_SR
        return times, f0, periodicity

    # ---- silero-vad --------------------------------------------------------------------------------------------

    async def speech_probabilities(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None
                                   ) -> np.ndarray:
        """silero's per-frame (32 ms at 16 kHz) speech probabilities for the clip, blocks chained in order."""
        blocks = await run_cpu(_silero_blocks, audio, sample_rate)
        hidden = cell = np.zeros(SILERO_STATE, np.float32)
        probs: list[np.ndarray] = []
        for block in blocks:
            out = await self._triton.infer(SILERO_VAD, {"input": block, "h": hidden, "c": cell},
                                           ("speech_probs", "hn", "cn"), deadline=deadline)
            probs.append(out["speech_probs"].reshape(-1))
            hidden, cell = out["hn"], out["cn"]
        return np.concatenate(probs) if probs else np.zeros(0, np.float32)

    async def voice(self, audio: np.ndarray, sample_rate: int, *, deadline: float | None = None
                    ) -> list[tuple[float, float]]:
        """Speech spans (start, end) in seconds by silero-vad with ``get_speech_timestamps``' defaults."""
        samples = await run_cpu(resample, _mono(audio, sample_rate), sample_rate, SILERO_SR)
        if samples.size == 0:
            return []
        probs = await self.speech_probabilities(samples, SILERO_SR, deadline=deadline)
        return await run_cpu(_speech_spans, probs, samples.size)


# ---- the packages' own pre- and post-processing, run in the CPU pool (core.compute) -------------------------------
# WHY threads: these are CPU work (librosa, numba, torch) and, on first use, imports of torch and TensorFlow-era
# packages that take seconds. On the event-loop thread they stalled every RPC in flight: in CI a wav2vec2 call
# beside the first music description waited 30 s and timed out.


def prepare_packages(served: Iterable[str]) -> list[str]:
    """Import the packages whose pre/post-processing the served models need and run each once on a short clip, so
    the first request pays for neither the imports nor numba's compilation. Returns what was prepared."""
    served = set(served)
    done: list[str] = []
    clip = np.sin(np.linspace(0, 2 * np.pi * 440, 22_050, dtype=np.float32)) * 0.1
    resample(clip, 22_050, 16_000)
    if BASIC_PITCH in served:
        _basic_pitch_windows(clip, 22_050)
        from basic_pitch import note_creation  # noqa: F401

        done.append(BASIC_PITCH)
    if MUSICNN in served:
        _musicnn_tag_input(clip, 22_050)
        from musicnn.configuration import MTT_LABELS  # noqa: F401

        done.append(MUSICNN)
    if CREPE in served:
        _crepe_decode(np.full((4, 360), 1 / 360, np.float32))
        done.append(CREPE)
    if SILERO_VAD in served:
        _speech_spans(np.zeros(4, np.float32), 4 * SILERO_FRAME)
        done.append(SILERO_VAD)
    return done


def _basic_pitch_windows(audio: np.ndarray, sample_rate: int) -> tuple[int, np.ndarray] | None:
    """(samples at 22.05 kHz, windows [n, AUDIO_N_SAMPLES, 1]) as ``run_inference`` cuts them; None under a frame."""
    quiet_import_basic_pitch()
    from basic_pitch.constants import AUDIO_N_SAMPLES, AUDIO_SAMPLE_RATE, FFT_HOP
    from basic_pitch.inference import window_audio_file

    samples = resample(_mono(audio, sample_rate), sample_rate, AUDIO_SAMPLE_RATE)
    overlap = BASIC_PITCH_OVERLAP_FRAMES * FFT_HOP
    if samples.size < FFT_HOP:
        return None
    padded = np.concatenate([np.zeros(overlap // 2, np.float32), samples])
    windows = np.stack([w for w, _ in window_audio_file(padded, AUDIO_N_SAMPLES - overlap)]).astype(np.float32)
    return samples.size, windows


def _basic_pitch_unwrap(parts: list[dict[str, np.ndarray]], names: Sequence[str], n_samples: int
                        ) -> dict[str, np.ndarray]:
    from basic_pitch.inference import unwrap_output

    return {k: unwrap_output(np.concatenate([p[k] for p in parts]), n_samples, BASIC_PITCH_OVERLAP_FRAMES)
            for k in names}


def _basic_pitch_notes(output: dict[str, np.ndarray]) -> list[NoteEvent]:
    from basic_pitch import note_creation
    from basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP

    min_note_len = int(np.round(MINIMUM_NOTE_LENGTH_MS / 1000 * (AUDIO_SAMPLE_RATE / FFT_HOP)))
    _, events = note_creation.model_output_to_notes(
        output, onset_thresh=ONSET_THRESHOLD, frame_thresh=FRAME_THRESHOLD, min_note_len=min_note_len,
        min_freq=None, max_freq=None, multiple_pitch_bends=False, melodia_trick=True, midi_tempo=MIDI_TEMPO)
    return notes_from_events(refine_events(events, output))


def refine_events(events: Iterable[Sequence[Any]], output: dict[str, np.ndarray]) -> list[tuple[Any, ...]]:
    """basic-pitch's note events after grym-synth's two corrections: :func:`backtrack_onsets`, then
    :func:`merge_redetections`. The one post-processing the served path, the benchmark's in-process baseline and
    the reference test share."""
    return merge_redetections(backtrack_onsets(events, output), output)


def merge_redetections(events: Iterable[Sequence[Any]], output: dict[str, np.ndarray]) -> list[tuple[Any, ...]]:
    """Events with each re-detection of a held note folded back into the note it continues.

    Why: basic-pitch starts a new note whenever a pitch's onset activation peaks above the threshold or (its
    "melodia trick") its frame activation stays high, so a held chord tone is cut into several notes by a drum hit
    or another voice's attack, by vibrato, or by a bow change: on the development renders, more than half of the
    polyphonic pieces' false notes. A played repetition has an attack of its own: a strong onset activation and a
    "note" activation that rises across its start. A note of the same pitch starting within
    :data:`REDETECTION_GAP_S` of the previous one's end without both is merged into it (the earlier start and
    amplitude stay, the end becomes the later one's)."""
    from basic_pitch.note_creation import model_frames_to_time

    note, onset = output["note"], output["onset"]
    ordered = sorted((tuple(e) for e in events), key=lambda e: (e[0], e[1], e[2]))
    if note.shape[0] == 0:
        return ordered
    times = model_frames_to_time(note.shape[0])
    out: list[tuple[Any, ...]] = []
    last: dict[int, int] = {}  # pitch -> index in out of its latest note
    for start, end, pitch, *rest in ordered:
        k = last.get(int(pitch))
        follows = k is not None and start - out[k][1] <= REDETECTION_GAP_S
        if follows and not _attacks(note, onset, times, start, pitch):
            out[k] = (out[k][0], max(out[k][1], end), *out[k][2:])
            continue
        last[int(pitch)] = len(out)
        out.append((start, end, pitch, *rest))
    return out


def _attacks(note: np.ndarray, onset: np.ndarray, times: np.ndarray, start: float, pitch: int) -> bool:
    """Whether the pitch is attacked at ``start``: a strong onset and a rising "note" activation there."""
    i = int(np.argmin(np.abs(times - start)))
    c = int(pitch) - MIDI_LOWEST
    strong = _onset_peak(onset[:, c], i) >= ONSET_THRESHOLD
    before = float(note[max(0, i - RISE_BEFORE_FRAMES):i + 1, c].mean())
    rise = float(note[i:i + RISE_AFTER_FRAMES, c].max()) - before
    return strong and rise >= REDETECTION_RISE


def _onset_peak(track: np.ndarray, i: int) -> float:
    """A pitch's onset activation at its peak near frame ``i`` (ONSET_LEAD_FRAMES before to ONSET_PEAK_FRAMES
    after): the attack both the merge and the backtracking look at."""
    return float(track[max(0, i - ONSET_LEAD_FRAMES):i + ONSET_PEAK_FRAMES].max(initial=0.0))


def backtrack_onsets(events: Iterable[Sequence[Any]], output: dict[str, np.ndarray],
                     level: float = ONSET_BACKTRACK_LEVEL) -> list[tuple[Any, ...]]:
    """basic-pitch events with each start moved back to where its pitch's activation began to rise.

    Why: basic-pitch starts a note where the onset posterior peaks, which for a slow attack (a bowed string, a
    flute) is tens of milliseconds after the note began: outside the 50 ms that onset metrics, and a listener
    lining notes up with beats, allow. The "note" posterior of the pitch rises from the true start, so walking back
    while it still rises and stays above ``level`` times its peak recovers the start (librosa's onset backtracking,
    per pitch). The walk also stops where the pitch's onset posterior falls below ``level`` times its own peak
    there: before a plucked or struck note (a harpsichord) the "note" posterior already rises for some 50 ms while
    the onset posterior is still flat, and walking back over that put 8 % of the harpsichord's notes more than
    50 ms early (development sets: polyphonic F1 0.74 -> 0.78, monophonic 0.94 -> 0.95). Times are basic-pitch's own
    frame times (``model_frames_to_time``), ends are unchanged."""
    from basic_pitch.note_creation import model_frames_to_time

    note, onset = output["note"], output["onset"]
    if note.shape[0] == 0:
        return [tuple(e) for e in events]
    times = model_frames_to_time(note.shape[0])
    out = []
    for start, end, pitch, *rest in events:
        i = int(np.argmin(np.abs(times - start)))
        track, attack = note[:, int(pitch) - MIDI_LOWEST], onset[:, int(pitch) - MIDI_LOWEST]
        floor = level * float(track[i:i + ONSET_PEAK_FRAMES].max(initial=0.0))
        attack_floor = level * _onset_peak(attack, i)
        while i > 0 and floor < track[i - 1] < track[i] and attack[i - 1] > attack_floor:
            i -= 1
        out.append((min(float(times[i]), float(start)), end, pitch, *rest))
    return out


def _musicnn_input(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """musicnn patches of the clip at 16 kHz."""
    return musicnn_patches(resample(_mono(audio, sample_rate), sample_rate, MUSICNN_SR))


def _musicnn_tag_input(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray] | None:
    """musicnn patches of the clip at 16 kHz and of its harmonic part; None for an empty or all-zero clip."""
    samples = resample(_mono(audio, sample_rate), sample_rate, MUSICNN_SR)
    if samples.size == 0 or not np.any(samples):
        return None
    return musicnn_patch_pair(samples)


def _crepe_frames(samples: np.ndarray, sample_rate: int, hop: int) -> np.ndarray:
    import torch

    from grym_synth.inference.export.music import import_torchcrepe

    torchcrepe = import_torchcrepe()
    with torch.no_grad():
        return next(torchcrepe.preprocess(torch.from_numpy(samples)[None], sample_rate, hop, None, "cpu",
                                          True)).numpy()


def _crepe_decode(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchcrepe's Viterbi decoding of [frames, 360] probabilities -> (f0 Hz, periodicity), float32."""
    import torch

    from grym_synth.inference.export.music import import_torchcrepe

    torchcrepe = import_torchcrepe()
    with torch.no_grad():
        tensor = torch.from_numpy(probabilities).reshape(1, -1, 360).transpose(1, 2)
        f0, periodicity = torchcrepe.postprocess(tensor, CREPE_FMIN, CREPE_FMAX, torchcrepe.decode.viterbi,
                                                 False, True)
    return f0.numpy().reshape(-1).astype(np.float32), periodicity.numpy().reshape(-1).astype(np.float32)


def _silero_blocks(audio: np.ndarray, sample_rate: int) -> list[np.ndarray]:
    from silero_vad.sequence_vad import frame_blocks

    samples = resample(_mono(audio, sample_rate), sample_rate, SILERO_SR)
    return list(frame_blocks(samples, SILERO_FRAME, SILERO_CONTEXT, SILERO_FRAMES_PER_REQUEST))


def _speech_spans(probs: np.ndarray, n_samples: int) -> list[tuple[float, float]]:
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    spans = get_speech_timestamps_from_probs(probs.tolist(), sampling_rate=SILERO_SR,
                                             audio_length_samples=n_samples)
    return [(span["start"] / SILERO_SR, span["end"] / SILERO_SR) for span in spans]


def notes_from_events(events: Iterable[Sequence[Any]]) -> list[NoteEvent]:
    """basic-pitch note events ``(start_s, end_s, pitch, amplitude, bends)`` -> :class:`NoteEvent`, sorted by
    onset; velocity as basic-pitch writes it to MIDI (``round(127 * amplitude)``), kept within 1-127."""
    notes = [
        NoteEvent(pitch=int(pitch), start_seconds=float(start), end_seconds=float(end),
                  velocity=min(127, max(1, int(round(127 * float(amplitude))))))
        for start, end, pitch, amplitude, *_ in events
    ]
    return sorted(notes, key=lambda n: (n.start_seconds, n.pitch))


def musicnn_log_mel(samples_16k: np.ndarray) -> np.ndarray:
    """musicnn's input representation (``musicnn.extractor.batch_data``): librosa mel power spectrogram, frames x
    96, cast to float16, then ``log10(10000 x + 1)``."""
    return _log_mel(_power_spectrogram(samples_16k))


def _power_spectrogram(samples_16k: np.ndarray) -> np.ndarray:
    """The power STFT ``librosa.feature.melspectrogram`` computes inside musicnn's extractor (same bins, frames)."""
    import librosa

    return np.abs(librosa.stft(samples_16k, n_fft=MUSICNN_N_FFT, hop_length=MUSICNN_HOP)) ** 2


def _log_mel(power: np.ndarray) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(S=power, sr=MUSICNN_SR, n_mels=MUSICNN_MELS).T
    return np.log10(10000 * mel.astype(np.float16) + 1)


def musicnn_patches(samples_16k: np.ndarray) -> np.ndarray:
    """Non-overlapping 187-frame patches ``[n, 187, 96]`` float32, as musicnn's extractor cuts them (a trailing
    part shorter than a patch is dropped). A clip shorter than one patch is repeated to fill it (musicnn's
    training used "repeat-pad" for short clips; its extractor has no answer for them)."""
    return _patches(musicnn_log_mel(samples_16k))


def musicnn_patch_pair(samples_16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the clip's patches as :func:`musicnn_patches` cuts them, the same of its harmonic part): the harmonic part is
    librosa's HPSS (median filters across time and frequency, soft mask with margin :data:`HPSS_MARGIN`) applied to
    the same power spectrogram, so it costs no second transform and no resynthesis."""
    import librosa

    power = _power_spectrogram(samples_16k)
    harmonic = librosa.decompose.hpss(power, margin=HPSS_MARGIN)[0]
    return _patches(_log_mel(power)), _patches(_log_mel(harmonic))


def _patches(rep: np.ndarray) -> np.ndarray:
    """A log-mel representation (frames x 96) cut into musicnn's patches (see :func:`musicnn_patches`)."""
    if rep.shape[0] < MUSICNN_FRAMES:
        rep = np.tile(rep, (math.ceil(MUSICNN_FRAMES / max(1, rep.shape[0])), 1))[:MUSICNN_FRAMES]
    count = (rep.shape[0] - MUSICNN_FRAMES) // MUSICNN_FRAMES + 1
    return np.stack([rep[i * MUSICNN_FRAMES:(i + 1) * MUSICNN_FRAMES] for i in range(count)]).astype(np.float32)
