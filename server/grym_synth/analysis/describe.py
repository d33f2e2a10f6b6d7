"""Audio described in words: the ``AudioLanguageModel`` slot and its descriptor-based implementation.

An audio-language model (GAMA, Qwen2-Audio class) would hear the audio and write the caption. None is served
yet (no weights can be fetched here), so :class:`DescriptorCaptioner` writes the caption from the music
description the trained models and signal analysis produced ("A minor, 110 BPM, guitar and drums, no vocals").
A served model plugs in by implementing :class:`AudioLanguageModel` (its ``describe`` gets the 16 kHz samples
and the description, which it may use as a prompt hint) and being passed to :class:`Describer`; see
docs/music_analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from grym_synth.analysis.music import Category, MusicDescription

MIN_TEMPO_CONFIDENCE_WORDS = 0.3  # a tempo below this confidence is said "about"
MIN_TAG_SCORE = 0.1               # tags scoring lower are not named
MAX_INSTRUMENTS = 3
MIN_VOCAL_FRACTION = 0.1          # vocals over less of the audio than this are "no vocals"


@dataclass(frozen=True)
class Caption:
    text: str
    describer: str


class AudioLanguageModel(Protocol):
    """Writes a caption for audio. ``audio`` is 16 kHz mono float32 (None for a stored pattern whose audio is not
    kept); ``music`` is what the analysis found."""

    name: str

    async def describe(self, audio: np.ndarray | None, music: MusicDescription) -> Caption: ...


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


class DescriptorCaptioner:
    """The caption from the descriptors: key, tempo, instruments, genre/mood, vocals."""

    name = "descriptors"

    async def describe(self, audio: np.ndarray | None, music: MusicDescription) -> Caption:
        return Caption(caption_text(music), self.name)


def caption_text(music: MusicDescription) -> str:
    parts: list[str] = []
    if music.key:
        parts.append(music.key)
    if music.tempo_bpm > 0:
        about = "about " if music.tempo_confidence < MIN_TEMPO_CONFIDENCE_WORDS else ""
        parts.append(f"{about}{music.tempo_bpm:.0f} BPM")
    named = [t for t in music.tags if t.score >= MIN_TAG_SCORE]
    instruments = [t.label for t in named if t.category == Category.INSTRUMENT
                   and t.label not in ("vocal", "vocals", "voice", "singing", "male", "female", "man", "woman")]
    if instruments:
        parts.append(_join(instruments[:MAX_INSTRUMENTS]))
    style = [t.label for t in named if t.category in (Category.GENRE, Category.MOOD)][:2]
    if style:
        parts.append(_join(style))
    if music.tags or music.vocal_segments:
        voiced = sum(b - a for a, b in music.vocal_segments)
        parts.append("with vocals" if music.duration_s and voiced >= MIN_VOCAL_FRACTION * music.duration_s
                     else "no vocals")
    if not parts:
        return "No recognisable music (silence, noise or too short to judge)"
    text = ", ".join(parts)
    return text[0].upper() + text[1:]


class Describer:
    """DescribeAudio's logic: a caption from the configured audio-language model (descriptors by default)."""

    def __init__(self, model: AudioLanguageModel | None = None) -> None:
        self.model: AudioLanguageModel = model or DescriptorCaptioner()

    async def describe(self, audio: np.ndarray | None, music: MusicDescription) -> Caption:
        return await self.model.describe(audio, music)
