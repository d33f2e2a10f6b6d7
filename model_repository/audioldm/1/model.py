"""Triton python-backend model ``audioldm``: diffusers' AudioLDMPipeline as a decoupled BLS pipeline.

Why a pipeline model instead of one big graph: the denoising loop calls the UNet once per step. Running each step
as its own request to the ``unet`` model lets Triton's dynamic batcher merge the steps of *concurrent* generations
into one UNet batch (the expensive part), while text encoding, VAE decoding and vocoding batch in their own
models. This model only tokenises, runs the scheduler arithmetic in torch and streams progress.

Request flow (one request = one generation; the response stream is decoupled):
  execute(): validate every input (error response + FINAL before any model runs), then hand the request to a
  worker thread and return at once — so several generations are in flight and their UNet requests meet in the
  unet model's queue. A semaphore (``max_concurrent_generations``) bounds the number running; the rest wait,
  cancellable while waiting.
  worker: clap_text_encoder -> N x unet (progress response after each step) -> vae_decoder -> vocoder ->
  response {waveform, sample_rate, seed} -> empty FINAL response. Errors: error response, then FINAL.
  Cancellation: ``response_sender.is_cancelled()`` is checked before and after every UNet call (python backend >=
  23.10), so a cancelled generation stops within one step and finishes with FINAL. A UNet request already queued
  cannot be withdrawn (2.41 has no BLS cancellation): after a cancel the unet model still runs the one step each
  running generation had queued, which is why the orchestrator bounds the generations in flight.

Parity with diffusers (pipelines/deprecated/audioldm/pipeline_audioldm.py), step by step:
  * duration -> mel frames: ``height = int(d / (prod(upsample_rates) / sr))`` rounded up to a multiple of the VAE
    scale factor; waveform cut to ``int(d * sr)`` samples; minimum duration ``upsample_factor * vae_scale``.
  * prompt embeddings: tokenizer(truncation) -> text encoder -> L2 norm (in the graph); under classifier-free
    guidance (guidance_scale > 1) the batch is [negative ("" if none), prompt]. diffusers pads the prompt to
    model_max_length (512 for AudioLDM-S) and the negative row to projection_dim; padding is attention-masked and
    does not change the embedding (tests/test_audioldm_export.py), so here both rows are padded only to the longer
    one, rounded up to ``pad_to_multiple_of`` tokens (config, default 32) so that typical prompts share a shape and
    batch together. On AudioLDM-S that is 2 x 32 instead of 2 x 512 tokens for a short prompt: the text encoder's
    share of a generation drops from ~0.74 s to ~0.06 s on 2 CPU cores, for the same embedding. Prompts that
    would be truncated (more tokens than model_max_length; negative prompts: than min(model_max_length,
    projection_dim), the length diffusers truncates them to) are rejected instead of silently cut.
  * latents: ``torch.randn((1, C, height // s, mel_bins // s), generator=torch.Generator().manual_seed(seed))``
    times ``scheduler.init_noise_sigma`` — prepare_latents on a CPU generator; the same generator is passed to
    ``scheduler.step`` when its signature accepts one (eta=0.0 likewise), as prepare_extra_step_kwargs does.
  * loop: ``scale_model_input(cat([latents] * 2))`` -> unet -> ``uncond + g * (text - uncond)`` -> step.
  * decode: vae_decoder (1/scaling_factor inside) -> squeeze(1) -> vocoder.

Inputs/outputs are read from the model config (names and dtypes); the component models' names come from config
parameters and their tensor names from ``components.json`` (written by server/export/audioldm.py together with the
tokenizer and the scheduler configs in this version directory).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

INPUTS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "duration_s", "scheduler",
          "mode", "init_audio", "init_strength", "context_s")
OUTPUTS = ("step", "total_steps", "waveform", "sample_rate", "seed", "context_waveform")
COMPONENTS = {  # config parameter naming the Triton model -> key in components.json "tensors"
    "text_encoder_model": "clap_text_encoder",
    "unet_model": "unet",
    "vae_decoder_model": "vae_decoder",
    "vocoder_model": "vocoder",
    "vae_encoder_model": "vae_encoder",
}
MODES = ("text", "vary", "continue")


# Starts the message of every refused request (server/triton_client.py INVALID_REQUEST_MARKER reads it).
INVALID_REQUEST_MARKER = "invalid request:"


class InvalidRequest(ValueError):
    """The request is malformed or out of range; reported to the client as INVALID_ARG before any model runs."""


class Cancelled(Exception):
    """The client cancelled the request (or the model is unloading)."""


def _param(config: dict, key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if value == "":
        if default is None:
            raise pb_utils.TritonModelException(f"audioldm: config parameter '{key}' is required")
        return default
    return value


@dataclass(frozen=True)
class Generation:
    """A validated request: everything the worker needs, nothing left to check."""

    request_id: str
    seed: int
    steps: int
    guidance_scale: float
    duration_s: float
    scheduler: str
    input_ids: np.ndarray  # [1 or 2, L] int64; [negative, prompt] under classifier-free guidance
    attention_mask: np.ndarray
    height: int  # mel frames
    num_samples: int  # waveform length after the final cut
    mode: str = "text"
    init_audio: np.ndarray | None = None  # VARY: the audio to vary; CONTINUE: the known region (the init's end)
    init_strength: float = 1.0
    known_frames: int = 0  # CONTINUE: latent frames of the known region at the start of the window

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class TritonPythonModel:
    """Decoupled AudioLDM pipeline; see the module docstring."""

    # ------------------------------------------------------------------------------------------------ set-up
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("audioldm must be decoupled (model_transaction_policy.decoupled)")
        self._logger = pb_utils.Logger
        self._input_dtypes = {i["name"]: pb_utils.triton_string_to_numpy(i["data_type"]) for i in config["input"]}
        self._output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        missing = (set(INPUTS) - set(self._input_dtypes)) | (set(OUTPUTS) - set(self._output_dtypes))
        if missing:
            raise pb_utils.TritonModelException(f"audioldm config lacks tensors {sorted(missing)}")

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "components.json")) as f:
            self._c = json.load(f)
        self._models = {key: _param(config, param) for param, key in COMPONENTS.items()}
        self._tensors = self._c["tensors"]

        from transformers import RobertaTokenizer

        tokenizer_dir = os.path.join(version_dir, "tokenizer")
        self._tokenizer = RobertaTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        # Fast tokenizers mutate their padding/truncation state per call: concurrent calls raise "Already borrowed".
        self._tokenizer_lock = threading.Lock()
        self._max_tokens = int(self._tokenizer.model_max_length)
        self._max_negative_tokens = min(self._max_tokens, int(self._c["projection_dim"]))
        self._pad_multiple = int(_param(config, "pad_to_multiple_of", "32"))
        self._schedulers = self._load_schedulers(os.path.join(version_dir, "schedulers"))

        self._vae_scale = int(self._c["vae_scale_factor"])
        self._mel = self._c.get("mel") or {"hop_length": int(np.prod(self._c["vocoder_upsample_rates"])),
                                           "n_fft": 1024, "init_peak": 0.5}
        self._sampling_rate = int(self._c["sampling_rate"])
        # Exactly the pipeline's expression (numpy float64), so duration -> frames rounds identically.
        self._upsample_factor = np.prod(self._c["vocoder_upsample_rates"]) / self._sampling_rate
        self._min_duration = float(self._upsample_factor * self._vae_scale)
        self._default_duration = float(self._c["unet_sample_size"] * self._vae_scale * self._upsample_factor)
        self._default_steps = int(_param(config, "default_steps", "10"))
        self._default_guidance = float(_param(config, "default_guidance_scale", "2.5"))
        self._default_scheduler = _param(config, "default_scheduler", self._c.get("default_scheduler", "ddim"))
        self._max_steps = int(_param(config, "max_steps", "200"))
        self._max_duration = float(_param(config, "max_duration_s", "30"))
        if self._default_scheduler not in self._schedulers:
            raise pb_utils.TritonModelException(f"default_scheduler {self._default_scheduler!r} is not exported")
        torch.set_num_threads(int(_param(config, "torch_threads", "1")))

        self._slots = threading.BoundedSemaphore(int(_param(config, "max_concurrent_generations", "8")))
        self._stopping = threading.Event()
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._logger.log_info(
            f"audioldm ready: profile={self._c.get('profile')} schedulers={sorted(self._schedulers)} "
            f"sr={self._sampling_rate} duration=[{self._min_duration:g}, {self._max_duration:g}] s"
        )

    @staticmethod
    def _load_schedulers(root: str) -> dict[str, tuple[type, dict[str, Any]]]:
        """name -> (diffusers scheduler class, config dict) for every exported schedulers/<name>/ config."""
        import diffusers

        schedulers = {}
        for name in sorted(os.listdir(root)):
            with open(os.path.join(root, name, "scheduler_config.json")) as f:
                config = json.load(f)
            schedulers[name] = (getattr(diffusers, config["_class_name"]), config)
        if not schedulers:
            raise pb_utils.TritonModelException(f"no scheduler configs under {root}")
        return schedulers

    # ------------------------------------------------------------------------------------------------ validation
    def _optional(self, request: Any, name: str) -> Any | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        array = tensor.as_numpy()
        if array.size != 1:
            raise InvalidRequest(f"'{name}' must hold exactly one value, got shape {list(array.shape)}")
        return array.reshape(-1)[0]

    def _text(self, request: Any, name: str) -> str | None:
        value = self._optional(request, name)
        if value is None:
            return None
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise InvalidRequest(f"'{name}' is not valid UTF-8") from None

    def _count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer(text).input_ids)

    def _parse(self, request: Any) -> Generation:
        """Validate and normalise one request; raises InvalidRequest with a message meant for the client."""
        prompt = self._text(request, "prompt")
        if prompt is None or not prompt.strip():
            raise InvalidRequest("'prompt' must be a non-empty string")
        tokens = self._count_tokens(prompt)
        if tokens > self._max_tokens:
            raise InvalidRequest(f"'prompt' is {tokens} tokens long; the text encoder takes {self._max_tokens} at most")
        negative = self._text(request, "negative_prompt")
        if negative is not None:
            tokens = self._count_tokens(negative)
            if tokens > self._max_negative_tokens:
                raise InvalidRequest(
                    f"'negative_prompt' is {tokens} tokens long; at most {self._max_negative_tokens} are allowed"
                )

        seed = self._optional(request, "seed")
        seed = secrets.randbits(63) if seed is None else int(seed)
        if seed < 0:
            raise InvalidRequest(f"'seed' must be >= 0, got {seed}")

        steps = self._optional(request, "steps")
        steps = self._default_steps if steps is None else int(steps)
        if not 1 <= steps <= self._max_steps:
            raise InvalidRequest(f"'steps' must be in [1, {self._max_steps}], got {steps}")

        guidance = self._optional(request, "guidance_scale")
        guidance = self._default_guidance if guidance is None else float(guidance)
        if not (math.isfinite(guidance) and guidance >= 0.0):
            raise InvalidRequest(f"'guidance_scale' must be a finite number >= 0, got {guidance}")

        duration = self._optional(request, "duration_s")
        duration = self._default_duration if duration is None else float(duration)
        # duration arrives as float32: compare in float32, so the minimum itself (0.04 s is 0.0399999991 as a
        # float32) is accepted, as the orchestrator's validation (server/generation.py) accepts it.
        if not (math.isfinite(duration) and np.float32(self._min_duration) <= np.float32(duration)
                and duration <= self._max_duration):
            raise InvalidRequest(
                f"'duration_s' must be in [{self._min_duration:g}, {self._max_duration:g}] seconds, got {duration}"
            )

        scheduler = self._text(request, "scheduler")
        scheduler = self._default_scheduler if scheduler is None else scheduler.strip().lower()
        if scheduler not in self._schedulers:
            raise InvalidRequest(f"unknown 'scheduler' {scheduler!r}; expected one of {sorted(self._schedulers)}")

        height, num_samples = self._frames(duration)
        mode, init, strength, known = self._parse_init(request, duration)
        texts = [negative or "", prompt] if guidance > 1.0 else [prompt]
        with self._tokenizer_lock:
            enc = self._tokenizer(texts, padding="longest", pad_to_multiple_of=self._pad_multiple,
                                  max_length=self._max_tokens, truncation=True, return_tensors="np")
        return Generation(
            request_id=request.request_id() or "-",
            seed=seed,
            steps=steps,
            guidance_scale=guidance,
            duration_s=duration,
            scheduler=scheduler,
            input_ids=enc["input_ids"].astype(np.int64),
            attention_mask=enc["attention_mask"].astype(np.int64),
            height=height,
            num_samples=num_samples,
            mode=mode,
            init_audio=init,
            init_strength=strength,
            known_frames=known,
        )

    def _parse_init(self, request: Any, duration: float) -> tuple[str, np.ndarray | None, float, int]:
        """(mode, init waveform, strength, known latent frames) of an audio-to-audio or continuation request.

        CONTINUE keeps only the last ``context_s`` seconds of the init audio (default: the init's length, at most
        half the default duration), cut to whole latent frames; the window it generates is that known region
        followed by ``duration`` seconds of new audio and must fit ``max_duration_s``."""
        mode = self._text(request, "mode")
        mode = "text" if mode is None else mode.strip().lower()
        if mode not in MODES:
            raise InvalidRequest(f"unknown 'mode' {mode!r}; expected one of {list(MODES)}")
        tensor = pb_utils.get_input_tensor_by_name(request, "init_audio")
        init = None if tensor is None else np.asarray(tensor.as_numpy(), dtype=np.float32).reshape(-1)
        if mode == "text":
            if init is not None:
                raise InvalidRequest("'init_audio' is given but 'mode' is text; use mode vary or continue")
            return mode, None, 1.0, 0
        if init is None or init.size == 0:
            raise InvalidRequest(f"mode {mode} needs 'init_audio' (16 kHz mono float32 samples)")
        if init.size > self._max_duration * self._sampling_rate:
            raise InvalidRequest(f"'init_audio' is {init.size / self._sampling_rate:g} s; at most "
                                 f"{self._max_duration:g} s are accepted")
        if not np.isfinite(init).all():
            raise InvalidRequest("'init_audio' contains NaN or infinite samples")
        strength = self._optional(request, "init_strength")
        strength = 0.6 if strength is None else float(strength)
        if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
            raise InvalidRequest(f"'init_strength' must be in [0, 1], got {strength}")
        if mode == "vary":
            return mode, init, strength, 0
        step = self._latent_step()
        context = self._optional(request, "context_s")
        init_s = init.size / self._sampling_rate
        context = min(init_s, self._default_duration / 2) if context is None else float(context)
        if not (math.isfinite(context) and context > 0):
            raise InvalidRequest(f"'context_s' must be a positive number of seconds, got {context}")
        known = int(min(context, init_s) * self._sampling_rate) // step
        if known < 1:
            raise InvalidRequest(f"continuation needs at least {step / self._sampling_rate:g} s of 'init_audio' "
                                 f"context, got {min(context, init_s):g} s")
        window = known * step / self._sampling_rate + duration
        if window > self._max_duration:
            raise InvalidRequest(f"context ({known * step / self._sampling_rate:g} s) + 'duration_s' ({duration:g} s) "
                                 f"= {window:g} s exceeds the {self._max_duration:g} s the model generates at most")
        return mode, init[init.size - known * step:], strength, known

    def _latent_step(self) -> int:
        """Waveform samples per latent frame (mel hop x VAE scale factor)."""
        return int(self._mel["hop_length"]) * self._vae_scale

    def _frames(self, duration: float) -> tuple[int, int]:
        """AudioLDMPipeline.__call__ step 0: (mel frames, waveform samples) for ``duration`` seconds."""
        height = int(duration / self._upsample_factor)
        num_samples = int(duration * self._sampling_rate)
        if height % self._vae_scale != 0:
            height = int(np.ceil(height / self._vae_scale)) * self._vae_scale
        return height, num_samples

    # ------------------------------------------------------------------------------------------------ serving
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = self._parse(request)
            except InvalidRequest as exc:
                # INVALID_ARG for unary clients; the marker for streams, whose error responses carry no code
                # (the orchestrator maps both to INVALID_ARGUMENT, never to a breaker failure).
                self._fail(sender, f"{INVALID_REQUEST_MARKER} {exc}", pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as exc:  # a bug in validation must not fail the other requests of the batch
                self._logger.log_error(f"audioldm: validating a request failed: {exc!r}")
                self._fail(sender, "audioldm could not read the request", pb_utils.TritonError.INTERNAL)
                continue
            worker = threading.Thread(
                target=self._serve, args=(sender, generation), name=f"audioldm-{generation.request_id}", daemon=True
            )
            with self._workers_lock:
                self._workers.add(worker)
            worker.start()
        return None

    def _serve(self, sender: Any, generation: Generation) -> None:
        """Worker thread: wait for a slot, generate, stream; always ends the stream with FINAL."""
        acquired = False
        try:
            while not (acquired := self._slots.acquire(timeout=0.05)):
                self._check_cancelled(sender)
            started = time.perf_counter()
            waveform, context = self._generate(sender, generation)
            outputs = [
                self._tensor("waveform", waveform),
                self._tensor("sample_rate", [self._sampling_rate]),
                self._tensor("seed", [generation.seed]),
            ]
            if context is not None:
                outputs.append(self._tensor("context_waveform", context))
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
            sender.send(flags=FINAL)
            self._logger.log_info(
                f"audioldm {generation.request_id}: {generation.mode}, {generation.steps} {generation.scheduler} "
                f"steps, "
                f"{generation.duration_s:g} s audio in {time.perf_counter() - started:.2f} s"
            )
        except Cancelled:
            self._logger.log_info(f"audioldm {generation.request_id}: cancelled")
            try:
                sender.send(flags=FINAL)
            except Exception:  # the stream may already be gone; nothing left to tell
                pass
        except Exception as exc:
            self._logger.log_error(f"audioldm {generation.request_id}: generation failed: {exc}")
            self._fail(sender, f"audioldm generation failed: {exc}", pb_utils.TritonError.INTERNAL)
        finally:
            if acquired:
                self._slots.release()
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _check_cancelled(self, sender: Any) -> None:
        if self._stopping.is_set() or sender.is_cancelled():
            raise Cancelled()

    def _generate(self, sender: Any, g: Generation) -> tuple[np.ndarray, np.ndarray | None]:
        """The AudioLDMPipeline.__call__ computation (steps 3-8) with the components served by Triton; returns
        (waveform, the decoded known region or None). VARY and CONTINUE start from encoded init audio (see
        :meth:`_init_latents`); CONTINUE re-imposes the known region, noised to the current timestep, before every
        UNet call (RePaint / diffusers' legacy inpainting with a latent mask) and exactly after the last one."""
        embeds = self._infer("clap_text_encoder", {"input_ids": g.input_ids, "attention_mask": g.attention_mask})

        cls, config = self._schedulers[g.scheduler]
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(g.steps, device="cpu")
        timesteps = scheduler.timesteps

        generator = torch.Generator().manual_seed(g.seed)
        shape = (
            1,
            int(self._c["latent_channels"]),
            g.height // self._vae_scale + g.known_frames,
            int(self._c["mel_bins"]) // self._vae_scale,
        )
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = noise * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(scheduler, generator)
        known, gain = None, 1.0
        if g.mode == "continue" or (g.mode == "vary" and g.init_strength < 1.0):  # strength 1 ignores the init
            self._check_cancelled(sender)
            encoded, gain = self._encode(g.init_audio, g.known_frames or shape[2])
            if g.mode == "vary":
                timesteps, latents = self._vary_start(scheduler, g, encoded, noise, latents)
            else:
                known = encoded

        rows = embeds.shape[0]
        total = len(timesteps)
        k = g.known_frames
        for i, t in enumerate(timesteps):
            self._check_cancelled(sender)
            if known is not None:
                latents[:, :, :k] = scheduler.add_noise(known, noise[:, :, :k], t.reshape(1))
            model_input = torch.cat([latents] * 2) if g.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self._infer("unet", {
                "sample": np.ascontiguousarray(model_input.numpy(), dtype=np.float32),
                "timestep": np.full((rows, 1), float(t), dtype=np.float32),
                "class_labels": embeds,
            })
            self._check_cancelled(sender)  # cancelled while its step ran: no scheduler step, no progress
            noise_pred = torch.from_numpy(noise_pred)
            if g.guided:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + g.guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                self._tensor("step", [i + 1]),
                self._tensor("total_steps", [total]),
            ]))
        if known is not None:
            latents[:, :, :k] = known

        self._check_cancelled(sender)
        mel = self._infer("vae_decoder", {"latents": np.ascontiguousarray(latents.numpy(), dtype=np.float32)})
        if mel.ndim == 4:  # mel_spectrogram_to_waveform: squeeze the channel axis
            mel = mel[:, 0]
        waveform = self._infer("vocoder", {"mel": np.ascontiguousarray(mel)})[0]
        if g.mode != "continue":
            return (waveform / gain)[: g.num_samples], None  # back to the init audio's level (gain 1: text)
        waveform = waveform / gain  # back to the init audio's level
        offset = k * self._latent_step()
        return waveform[offset: offset + g.num_samples], (waveform[:offset] if k else None)

    def _encode(self, audio: np.ndarray, frames: int) -> tuple[torch.Tensor, float]:
        """(latents [1, C, frames, W], gain): ``audio`` normalised as AudioLDM's normalize_wav (mean removed, peak
        ``init_peak``), cut or zero-padded to ``frames`` latent frames, encoded by the vae_encoder model. Audio
        shorter than one STFT window is padded further (reflect padding needs it) and the extra frames dropped."""
        x = np.asarray(audio, dtype=np.float64)
        x = x - x.mean()
        gain = float(self._mel.get("init_peak", 0.5)) / (float(np.max(np.abs(x))) + 1e-8)
        step = self._latent_step()
        padded_frames = max(frames, -(-int(self._mel.get("n_fft", 1024)) // step) + 1)
        wave = np.zeros((1, padded_frames * step), dtype=np.float32)
        n = min(x.size, frames * step)
        wave[0, :n] = (x[:n] * gain).astype(np.float32)
        latents = self._infer("vae_encoder", {"waveform": wave})
        return torch.from_numpy(np.ascontiguousarray(latents[:, :, :frames])), gain

    @staticmethod
    def _vary_start(scheduler: Any, g: Generation, init: torch.Tensor, noise: torch.Tensor,
                    pure_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps to run, starting latents) for VARY, diffusers' img2img ``get_timesteps``/``prepare_latents``:
        run the last int(steps x strength) steps from the init latents noised to the first of them. Strength 1
        ignores the init exactly (pure noise: the text generation of the same seed); strength 0 runs no step."""
        if g.init_strength >= 1.0:
            return scheduler.timesteps, pure_noise
        run = min(int(g.steps * g.init_strength), g.steps)
        start = max(g.steps - run, 0) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        if len(timesteps) == 0:
            return timesteps, init
        return timesteps, scheduler.add_noise(init, noise, timesteps[:1])

    @staticmethod
    def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
        """prepare_extra_step_kwargs(generator, eta=0.0): pass what the scheduler's step() accepts."""
        accepted = set(inspect.signature(scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _infer(self, component: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """BLS call to a component model; returns its (single) output. Inputs are keyed by role, in graph order."""
        names = self._tensors[component]
        output = names["outputs"][0]
        request = pb_utils.InferenceRequest(
            model_name=self._models[component],
            requested_output_names=[output],
            inputs=[pb_utils.Tensor(name, inputs[name]) for name in names["inputs"]],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self._models[component]}: {response.error().message()}")
        # Copy: the tensor may live in shared memory owned by the response.
        return np.array(pb_utils.get_output_tensor_by_name(response, output).as_numpy())

    def _tensor(self, name: str, values: Any) -> Any:
        return pb_utils.Tensor(name, np.asarray(values, dtype=self._output_dtypes[name]))

    def _fail(self, sender: Any, message: str, code: Any) -> None:
        """Error response, then FINAL (decoupled streams always end with FINAL)."""
        try:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code)))
            sender.send(flags=FINAL)
        except Exception as exc:
            self._logger.log_warn(f"audioldm: could not deliver error {message!r}: {exc}")

    def finalize(self) -> None:
        """Stop accepting work, let workers end their streams (they see Cancelled), wait briefly for them."""
        self._stopping.set()
        deadline = time.monotonic() + 30.0
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
