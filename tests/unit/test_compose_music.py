"""Compose's music descriptions (pure logic, with a stand-in analysis): a description is extra, so its failure or a
spent deadline leaves it empty instead of failing the piece; what is kept has no notes, beats or tag scores; and
the piece's float samples reach the encoder of a non-16-bit format."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from grym_synth.analysis.music import Category, Detail, MusicDescription, Note, Tag
from grym_synth.api import convert
from grym_synth.compose.service import describe, music_record, piece_data
from grym_synth.core.audio import AudioFormat
from grym_synth.core.errors import Cancelled, Unavailable

DESC = MusicDescription(tempo_bpm=120.0, tempo_confidence=0.9, beats_s=[0.5, 1.0], key="A minor", key_confidence=0.8,
                        notes=[Note(57, 0.0, 0.5, 90)], tags=[Tag("ambient", 0.7, Category.GENRE)],
                        vocal_segments=[(1.0, 2.0)], models="librosa", tag_scores={"ambient": 0.7, "rock": 0.1})


class Analysis:
    """Stands in for AnalysisService.describe_music: answers, fails, or takes its time."""

    def __init__(self, outcome: object, delay_s: float = 0.0) -> None:
        self.outcome, self.delay_s, self.calls = outcome, delay_s, 0

    async def describe_music(self, samples: np.ndarray, detail: Detail = Detail.SUMMARY, *,
                             deadline: float | None = None) -> MusicDescription | None:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome  # type: ignore[return-value]


def test_music_record_keeps_the_summary_only() -> None:
    record = music_record(DESC)
    assert record is not None and "tag_scores" not in record and "notes" not in record and "beats_s" not in record
    assert record["tempo_bpm"] == 120.0 and record["key"] == "A minor"
    assert record["tags"] == [("ambient", 0.7, int(Category.GENRE))]
    assert music_record(None) is None
    proto = convert.music_record(record)
    assert proto.key == "A minor" and proto.tags[0].label == "ambient" and not proto.notes
    assert convert.music_record({**record, "unknown_later_field": 1}).tempo_bpm == 120.0
    assert convert.music_record(None) is None and convert.music_record({}) is None


async def test_describe_returns_the_record() -> None:
    got = await describe(Analysis(DESC), np.zeros(16000, np.float32), None, "test")  # type: ignore[arg-type]
    assert got == music_record(DESC)


@pytest.mark.parametrize("error", [Unavailable("triton:musicnn", "down"), ValueError("librosa broke")])
async def test_a_failed_description_is_empty_not_an_error(error: Exception) -> None:
    assert await describe(Analysis(error), np.zeros(16000, np.float32), None, "test") is None  # type: ignore[arg-type]


SILENCE = np.zeros(16000, np.float32)


async def test_the_deadline_bounds_the_description() -> None:
    analysis: Any = Analysis(DESC, delay_s=5.0)
    started = time.monotonic()
    assert await describe(analysis, SILENCE, time.monotonic() + 0.2, "x") is None
    assert time.monotonic() - started < 2.0
    spent: Any = Analysis(DESC)
    assert await describe(spent, SILENCE, time.monotonic() - 1, "x") is None
    assert spent.calls == 0


async def test_cancellation_is_not_swallowed() -> None:
    with pytest.raises(Cancelled):
        await describe(Analysis(Cancelled("client went away")), SILENCE, None, "x")  # type: ignore[arg-type]


def test_the_piece_keeps_float_samples_for_other_formats() -> None:
    rate = 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate) + 1e-5).astype(np.float32)
    wav16 = piece_data(x, rate, AudioFormat.WAV_PCM16)
    assert wav16.wav_chunks and sf.read(io.BytesIO(b"".join(wav16.wav_chunks)))[0].shape == (rate,)
    data = piece_data(x, rate, AudioFormat.WAV_PCM24)
    assert not data.wav_chunks and data.samples is not None
    chunks = convert.audio_data_chunks(data, AudioFormat.WAV_PCM24)
    y, got_rate = sf.read(io.BytesIO(b"".join(c.wav_data for c in chunks)), dtype="float64")
    assert got_rate == rate and sf.info(io.BytesIO(chunks[0].wav_data)).subtype == "PCM_24"
    assert np.max(np.abs(y - x)) < 2 ** -22  # 24-bit precision, not the 16-bit file's 2**-16
