"""Text-to-audio with the Triton-served AudioLDM pipeline (the "AudioLDM service" of the seed design).

The denoising loop runs inside Triton (the decoupled ``audioldm`` model calls the UNet once per step, so steps
of concurrent generations batch together); this service validates the request before any model runs, relays
the per-step progress, analyses the result with Wav2Vec2, and stores it as a pattern whose metadata (prompt,
seed, parameters) regenerates it exactly. A pattern is written only after everything else succeeded, so a
failure never leaves half a record.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from server.analysis import AnalysisService
from server.audio import TARGET_RATE_HZ, encode_wav, to_mono_16k
from server.cache import LruCache, digest
from server.errors import DownstreamError, InvalidArgument, Unavailable
from server.metrics import Metrics
from server.patterns import PatternRecord, PatternStore, validate_tags
from server.triton_client import TritonClient

log = logging.getLogger(__name__)

PIPELINE_MODEL = "audioldm"
COMPONENT_MODELS = ("clap_text_encoder", "unet", "vae_decoder", "vocoder")
SCHEDULERS = ("ddim", "dpm", "euler", "pndm", "lms")
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_DURATION_S = 10, 2.5, 5.0
WAV_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class GenerateParams:
    """A validated generation request."""

    prompt: str
    negative_prompt: str = ""
    duration_s: float = DEFAULT_DURATION_S
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    scheduler: str = "ddim"

    def metadata(self, seed: int, profile: str) -> dict[str, str]:
        """What a pattern keeps so the audio can be regenerated bit for bit."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": str(seed),
                "steps": str(self.steps), "guidance_scale": repr(self.guidance_scale),
                "duration_s": repr(self.duration_s), "scheduler": self.scheduler, "model": PIPELINE_MODEL,
                "profile": profile}


@dataclass
class Progress:
    step: int
    total_steps: int


@dataclass
class AudioData:
    wav_chunks: list[bytes]
    sample_rate_hz: int


@dataclass
class Generated:
    seed: int
    duration_s: float
    sample_rate_hz: int
    frames: int
    embedding: np.ndarray
    cached: bool
    pattern: PatternRecord | None = None
    samples: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))


def validate(prompt: str, negative_prompt: str, duration_s: float, steps: int, guidance_scale: float | None,
             seed: int | None, scheduler: str, max_duration_s: float) -> GenerateParams:
    """Every range, with the field name in the message; raised before any model runs."""
    if not prompt.strip():
        raise InvalidArgument("prompt is empty: describe the sound to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if len(negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"negative_prompt is {len(negative_prompt)} characters; at most {MAX_PROMPT_CHARS}")
    duration = duration_s or DEFAULT_DURATION_S
    if not (math.isfinite(duration) and 0 < duration <= max_duration_s):
        raise InvalidArgument(f"duration_seconds must be in (0, {max_duration_s:g}], got {duration_s}")
    steps = steps or DEFAULT_STEPS
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(f"steps must be 1..{MAX_STEPS}, got {steps}")
    guidance = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise InvalidArgument(f"guidance_scale must be in [0, {MAX_GUIDANCE:g}], got {guidance_scale}")
    if seed is not None and seed < 0:
        raise InvalidArgument(f"seed must be >= 0, got {seed}")
    if scheduler not in SCHEDULERS:
        raise InvalidArgument(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    return GenerateParams(prompt=prompt, negative_prompt=negative_prompt, duration_s=float(duration), steps=steps,
                          guidance_scale=float(guidance), seed=seed, scheduler=scheduler)


def wav_chunks(samples: np.ndarray, rate: int) -> list[bytes]:
    data = encode_wav(samples, rate)
    return [data[i: i + WAV_CHUNK_BYTES] for i in range(0, len(data), WAV_CHUNK_BYTES)]


class GenerationService:
    """Generate: AudioLDM on Triton -> audio -> Wav2Vec2 features -> pattern memory."""

    def __init__(self, triton: TritonClient, analysis: AnalysisService, store: PatternStore, *, profile: str,
                 max_duration_s: float, cache: LruCache[tuple[np.ndarray, int]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.triton = triton
        self.analysis = analysis
        self.store = store
        self.profile = profile
        self.max_duration_s = max_duration_s
        self.cache = cache
        self.metrics = metrics
        self._ready_until = 0.0

    async def check_models(self) -> None:
        """UNAVAILABLE naming the first model that is not loaded, before any model runs (cached for 2 s)."""
        if time.monotonic() < self._ready_until:
            return
        models = (PIPELINE_MODEL, *COMPONENT_MODELS)
        ready = await asyncio.gather(*(self.triton.model_ready(m) for m in models))
        missing = [m for m, ok in zip(models, ready) if not ok]
        if missing:
            raise Unavailable(f"triton:{missing[0]}", f"model(s) {', '.join(missing)} not loaded in Triton at "
                              f"{self.triton.url}; generation needs {', '.join(models)}")
        self._ready_until = time.monotonic() + 2.0

    def _cache_key(self, p: GenerateParams) -> str | None:
        if p.seed is None:
            return None  # a random seed is not a deterministic request
        return digest(self.profile, p.prompt, p.negative_prompt, repr(p.duration_s), str(p.steps),
                      repr(p.guidance_scale), str(p.seed), p.scheduler)

    async def _run_pipeline(self, p: GenerateParams, *, deadline: float | None,
                            request_id: str) -> AsyncIterator[Progress | tuple[np.ndarray, int, int]]:
        inputs: dict[str, np.ndarray] = {
            "prompt": np.array([p.prompt.encode()], dtype=np.object_),
            "steps": np.array([p.steps], dtype=np.int32),
            "guidance_scale": np.array([p.guidance_scale], dtype=np.float32),
            "duration_s": np.array([p.duration_s], dtype=np.float32),
            "scheduler": np.array([p.scheduler.encode()], dtype=np.object_),
        }
        if p.negative_prompt:
            inputs["negative_prompt"] = np.array([p.negative_prompt.encode()], dtype=np.object_)
        if p.seed is not None:
            inputs["seed"] = np.array([p.seed], dtype=np.int64)
        async for out in self.triton.stream(PIPELINE_MODEL, inputs, (), deadline=deadline, request_id=request_id):
            if "waveform" in out:
                seed = int(np.asarray(out["seed"]).reshape(-1)[0]) if "seed" in out else int(p.seed or 0)
                rate = int(np.asarray(out["sample_rate"]).reshape(-1)[0])
                yield np.asarray(out["waveform"], dtype=np.float32).reshape(-1), rate, seed
            elif "step" in out:
                yield Progress(int(np.asarray(out["step"]).reshape(-1)[0]),
                               int(np.asarray(out["total_steps"]).reshape(-1)[0]))

    async def synthesize(self, p: GenerateParams, *, deadline: float | None,
                         request_id: str) -> AsyncIterator[Progress | tuple[np.ndarray, int, bool]]:
        """Progress events, then (16 kHz samples, seed, cached): the audio alone, from the cache when this exact
        deterministic request ran before. Shared by Generate and the workflow's generate/vary steps."""
        key = self._cache_key(p)
        hit = self.cache.get(key) if self.cache is not None and key else None
        if hit is not None:
            yield hit[0], hit[1], True
            return
        await self.check_models()
        result = None
        async for item in self._run_pipeline(p, deadline=deadline, request_id=request_id):
            if isinstance(item, Progress):
                yield item
            else:
                result = item
        if result is None:
            raise DownstreamError(f"triton:{PIPELINE_MODEL}", "the stream ended without a waveform")
        waveform, rate, seed = result
        samples = to_mono_16k(waveform[:, None], rate) if rate != TARGET_RATE_HZ else waveform
        if self.cache is not None and key:
            self.cache.put(key, (samples, seed), samples.nbytes)
        yield samples, seed, False

    async def generate(self, p: GenerateParams, *, store: bool, tags: Mapping[str, str], deadline: float | None,
                       request_id: str) -> AsyncIterator[Progress | AudioData | Generated]:
        tags = validate_tags(tags)
        samples, seed, cached = np.zeros(0, np.float32), 0, False
        async for item in self.synthesize(p, deadline=deadline, request_id=request_id):
            if isinstance(item, Progress):
                yield item
            else:
                samples, seed, cached = item
        yield AudioData(wav_chunks(samples, TARGET_RATE_HZ), TARGET_RATE_HZ)
        analysis = await self.analysis.run_model(self.analysis.validate(samples, "generated audio"),
                                                 include_features=False, deadline=deadline, request_id=request_id)
        done = Generated(seed=seed, duration_s=len(samples) / TARGET_RATE_HZ, sample_rate_hz=TARGET_RATE_HZ,
                         frames=analysis.frames, embedding=analysis.embedding, cached=cached, samples=samples)
        if store:
            done.pattern = await self.store.insert(analysis.embedding, duration_s=done.duration_s, tags=tags,
                                                   source="generate", metadata=p.metadata(seed, self.profile))
            if self.metrics:
                self.metrics.patterns_stored.labels("generate").inc()
        yield done
