"""Audio analysis with the Triton-served Wav2Vec2 model (the "Wav2Vec2 adapter" of the seed design).

The service works in numpy and :mod:`grym_synth.core.audio` types only; the gRPC layer converts to and from protobuf.
Long audio is analysed in fixed-length windows: equal lengths batch together in Triton (the model batches only
exact-length requests, because Wav2Vec2-base normalises over time and zero-padding would change its features),
and a window bounds the memory one request can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from grym_synth.core.audio import TARGET_RATE_HZ, Audio, decode_pcm, to_mono_16k, validate
from grym_synth.core.cache import LruCache, digest
from grym_synth.core.errors import InvalidArgument, OutOfRange, ResourceExhausted
from grym_synth.analysis.music import Detail, MusicAnalyzer, MusicDescription, merge
from grym_synth.inference.export.wav2vec2 import num_frames
from grym_synth.memory.music_index import MusicFields
from grym_synth.core.metrics import Metrics
from grym_synth.memory.store import PatternRecord, PatternStore, validate_tags
from grym_synth.core.resilience import BudgetHold, MemoryBudget
from grym_synth.inference.triton_client import TritonClient

log = logging.getLogger(__name__)

MODEL = "wav2vec2"
INPUT, FEATURES, EMBEDDING = "audio", "features", "embedding"


@dataclass
class Analysis:
    """What one clip (or window) analysis produced."""

    frames: int
    embedding: np.ndarray
    duration_s: float
    features: np.ndarray | None = None
    pattern: PatternRecord | None = None
    music: MusicDescription | None = None


@dataclass
class WindowResult:
    index: int
    start_s: float
    end_s: float
    analysis: Analysis


@dataclass
class StreamSummary:
    windows: int
    duration_s: float
    frames: int
    embedding: np.ndarray
    pattern: PatternRecord | None = None
    music: MusicDescription | None = None


@dataclass
class StreamConfig:
    sample_rate_hz: int
    channels: int
    encoding: str
    include_features: bool = False
    store: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    source: str = "stream"
    music_detail: Detail = Detail.SUMMARY


def music_fields(music: MusicDescription | None) -> MusicFields | None:
    """What pattern memory keeps of a description (no notes, no beats)."""
    if music is None:
        return None
    return MusicFields(tempo_bpm=music.tempo_bpm, tempo_confidence=music.tempo_confidence, key=music.key,
                       key_confidence=music.key_confidence,
                       tags=[(t.label, t.score, int(t.category)) for t in music.tags],
                       vocal_segments=list(music.vocal_segments),
                       embedding=music.embedding.tolist() if music.embedding is not None else None,
                       models=music.models, tag_scores=dict(music.tag_scores))


class AnalysisService:
    """Runs Wav2Vec2 on Triton and keeps the results in pattern memory when asked."""

    def __init__(self, triton: TritonClient, store: PatternStore, *, profile: str, min_samples: int,
                 max_audio_s: float, max_stream_s: float, window_s: float, budget: MemoryBudget,
                 metrics: Metrics | None = None, cache: LruCache[Analysis] | None = None,
                 max_stream_buffer_bytes: int = 64 * 1024 * 1024, music: MusicAnalyzer | None = None) -> None:
        self.triton = triton
        self.music = music  # None: no music description (signal analysis and the music models are off)
        self.max_stream_buffer_bytes = max_stream_buffer_bytes
        self.store = store
        self.profile = profile
        self.min_samples = min_samples
        self.max_audio_s = max_audio_s
        self.max_stream_s = max_stream_s
        self.window_samples = int(window_s * TARGET_RATE_HZ)
        self.budget = budget
        self.metrics = metrics
        self.cache = cache

    def validate(self, samples: np.ndarray, what: str = "audio") -> Audio:
        return validate(samples, min_samples=self.min_samples, max_seconds=self.max_audio_s, what=what)

    async def run_model(self, audio: Audio, *, include_features: bool, deadline: float | None,
                        request_id: str) -> Analysis:
        """Wav2Vec2 on Triton, answered from the cache when the same samples were analysed before."""
        key = digest(audio.samples.tobytes())
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None and (cached.features is not None or not include_features):
            return Analysis(frames=cached.frames, embedding=cached.embedding, duration_s=cached.duration_s,
                            features=cached.features if include_features else None)
        analysis = await self._infer(audio, include_features=include_features, deadline=deadline,
                                     request_id=request_id)
        if self.cache is not None:
            size = analysis.embedding.nbytes + (analysis.features.nbytes if analysis.features is not None else 0)
            self.cache.put(key, analysis, size)
        return analysis

    async def _infer(self, audio: Audio, *, include_features: bool, deadline: float | None,
                     request_id: str) -> Analysis:
        outputs = [EMBEDDING, FEATURES] if include_features else [EMBEDDING]
        # The features tensor is ~frames x hidden floats: count it against the budget with the audio.
        with self.budget.reserve(audio.nbytes * (4 if include_features else 1), "AnalyzeAudio"):
            result = await self.triton.infer(MODEL, {INPUT: audio.samples[None, :]}, outputs, deadline=deadline,
                                             request_id=request_id)
        embedding = np.asarray(result[EMBEDDING], dtype=np.float32)[0]
        features = np.asarray(result[FEATURES], dtype=np.float32)[0] if include_features else None
        frames = int(features.shape[0]) if features is not None else num_frames(len(audio.samples))
        return Analysis(frames=frames, embedding=embedding, duration_s=audio.duration_s, features=features)

    async def describe_music(self, samples: np.ndarray, detail: Detail = Detail.SUMMARY, *,
                             deadline: float | None = None) -> MusicDescription | None:
        """The music description of 16 kHz mono samples (None when the server runs without it or detail is
        NONE)."""
        if self.music is None or detail == Detail.NONE:
            return None
        return await self.music.describe(samples, TARGET_RATE_HZ, detail=detail, deadline=deadline)

    async def analyze(self, audio: Audio, *, include_features: bool, store: bool, tags: Mapping[str, str],
                      source: str, metadata: Mapping[str, str] | None, deadline: float | None,
                      request_id: str, music_detail: Detail = Detail.SUMMARY) -> Analysis:
        """Analyse one clip (Wav2Vec2 and the music description concurrently); when ``store`` is set the pattern
        is written only after the models succeeded, so a failure never leaves a half-written pattern. A stored
        pattern keeps the summary even when the request asked for no description."""
        tags = validate_tags(tags)
        detail = Detail.SUMMARY if store and music_detail == Detail.NONE else music_detail
        analysis, music = await asyncio.gather(
            self.run_model(audio, include_features=include_features, deadline=deadline, request_id=request_id),
            self.describe_music(audio.samples, detail, deadline=deadline))
        analysis.music = music if music_detail != Detail.NONE else None
        if store:
            analysis.pattern = await self.store.insert(analysis.embedding, duration_s=analysis.duration_s,
                                                       tags=tags, source=source, metadata=metadata,
                                                       audio=audio.samples,  # the 16 kHz mono audio analysed
                                                       music=music_fields(music))
            if self.metrics:
                self.metrics.patterns_stored.labels(source).inc()
        return analysis

    async def analyze_stream(self, config: StreamConfig, chunks: AsyncIterator[bytes], *, deadline: float | None,
                             request_id: str) -> AsyncIterator[WindowResult | StreamSummary]:
        """Buffer PCM chunks at the input rate, analyse every complete window, then summarise the stream.

        Each window is resampled independently (polyphase filter); a tail shorter than one feature frame's
        receptive field (25 ms) is too short for Wav2Vec2 and is not analysed.

        Memory: the stream buffers at most one window at the input rate plus one message, and every byte it holds
        is charged to the in-flight memory budget as it arrives (twice while a window is being cut out of the
        buffer); a config whose window alone exceeds ``max_stream_buffer_bytes``, or growth past the budget, is
        RESOURCE_EXHAUSTED, so idle streams cannot hold more memory than the budget.
        """
        tags = validate_tags(config.tags)
        in_window = max(1, int(round(self.window_samples * config.sample_rate_hz / TARGET_RATE_HZ)))
        frame_bytes = 4 * max(1, config.channels)  # float32 per channel once decoded
        window_bytes = in_window * frame_bytes
        if window_bytes > self.max_stream_buffer_bytes:
            raise ResourceExhausted(
                f"a {self.window_samples / TARGET_RATE_HZ:g} s analysis window at {config.sample_rate_hz} Hz x "
                f"{config.channels} channel(s) needs {window_bytes} bytes of buffer; a stream may buffer at most "
                f"{self.max_stream_buffer_bytes} (max_stream_buffer_bytes): lower sample_rate_hz or channels")
        with self.budget.hold("StreamAnalyze") as held:
            windows = self._windows(config, chunks, in_window, frame_bytes, held, tags, deadline=deadline,
                                    request_id=request_id)
            async with contextlib.aclosing(windows) as items:
                async for item in items:
                    yield item

    async def _windows(self, config: StreamConfig, chunks: AsyncIterator[bytes], in_window: int, frame_bytes: int,
                       held: BudgetHold, tags: Mapping[str, str], *, deadline: float | None,
                       request_id: str) -> AsyncIterator[WindowResult | StreamSummary]:
        pending: list[np.ndarray] = []
        pending_len = 0
        total_in = 0
        windows: list[WindowResult] = []
        max_in = int(self.max_stream_s * config.sample_rate_hz)
        kept: list[np.ndarray] = []  # with config.store: the analysed 16 kHz mono windows, stored with the pattern

        async def flush(samples: np.ndarray) -> WindowResult | None:
            mono = to_mono_16k(samples, config.sample_rate_hz)
            if len(mono) < self.min_samples:
                return None
            audio = validate(mono, min_samples=self.min_samples, max_seconds=float("inf"),
                             what=f"window {len(windows)}")
            start = sum(w.analysis.duration_s for w in windows)
            detail = Detail.SUMMARY if config.store and config.music_detail == Detail.NONE else config.music_detail
            analysis, analysis.music = await asyncio.gather(
                self.run_model(audio, include_features=config.include_features, deadline=deadline,
                               request_id=request_id),
                self.describe_music(audio.samples, detail, deadline=deadline))
            window = WindowResult(len(windows), start, start + analysis.duration_s, analysis)
            windows.append(window)
            if config.store:  # kept for the pattern's stored audio, as 16-bit (half the float32 size)
                kept.append((np.clip(audio.samples, -1.0, 1.0) * 32767).astype(np.int16))
            return window

        chunk: bytes | None = None
        samples = joined = rest = None
        try:
            async for chunk in chunks:
                samples, _ = decode_pcm(chunk, config.sample_rate_hz, config.channels, config.encoding)
                if not np.isfinite(samples).all():
                    raise InvalidArgument(f"audio chunk at {total_in / config.sample_rate_hz:.2f} s contains NaN or "
                                          "infinite samples")
                total_in += len(samples)
                if total_in > max_in:
                    raise OutOfRange(f"stream exceeds the server's maximum of {self.max_stream_s:.0f} s")
                held.resize((pending_len + len(samples)) * frame_bytes)
                pending.append(samples)
                pending_len += len(samples)
                while pending_len >= in_window:
                    held.resize(2 * pending_len * frame_bytes)  # the pieces and their concatenation
                    joined = np.concatenate(pending)
                    rest = joined[in_window:].copy()  # a copy: a view would keep the whole window alive
                    pending, pending_len = ([rest] if len(rest) else []), len(rest)
                    held.resize(len(joined) * frame_bytes)
                    if (w := await flush(joined[:in_window])) is not None:
                        yield w
                    joined = None
                    held.resize(pending_len * frame_bytes)
            if pending_len:
                held.resize(2 * pending_len * frame_bytes)
                if (w := await flush(np.concatenate(pending))) is not None:
                    yield w
        finally:
            # Free the buffer with its charge, also on an error: the traceback keeps this frame (and with it
            # the buffer) alive until the error is reported, or until the garbage collector breaks the cycle.
            pending.clear()
            chunk = samples = joined = rest = None
            held.release()
        if not windows:
            raise InvalidArgument(
                f"the stream held {total_in} sample(s); at least {self.min_samples} at 16 kHz are needed"
                if total_in else "the stream carried no audio after its config message"
            )
        frames = sum(w.analysis.frames for w in windows)
        pooled = sum(w.analysis.embedding * w.analysis.frames for w in windows) / max(frames, 1)
        summary = StreamSummary(len(windows), windows[-1].end_s, frames, pooled.astype(np.float32))
        described = [(w.start_s, w.analysis.music) for w in windows if w.analysis.music is not None]
        music = merge(described) if described else None
        summary.music = music if config.music_detail != Detail.NONE else None
        if config.store:
            stored = np.concatenate(kept).astype(np.float32) / 32767 if kept else None
            kept.clear()
            summary.pattern = await self.store.insert(summary.embedding, duration_s=summary.duration_s, tags=tags,
                                                      source=config.source or "stream", metadata=None, audio=stored,
                                                      music=music_fields(music))
            stored = None
            if self.metrics:
                self.metrics.patterns_stored.labels(config.source or "stream").inc()
        yield summary

