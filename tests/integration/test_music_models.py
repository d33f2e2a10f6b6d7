"""The trained music models served by the real tritonserver equal each package's own in-process inference.

References (run in this process, on the same audio): basic-pitch's ``predict`` (its ONNX model on onnxruntime,
loading a wav file the test writes), ``torchcrepe.predict`` (model "tiny"), silero-vad's ``get_speech_timestamps``
(its streaming ONNX model), musicnn's ``extractor`` (TensorFlow; run once by the exporter in its throwaway venv on
the reference clip stored in the built repository, since TensorFlow cannot live beside this project's
protobuf). Tolerance 1e-4 on every array; notes and speech spans must be identical.

Audio is real signal synthesised here: tones, chords and a melody with harmonics and envelopes, a speech-like
signal (espeak-ng when installed, see scripts/setup.sh) — plus bad input: silence, noise, 0.2 s, 10 minutes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from grym_synth.inference.music_models import (FRAME_THRESHOLD, MINIMUM_NOTE_LENGTH_MS, ONSET_THRESHOLD, MusicModels,
                                               NoteEvent, musicnn_patch_pair, notes_from_events, refine_events,
                                               resample)
from grym_synth.inference.triton_client import TritonClient

ATOL = 1e-4


def harmonic(freq: float, seconds: float, rate: int, *, start: float = 0.0) -> np.ndarray:
    """A plucked-string-like note: 4 harmonics under an exponential decay, starting at ``start`` seconds."""
    t = np.arange(int(seconds * rate)) / rate
    env = np.exp(-3.0 * t) * (1 - np.exp(-200 * t))
    wave = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, 5))
    out = np.zeros(int((start + seconds) * rate), np.float32)
    out[int(start * rate):int(start * rate) + t.size] = 0.3 * env * wave
    return out


def melody(rate: int) -> np.ndarray:
    """C major arpeggio then a C-E-G chord: 4 s of monophonic and polyphonic notes."""
    midi = [60, 64, 67, 72]
    parts = [harmonic(440 * 2 ** ((m - 69) / 12), 0.5, rate, start=0.5 * i) for i, m in enumerate(midi)]
    chord = [harmonic(440 * 2 ** ((m - 69) / 12), 1.5, rate, start=2.2) for m in (60, 64, 67)]
    out = np.zeros(int(4.0 * rate), np.float32)
    for p in parts + chord:
        out[:p.size] += p
    return out


def speech_like(rate: int = 16_000) -> np.ndarray:
    """Spoken words from espeak-ng when installed, else none (the caller skips the span comparison)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    wav = subprocess.run([espeak, "--stdout", "the quick brown fox jumps over the lazy dog, twice"],
                         check=True, capture_output=True).stdout
    import io

    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    from grym_synth.inference.music_models import resample

    speech = resample(audio, sr, rate)
    return np.concatenate([np.zeros(rate, np.float32), speech, np.zeros(rate, np.float32)])


@pytest.fixture(scope="module")
def music(triton) -> Iterator[tuple[MusicModels, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()

    async def connect() -> tuple[TritonClient, MusicModels]:  # the aio channels belong to the loop they start in
        client = TritonClient(triton.grpc_url, headers=triton.auth_headers or None, timeout_s=120)
        models = MusicModels(client)
        await models.probe()
        return client, models

    client, models = loop.run_until_complete(connect())
    yield models, loop
    loop.run_until_complete(client.close())
    loop.close()


def run(music, coro_fn, *args, **kwargs):
    models, loop = music
    return loop.run_until_complete(getattr(models, coro_fn)(*args, **kwargs))


def test_every_music_model_is_served(music) -> None:
    models, _ = music
    assert models.available() == {"basic_pitch", "musicnn", "crepe", "silero_vad"}
    assert len(models.tag_vocabulary) == 50 and "guitar" in models.tag_vocabulary


# ---- basic-pitch --------------------------------------------------------------------------------------------

def _basic_pitch_reference(audio: np.ndarray, rate: int, tmp_path: Path):
    from basic_pitch import ICASSP_2022_MODEL_PATH
    from basic_pitch.inference import predict

    path = tmp_path / "clip.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    onnx = Path(str(ICASSP_2022_MODEL_PATH)).with_suffix(".onnx")
    return predict(path, onnx, onset_threshold=ONSET_THRESHOLD, frame_threshold=FRAME_THRESHOLD,
                   minimum_note_length=MINIMUM_NOTE_LENGTH_MS)


@pytest.mark.parametrize("rate", [22_050, 44_100])
def test_basic_pitch_equals_predict(music, tmp_path: Path, rate: int) -> None:
    audio = melody(rate)
    served = run(music, "transcription", audio, rate)
    output, _, events = _basic_pitch_reference(audio, rate, tmp_path)
    for key in ("note", "onset", "contour"):
        assert served[key].shape == output[key].shape
        np.testing.assert_allclose(served[key], output[key], atol=ATOL, rtol=0)
    notes = run(music, "transcribe", audio, rate)
    assert notes == notes_from_events(refine_events(events, output))
    pitches = {n.pitch for n in notes}
    assert {60, 64, 67} <= pitches, pitches  # the arpeggio and chord are really heard


def test_basic_pitch_notes_are_well_formed(music) -> None:
    notes = run(music, "transcribe", melody(16_000), 16_000)
    assert notes and all(isinstance(n, NoteEvent) for n in notes)
    assert all(0 <= n.start_seconds < n.end_seconds <= 4.1 and 1 <= n.velocity <= 127 for n in notes)


# ---- musicnn ------------------------------------------------------------------------------------------------

def test_musicnn_equals_extractor(music, tiny_repository: Path) -> None:
    """musicnn's own extractor (TensorFlow, run by the exporter) on the reference clip vs the served model on the
    same clip, preprocessing included."""
    from grym_synth.inference.export.music_musicnn import REFERENCE_CLIP, REFERENCE_DIR, REFERENCE_NPZ

    folder = tiny_repository / "musicnn" / REFERENCE_DIR
    reference = np.load(folder / REFERENCE_NPZ)
    clip, rate = sf.read(folder / REFERENCE_CLIP, dtype="float32")
    served = run(music, "taggram", clip, rate)
    np.testing.assert_allclose(served["taggram"], reference["taggram"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(served["embedding"], reference["embedding"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(served["embedding"][0], reference["extractor_penultimate"][0], atol=ATOL, rtol=0)
    # the extractor's features["timbral"], averaged over each patch's 187 frames (by the exporter, in TensorFlow)
    np.testing.assert_allclose(served["timbre"], reference["timbre"], atol=ATOL, rtol=0)
    assert served["timbre"].shape == (len(reference["taggram"]), 408)
    # MTT_vgg, the second tagger in the same graph: the extractor's model="MTT_vgg" taggram
    np.testing.assert_allclose(served["vgg_taggram"], reference["vgg_taggram"], atol=ATOL, rtol=0)
    tagging = run(music, "tag", clip, rate)
    both = (reference["taggram"].mean(axis=0) + reference["vgg_taggram"].mean(axis=0)) / 2
    np.testing.assert_allclose(tagging.scores, both, atol=ATOL, rtol=0)
    # the harmonic part's scores: the same ONNX graph in-process on musicnn_patch_pair's harmonic patches
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_repository / "musicnn" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    _, harmonic = musicnn_patch_pair(resample(clip, rate, 16_000))
    taggram, vgg = session.run(["taggram", "vgg_taggram"], {"patches": harmonic})
    np.testing.assert_allclose(tagging.harmonic_scores, (taggram.mean(axis=0) + vgg.mean(axis=0)) / 2, atol=ATOL,
                               rtol=0)
    assert not np.allclose(tagging.harmonic_scores, tagging.scores, atol=1e-3)  # the filtering changed what is heard
    np.testing.assert_allclose(tagging.embedding, reference["timbre"].mean(axis=0), atol=ATOL, rtol=0)
    assert tagging.scores.dtype == np.float32 and tagging.embedding.shape == (408,)


def test_musicnn_hears_music_not_speech(music) -> None:
    tagging = run(music, "tag", melody(16_000), 16_000)
    top = [tagging.labels[i] for i in np.argsort(tagging.scores)[::-1][:10]]
    assert not {"vocal", "vocals", "singing", "male vocal", "female vocal"} & set(top[:3]), top
    assert float(tagging.scores.max()) > 0.2 and np.all((tagging.scores >= 0) & (tagging.scores <= 1))


# ---- torchcrepe ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [16_000, 22_050])
def test_crepe_equals_torchcrepe_predict(music, rate: int) -> None:
    import torch

    from grym_synth.inference.export.music import import_torchcrepe

    torchcrepe = import_torchcrepe()
    audio = np.concatenate([harmonic(220.0, 1.0, rate), harmonic(330.0, 1.0, rate)])
    np.random.seed(0)  # torchcrepe dithers decoded pitch by +-10 cents with numpy's global generator
    times, f0, periodicity = run(music, "pitch", audio, rate)
    np.random.seed(0)
    want_f0, want_p = torchcrepe.predict(torch.from_numpy(audio)[None], rate, rate // 100, 50.0, 2006.0, "tiny",
                                         return_periodicity=True, batch_size=None, device="cpu")
    np.testing.assert_allclose(f0, want_f0.numpy().reshape(-1), atol=ATOL, rtol=0)
    np.testing.assert_allclose(periodicity, want_p.numpy().reshape(-1), atol=ATOL, rtol=0)
    assert times.shape == f0.shape and times[1] == pytest.approx(0.01, abs=1e-3)
    voiced = periodicity > 0.5
    cents = 1200 * np.abs(np.log2(f0[voiced][: voiced.sum() // 3] / 220.0))
    assert np.median(cents) < 50  # a 220 Hz note is tracked as 220 Hz


# ---- silero-vad ---------------------------------------------------------------------------------------------

def test_silero_equals_get_speech_timestamps(music) -> None:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    audio = speech_like()
    model = load_silero_vad(onnx=True)
    want = get_speech_timestamps(torch.from_numpy(audio), model)
    assert want, "the reference finds the speech"
    probs = run(music, "speech_probabilities", audio, 16_000)
    model.reset_states()
    stream = [model(torch.from_numpy(audio[i:i + 512]) if i + 512 <= audio.size else
                    torch.nn.functional.pad(torch.from_numpy(audio[i:]), (0, i + 512 - audio.size)), 16_000).item()
              for i in range(0, audio.size, 512)]
    np.testing.assert_allclose(probs, np.asarray(stream, np.float32), atol=ATOL, rtol=0)
    spans = run(music, "voice", audio, 16_000)
    assert spans == [(s["start"] / 16_000, s["end"] / 16_000) for s in want]


def test_silero_finds_no_speech_in_music(music) -> None:
    assert run(music, "voice", melody(16_000), 16_000) == []


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "ten_samples", "silence", "noise", "short"])
def test_bad_input_gives_empty_answers(music, kind: str) -> None:
    rate = 16_000
    audio = {
        "empty": np.zeros(0, np.float32),
        "ten_samples": np.full(10, 0.1, np.float32),
        "silence": np.zeros(3 * rate, np.float32),
        "noise": (np.random.default_rng(0).standard_normal(3 * rate) * 0.05).astype(np.float32),
        "short": harmonic(440.0, 0.2, rate),
    }[kind]
    notes = run(music, "transcribe", audio, rate)
    spans = run(music, "voice", audio, rate)
    times, f0, periodicity = run(music, "pitch", audio, rate)
    tagging = run(music, "tag", audio, rate)
    assert times.shape == f0.shape == periodicity.shape
    assert spans == []
    assert tagging.scores.shape == (50,) and tagging.embedding.shape == (408,)
    assert np.all(np.isfinite(tagging.scores)) and np.all((tagging.scores >= 0) & (tagging.scores <= 1))
    if kind in ("empty", "silence"):
        assert not tagging.scores.any() and not tagging.embedding.any()
    if kind in ("empty", "ten_samples", "silence"):
        assert notes == []
    if kind == "noise":
        assert len(notes) < 5
    if kind == "short":
        assert all(n.end_seconds <= 0.25 for n in notes)


@pytest.fixture(scope="module")
def ten_minutes() -> np.ndarray:
    return np.tile(melody(16_000), 150)  # 600 s at 16 kHz


@pytest.mark.parametrize("call", ["transcribe", "voice", "pitch", "tag"])
def test_ten_minutes(music, ten_minutes: np.ndarray, call: str) -> None:
    """A 10-minute file is cut into many requests and answered in full (one test per model: their costs show)."""
    if call == "transcribe":
        notes = run(music, call, ten_minutes, 16_000)
        assert notes[-1].end_seconds > 590 and len(notes) > 150 * 5
    elif call == "voice":
        assert run(music, call, ten_minutes, 16_000) == []
    elif call == "pitch":  # 12,001 frames at a 50 ms hop (10 ms: 60,001, ~2x real time on 2 cores)
        times, f0, _ = run(music, call, ten_minutes, 16_000, hop_seconds=0.05)
        assert times.size == f0.size == 1 + ten_minutes.size // 800 and times[-1] == pytest.approx(600.0)
    else:
        assert float(run(music, call, ten_minutes, 16_000).scores.max()) > 0.2


def test_caller_errors_are_value_errors(music) -> None:
    with pytest.raises(ValueError, match="NaN"):
        run(music, "transcribe", np.array([0.0, np.nan], np.float32), 16_000)
    with pytest.raises(ValueError, match="mono"):
        run(music, "voice", np.zeros((2, 100), np.float32), 16_000)
    with pytest.raises(ValueError, match="positive"):
        run(music, "pitch", np.zeros(100, np.float32), 0)

