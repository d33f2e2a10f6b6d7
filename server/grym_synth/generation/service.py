"""Text-to-audio with the Triton-served AudioLDM pipeline (the "AudioLDM service" of the seed design).

The denoising loop runs inside Triton (the decoupled ``audioldm`` model calls the UNet once per step, so steps
of concurrent generations batch together); this service validates the request before any model runs, relays
the per-step progress, analyses the result with Wav2Vec2, and stores it as a pattern whose metadata (prompt,
seed, parameters) regenerates it exactly. A pattern is written only after everything else succeeded, so a
failure never leaves half a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from grym_synth.analysis.music import MusicDescription
from grym_synth.analysis.service import AnalysisService, music_fields
from grym_synth.core.audio import TARGET_RATE_HZ, decode_file, encode_wav, to_mono_16k
from grym_synth.core.cache import LruCache, digest
from grym_synth.core.errors import DownstreamError, InvalidArgument, ResourceExhausted, Unavailable
from grym_synth.core.metrics import Metrics
from grym_synth.memory.store import PatternRecord, PatternStore, check_pattern_id, validate_tags
from grym_synth.inference.export.audioldm import DEFAULT_SCHEDULER
from grym_synth.inference.export.audioldm import SCHEDULERS as EXPORTED_SCHEDULERS
from grym_synth.inference.triton_client import TritonClient

log = logging.getLogger(__name__)

PIPELINE_MODEL = "audioldm"
COMPONENT_MODELS = ("clap_text_encoder", "unet", "vae_decoder", "vocoder")
ENCODER_MODEL = "vae_encoder"  # VARY and CONTINUE only: a server without it still serves text generation
MODES = ("text", "vary", "continue")  # GenerateRequest.Mode (MODE_<NAME>); unspecified: text, vary with init audio
DEFAULT_INIT_STRENGTH = 0.6
# CONTINUE: seconds at the end of the init audio the continuation is conditioned on (the known region of the
# window; AudioLDM was trained on ~10 s windows, so a quarter of one keeps most of the window for new audio).
CONTINUE_CONTEXT_S = 2.5
SCHEDULERS = tuple(EXPORTED_SCHEDULERS)  # the schedulers the exporter writes, the one list (names only here)
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_DURATION_S = 10, 2.5, 5.0
WAV_CHUNK_BYTES = 256 * 1024
TEMPLATE_CONFIG = Path(str(resources.files("grym_synth.model_repository"))) / PIPELINE_MODEL / "config.pbtxt"


@dataclass(frozen=True)
class GenerateParams:
    """A validated generation request."""

    prompt: str
    negative_prompt: str = ""
    duration_s: float = DEFAULT_DURATION_S
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    mode: str = "text"
    # VARY: the audio to vary (cut to the duration); CONTINUE: the context (the init's last seconds). 16 kHz mono.
    init_audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    init_strength: float = DEFAULT_INIT_STRENGTH
    init_pattern_id: str = ""

    @property
    def init_sha256(self) -> str:
        """SHA-256 of the init audio as the model receives it (float32 samples), "" without."""
        return "" if self.init_audio is None else hashlib.sha256(self.init_audio.tobytes()).hexdigest()

    @property
    def context_s(self) -> float:
        return 0.0 if self.init_audio is None else len(self.init_audio) / TARGET_RATE_HZ

    def metadata(self, seed: int, profile: str) -> dict[str, str]:
        """What a pattern keeps so the audio can be regenerated bit for bit (with the init audio, for VARY and
        CONTINUE: named by its pattern or by the hash of its samples)."""
        meta = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": str(seed),
                "steps": str(self.steps), "guidance_scale": repr(self.guidance_scale),
                "duration_s": repr(self.duration_s), "scheduler": self.scheduler, "model": PIPELINE_MODEL,
                "profile": profile}
        if self.mode != "text":
            meta.update(mode=self.mode, init_audio_sha256=self.init_sha256, init_pattern_id=self.init_pattern_id)
            if self.mode == "vary":
                meta["init_strength"] = repr(self.init_strength)
        return meta


@dataclass
class Progress:
    step: int
    total_steps: int


@dataclass
class AudioData:
    """A finished piece of audio: its 16-bit WAV chunks, and (when kept) the float samples they came from, so that
    another output format (24-bit WAV, FLAC, ...) is encoded at full precision rather than from the 16-bit file."""

    wav_chunks: list[bytes]
    sample_rate_hz: int
    samples: np.ndarray | None = None


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
    music: MusicDescription | None = None  # summary detail; a stored pattern keeps it (search by music)


@dataclass(frozen=True)
class ModelLimits:
    """What the ``audioldm`` model accepts, read once at start-up (:func:`load_limits`) from the same files the model
    reads, so that the orchestrator refuses with INVALID_ARGUMENT everything the model would refuse: a request
    Triton has to reject costs a round trip and, before this, counted against the shared breaker."""

    min_duration_s: float  # AudioLDMPipeline's minimum: vocoder upsample factor x VAE scale factor
    max_duration_s: float  # the model config's max_duration_s
    max_steps: int
    max_prompt_tokens: int  # the CLAP tokenizer's model_max_length (diffusers truncates beyond it; we refuse)
    max_negative_tokens: int  # min(model_max_length, projection_dim), the length diffusers cuts negatives to
    source: str = field(default="", compare=False)  # where they were read from (for the start-up log)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model counts them (special tokens included); 0 without a tokenizer."""
        return 0 if self.tokenizer is None else len(self.tokenizer(text).input_ids)


# Before load_limits ran (unit use of validate): only the checks that need no model files.
GENERIC_LIMITS = ModelLimits(min_duration_s=0.0, max_duration_s=math.inf, max_steps=MAX_STEPS,
                             max_prompt_tokens=0, max_negative_tokens=0, source="generic")
_limits: ModelLimits = GENERIC_LIMITS
INT64_MAX = 2**63 - 1
_PBTXT_PARAMETER = re.compile(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')


def use_limits(limits: ModelLimits) -> ModelLimits:
    """Make ``limits`` the ones :func:`validate` applies (called once at start-up)."""
    global _limits
    _limits = limits
    return limits


def _pbtxt_parameters(path: Path) -> dict[str, str]:
    return dict(_PBTXT_PARAMETER.findall(path.read_text())) if path.is_file() else {}


def load_limits(profile: str, repository_dir: Path | None = None, weights_dir: Path | None = None) -> ModelLimits:
    """The audioldm model's limits and its real CLAP tokenizer, from (first match): the diffusers checkpoint the
    repository is built from (``weights_dir``), the exported repository the model is served from
    (``<repository>/audioldm/1/{components.json,tokenizer}``), or the seeded profile's definition (whose tokenizer
    training is deterministic, so it is byte-identical to the one an export of this profile writes). Works before
    the repository exists (an embedded Triton's is exported after start-up) and for an external Triton."""
    from transformers import RobertaTokenizer

    model_dir = Path(repository_dir) / PIPELINE_MODEL if repository_dir else None
    version = model_dir / "1" if model_dir else None
    if weights_dir is not None:
        weights = Path(weights_dir)
        tokenizer = RobertaTokenizer.from_pretrained(str(weights / "tokenizer"), local_files_only=True)
        vocoder = json.loads((weights / "vocoder" / "config.json").read_text())
        vae = json.loads((weights / "vae" / "config.json").read_text())
        text = json.loads((weights / "text_encoder" / "config.json").read_text())
        rates, rate = vocoder["upsample_rates"], vocoder["sampling_rate"]
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        projection_dim, source = int(text.get("projection_dim", 512)), str(weights)
    elif version is not None and (version / "components.json").is_file() and (version / "tokenizer").is_dir():
        c = json.loads((version / "components.json").read_text())
        tokenizer = RobertaTokenizer.from_pretrained(str(version / "tokenizer"), local_files_only=True)
        rates, rate = c["vocoder_upsample_rates"], c["sampling_rate"]
        vae_scale, projection_dim, source = int(c["vae_scale_factor"]), int(c["projection_dim"]), str(version)
    else:
        from grym_synth.inference.export.audioldm import PROFILES
        from grym_synth.inference.export.audioldm_tokenizer import build_tokenizer

        arch = PROFILES[profile]
        tokenizer = build_tokenizer(arch.tokenizer_max_length, arch.tokenizer_vocab_size)
        rates, rate = arch.vocoder["upsample_rates"], arch.vocoder["sampling_rate"]
        vae_scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)
        projection_dim, source = int(arch.text_encoder["projection_dim"]), f"seeded profile {profile}"
    params = _pbtxt_parameters(model_dir / "config.pbtxt") if model_dir else {}
    params = params or _pbtxt_parameters(TEMPLATE_CONFIG)
    max_tokens = int(tokenizer.model_max_length)
    tokenizer.model_max_length = 10**9  # counting only: no "longer than the maximum" warning per long prompt
    limits = ModelLimits(
        min_duration_s=float(np.prod(rates) / rate * vae_scale),  # the model's own expression
        max_duration_s=float(params.get("max_duration_s", "30")), max_steps=int(params.get("max_steps", MAX_STEPS)),
        max_prompt_tokens=max_tokens, max_negative_tokens=min(max_tokens, projection_dim), source=source,
        tokenizer=tokenizer,
    )
    log.info("generation limits from %s: duration [%g, %g] s, steps <= %d, prompt <= %d tokens, negative_prompt "
             "<= %d tokens", source, limits.min_duration_s, limits.max_duration_s, limits.max_steps,
             limits.max_prompt_tokens, limits.max_negative_tokens)
    return limits


def fit_prompt(text: str, negative: bool = False, limits: ModelLimits | None = None) -> str:
    """``text`` cut at a word boundary to what the text encoder takes. For prompts the server writes itself (a
    plan's section prompts grow with the request and its descriptors): a client's own prompt is refused instead."""
    limits = limits or _limits
    limit = limits.max_negative_tokens if negative else limits.max_prompt_tokens
    if not limit or not text or limits.count_tokens(text) <= limit:
        return text
    words = text.split()
    low, high = 0, len(words)  # the longest prefix of words that fits
    while low < high:
        mid = (low + high + 1) // 2
        if limits.count_tokens(" ".join(words[:mid])) <= limit:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low]).rstrip(" ,;:")


def _text(name: str, value: str, limit_tokens: int, limits: ModelLimits) -> None:
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"{name} is {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} is not valid Unicode text (it contains unpaired surrogates)") from None
    if limit_tokens and value:
        tokens = limits.count_tokens(value)
        if tokens > limit_tokens:
            raise InvalidArgument(f"{name} is {tokens} tokens long; the text encoder takes at most {limit_tokens} "
                                  f"(shorten it)")


def _finite_number(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return number


def validate(prompt: str, negative_prompt: str, duration_s: float, steps: int, guidance_scale: float | None,
             seed: int | None, scheduler: str, max_duration_s: float,
             limits: ModelLimits | None = None) -> GenerateParams:
    """Every range the orchestrator or the model imposes, with the field name in the message; raised before any
    model runs. ``limits``: the model's (default: those loaded at start-up, see :func:`use_limits`)."""
    limits = limits or _limits
    if not prompt.strip():
        raise InvalidArgument("prompt is empty: describe the sound to generate")
    _text("prompt", prompt, limits.max_prompt_tokens, limits)
    _text("negative_prompt", negative_prompt, limits.max_negative_tokens, limits)

    duration = _finite_number("duration_seconds", duration_s or DEFAULT_DURATION_S)
    low, high = limits.min_duration_s, min(max_duration_s, limits.max_duration_s)
    # The model sees a float32: compare as it will (0.04 as float32 is 0.0399999991, still the minimum).
    if not (low <= duration <= high and np.float32(low) <= np.float32(duration)) or duration <= 0:
        raise InvalidArgument(f"duration_seconds must be in [{low:g}, {high:g}] seconds, got {duration_s}")

    if isinstance(steps, float) and not steps.is_integer():
        raise InvalidArgument(f"steps must be a whole number, got {steps}")
    steps = int(_finite_number("steps", steps)) or DEFAULT_STEPS
    max_steps = min(MAX_STEPS, limits.max_steps)
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(f"steps must be 1..{max_steps}, got {steps}")

    guidance = DEFAULT_GUIDANCE if guidance_scale is None else _finite_number("guidance_scale", guidance_scale)
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument(f"guidance_scale must be in [0, {MAX_GUIDANCE:g}], got {guidance_scale}")

    if seed is not None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise InvalidArgument(f"seed must be a whole number, got {seed!r}")
        if not 0 <= seed <= INT64_MAX:
            raise InvalidArgument(f"seed must be in [0, {INT64_MAX}], got {seed}")
        seed = int(seed)
    if scheduler not in SCHEDULERS:
        raise InvalidArgument(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    return GenerateParams(prompt=prompt, negative_prompt=negative_prompt, duration_s=float(duration), steps=steps,
                          guidance_scale=float(guidance), seed=seed, scheduler=scheduler)


@dataclass(frozen=True)
class InitSpec:
    """What a request says about its init audio, checked (:func:`validate_init`) but not yet loaded."""

    mode: str = "text"
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)  # 16 kHz mono, or None
    pattern_id: str = ""
    strength: float = DEFAULT_INIT_STRENGTH
    duration_given: bool = True  # False: the request left duration at 0 (VARY then keeps the init's length)


def validate_init(mode: str | None, audio: np.ndarray | None, pattern_id: str, strength: float | None,
                  duration_given: bool = True) -> InitSpec:
    """The request's init-audio fields, with the field names in the messages (INVALID_ARGUMENT before any model
    runs): TEXT takes no init audio, VARY and CONTINUE need exactly one of init_audio / init_pattern_id, and
    init_strength is a number in [0, 1] (NaN refused)."""
    has_init = audio is not None or bool(pattern_id)
    resolved = mode or ("vary" if has_init else "text")
    if resolved not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if audio is not None and pattern_id:
        raise InvalidArgument("init_audio and init_pattern_id are exclusive: give one audio to start from")
    if resolved == "text" and has_init:
        raise InvalidArgument("mode TEXT takes no init audio; use MODE_VARY or MODE_CONTINUE with init_audio or "
                              "init_pattern_id")
    if resolved != "text" and not has_init:
        raise InvalidArgument(f"mode {resolved.upper()} needs init_audio or init_pattern_id")
    if pattern_id:
        check_pattern_id(pattern_id, "init_pattern_id")
    value = DEFAULT_INIT_STRENGTH if strength is None else _finite_number("init_strength", strength)
    if not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"init_strength must be in [0, 1], got {strength}")
    return InitSpec(mode=resolved, audio=audio, pattern_id=pattern_id, strength=value, duration_given=duration_given)


def wav_chunks(samples: np.ndarray, rate: int) -> list[bytes]:
    data = encode_wav(samples, rate)
    return [data[i: i + WAV_CHUNK_BYTES] for i in range(0, len(data), WAV_CHUNK_BYTES)]


class GenerationSlots:
    """The one limit on AudioLDM generations in flight, shared by the Generate RPC and Compose's generate/vary
    steps, so that a Compose of a long piece cannot start more generations than Generate may.

    Semantics: a Generate that finds every slot taken (or others already waiting) is refused at once with
    RESOURCE_EXHAUSTED, like the admission limits; a Compose step waits for a slot (bounded by the workflow's
    deadline), since failing one segment would fail the whole piece. A slot is held only while the pipeline runs
    on Triton (not for cache hits, nor while the result is analysed or stored). The default matches the audioldm
    model's ``max_concurrent_generations``, so every admitted generation's UNet steps meet in one batch."""

    def __init__(self, slots: int, metrics: Metrics | None = None) -> None:
        self.slots = slots
        self.metrics = metrics
        self.in_use = 0
        self._sem = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def hold(self, *, wait: bool, what: str) -> AsyncIterator[None]:
        if not wait and self._sem.locked():
            if self.metrics:
                self.metrics.rpc_rejected.labels(what, "generation_slots").inc()
            raise ResourceExhausted(f"all {self.slots} generation slots are in use (Generate and Compose share "
                                    "them); retry with backoff")
        await self._sem.acquire()
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._sem.release()


class GenerationService:
    """Generate: AudioLDM on Triton -> audio -> Wav2Vec2 features -> pattern memory."""

    def __init__(self, triton: TritonClient, analysis: AnalysisService, store: PatternStore, *, profile: str,
                 max_duration_s: float, cache: LruCache[tuple[np.ndarray, int]] | None = None,
                 metrics: Metrics | None = None, max_concurrent: int = 8) -> None:
        self.slots = GenerationSlots(max_concurrent, metrics)
        self.triton = triton
        self.analysis = analysis
        self.store = store
        self.profile = profile
        self.max_duration_s = max_duration_s
        self.cache = cache
        self.metrics = metrics
        self._ready_until = 0.0

    async def with_init(self, p: GenerateParams, init: InitSpec) -> GenerateParams:
        """``p`` with its init audio loaded (from the request or a stored pattern: NOT_FOUND when the pattern has
        none, DATA_LOSS when its file is lost) and cut to what the model uses: VARY the first ``duration`` seconds
        (duration 0: the init's own length, up to the maximum), CONTINUE the last :data:`CONTINUE_CONTEXT_S`; a
        continuation's window (context + duration) must fit the model's maximum duration."""
        if init.mode == "text":
            return p
        audio = init.audio
        if audio is None:
            _, wav = await self.store.audio(init.pattern_id)
            audio = to_mono_16k(*decode_file(wav, max_seconds=self.max_duration_s + 1, what="the stored audio"))
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0:
            raise InvalidArgument("the init audio is empty")
        limits = _limits
        high = min(self.max_duration_s, limits.max_duration_s)
        duration = p.duration_s
        if init.mode == "vary":
            if not init.duration_given:
                duration = min(max(audio.size / TARGET_RATE_HZ, limits.min_duration_s), high)
            audio = audio[: int(round(duration * TARGET_RATE_HZ))]
        else:
            audio = audio[max(0, audio.size - int(CONTINUE_CONTEXT_S * TARGET_RATE_HZ)):]
            window = audio.size / TARGET_RATE_HZ + duration
            if window > high:
                context = audio.size / TARGET_RATE_HZ
                raise InvalidArgument(f"a continuation generates its context ({context:g} s of the init audio) plus "
                                      f"duration_seconds ({duration:g} s) = {window:g} s, more than the maximum "
                                      f"{high:g} s; ask for at most {high - context:g} s")
        return dataclasses.replace(p, duration_s=float(duration), mode=init.mode, init_audio=audio,
                                   init_strength=init.strength, init_pattern_id=init.pattern_id)

    async def check_models(self, mode: str = "text") -> None:
        """UNAVAILABLE naming the first model that is not loaded, before any model runs (cached for 2 s)."""
        if mode != "text":
            if not await self.triton.model_ready(ENCODER_MODEL):
                raise Unavailable(f"triton:{ENCODER_MODEL}", f"model {ENCODER_MODEL} is not loaded in Triton; VARY "
                                  "and CONTINUE need it (text generation does not)")
        if time.monotonic() < self._ready_until:
            return
        models = (PIPELINE_MODEL, *COMPONENT_MODELS)
        ready = await asyncio.gather(*(self.triton.model_ready(m) for m in models))
        missing = [m for m, ok in zip(models, ready) if not ok]
        if missing:
            raise Unavailable(f"triton:{missing[0]}", f"model(s) {', '.join(missing)} not loaded in Triton; "
                              f"generation needs {', '.join(models)}")
        self._ready_until = time.monotonic() + 2.0

    def _cache_key(self, p: GenerateParams) -> str | None:
        if p.seed is None:
            return None  # a random seed is not a deterministic request
        init = (p.mode, p.init_sha256, repr(p.init_strength)) if p.mode != "text" else ()
        return digest(self.profile, p.prompt, p.negative_prompt, repr(p.duration_s), str(p.steps),
                      repr(p.guidance_scale), str(p.seed), p.scheduler, *init)

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
        if p.mode != "text" and p.init_audio is not None:
            inputs["mode"] = np.array([p.mode.encode()], dtype=np.object_)
            inputs["init_audio"] = p.init_audio
            inputs["init_strength"] = np.array([p.init_strength], dtype=np.float32)
            if p.mode == "continue":
                inputs["context_s"] = np.array([p.context_s], dtype=np.float32)
        async for out in self.triton.stream(PIPELINE_MODEL, inputs, (), deadline=deadline, request_id=request_id):
            if "waveform" in out:
                seed = int(np.asarray(out["seed"]).reshape(-1)[0]) if "seed" in out else int(p.seed or 0)
                rate = int(np.asarray(out["sample_rate"]).reshape(-1)[0])
                yield np.asarray(out["waveform"], dtype=np.float32).reshape(-1), rate, seed
            elif "step" in out:
                yield Progress(int(np.asarray(out["step"]).reshape(-1)[0]),
                               int(np.asarray(out["total_steps"]).reshape(-1)[0]))

    async def synthesize(self, p: GenerateParams, *, deadline: float | None, request_id: str,
                         wait_for_slot: bool = True,
                         what: str = "Compose") -> AsyncIterator[Progress | tuple[np.ndarray, int, bool]]:
        """Progress events, then (16 kHz samples, seed, cached): the audio alone, from the cache when this exact
        deterministic request ran before. Shared by Generate and the workflow's generate/vary steps; a run on
        Triton holds one of the shared generation slots (``wait_for_slot=False``: RESOURCE_EXHAUSTED when none is
        free)."""
        key = self._cache_key(p)
        hit = self.cache.get(key) if self.cache is not None and key else None
        if hit is not None:
            yield hit[0], hit[1], True
            return
        await self.check_models(p.mode)
        result = None
        async with self.slots.hold(wait=wait_for_slot, what=what):
            stream = self._run_pipeline(p, deadline=deadline, request_id=request_id)
            async with contextlib.aclosing(stream) as items:
                async for item in items:
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
        stream = self.synthesize(p, deadline=deadline, request_id=request_id, wait_for_slot=False, what="Generate")
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                if isinstance(item, Progress):
                    yield item
                else:
                    samples, seed, cached = item
        yield AudioData(wav_chunks(samples, TARGET_RATE_HZ), TARGET_RATE_HZ, samples)
        analysis, music = await asyncio.gather(
            self.analysis.run_model(self.analysis.validate(samples, "generated audio"), include_features=False,
                                    deadline=deadline, request_id=request_id),
            self.analysis.describe_music(samples, deadline=deadline))
        done = Generated(seed=seed, duration_s=len(samples) / TARGET_RATE_HZ, sample_rate_hz=TARGET_RATE_HZ,
                         frames=analysis.frames, embedding=analysis.embedding, cached=cached, samples=samples,
                         music=music)
        if store:
            done.pattern = await self.store.insert(analysis.embedding, duration_s=done.duration_s, tags=tags,
                                                   source="generate", metadata=p.metadata(seed, self.profile),
                                                   audio=samples, music=music_fields(music))
            if self.metrics:
                self.metrics.patterns_stored.labels("generate").inc()
        yield done
