"""Audio-to-audio (VARY) and continuation (CONTINUE) of the AudioLDM pipeline model on a real tritonserver (tiny).

References, all in process over the very same seeded components (the exporter caches them per (profile, seed)):
* the mel front end against transformers' librosa-compatible ``audio_utils.spectrogram`` (an independent numpy
  STFT) configured as AudioLDM's TacotronSTFT (hop = the vocoder's, Slaney mel filters, log(clamp(x, 1e-5)));
* the served ``vae_encoder`` against the exported PyTorch module (mel front end + ``vae.encode(...).mean``);
* VARY at strength 0 against ``vocoder(vae.decode(encoder(init) / scaling_factor))`` divided by the
  normalisation gain: no denoising step runs, so the served result is exactly the decoded init audio;
* VARY at strength 1 against the text generation of the same seed: it ignores the init audio, so it is equal.

What seeded weights cannot show: that encode -> decode -> vocoder *reconstructs* a clip. The tiny VAE and
vocoder are random, so the round trip gives unrelated audio (correlation with the input ~0); with the trained
AudioLDM-S weights (``--audioldm-weights-dir``) it reconstructs. These tests therefore check the front end and
each served component against references, and the continuation's known region against its own decode.

Tolerances: ONNX Runtime vs PyTorch per component ~1e-6 (tests/integration/test_audioldm_export.py); the VARY-0
chain (encoder, decoder, vocoder, / gain) is bounded at 1e-4 relative to the peak.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

import audioldm_stream  # noqa: E402

from grym_synth.inference.export import audioldm  # noqa: E402
from grym_synth.inference.export.repository import build_repository  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402

SEED = 0
RATE = 16000
PROMPT = "warm analog synth pad"


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """The session's shared tritonserver when it serves this tiny AudioLDM (seed SEED), else one of our own."""
    try:
        shared = request.getfixturevalue("triton")
        manifest = json.loads((Path(shared.repo_dir) / "manifest.json").read_text())
        if manifest.get("profile") == "tiny" and manifest.get("seed") == SEED and not manifest.get("weights") \
                and set(audioldm.MODELS) <= set(manifest.get("models", {})):
            shared.wait_models_ready(audioldm.MODELS, timeout_s=5)
            yield shared
            return
    except Exception:  # no shared server, or another build: start our own below
        pass
    root = tmp_path_factory.mktemp("a2a_triton")
    build_repository("tiny", root / "repo", models=audioldm.MODELS, seed=SEED)
    triton = EmbeddedTriton(root / "repo", root / "triton.log", startup_timeout_s=180)
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def components():
    return audioldm.build_components("tiny", None, SEED)


def clip(seconds: float, seed: int = 1) -> np.ndarray:
    """A real-sounding test clip: a decaying two-note chord with a little noise (16 kHz mono float32)."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)
    return (tone * np.exp(-t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# client
# ----------------------------------------------------------------------------------------------------------------
def StreamClient(url: str) -> audioldm_stream.StreamClient:  # noqa: N802 (a client with this module's prompt)
    return audioldm_stream.StreamClient(url, PROMPT)


def generate(server, **params) -> audioldm_stream.Stream:
    return audioldm_stream.generate(server.grpc_url, PROMPT, **params)


def unet_inferences(server) -> int:
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    try:
        return int(client.get_inference_statistics(model_name="unet").model_stats[0].inference_count)
    finally:
        client.close()


def latent_frames(components, duration_s: float) -> int:
    """Latent frames the pipeline generates for ``duration_s`` (AudioLDMPipeline's mel frames, rounded up)."""
    height = int(float(np.float32(duration_s)) / components.vocoder_upsample_factor)
    scale = components.vae_scale_factor
    return -(-height // scale)


def reference_decode(components, latents: np.ndarray) -> np.ndarray:
    """vocoder(vae.decode(latents / scaling_factor)) in PyTorch, like the pipeline model's decode."""
    import torch

    with torch.no_grad():
        mel = components.vae.decode(torch.from_numpy(latents) / components.vae.config.scaling_factor).sample
        return components.vocoder(mel[:, 0]).numpy()[0]


def reference_encode(components, audio: np.ndarray, frames: int) -> tuple[np.ndarray, float]:
    """(latents, gain) as the pipeline model encodes ``audio`` into ``frames`` latent frames, in PyTorch."""
    import torch

    config = audioldm.mel_config(components)
    step = config["hop_length"] * components.vae_scale_factor
    normalised, gain = audioldm.normalize_init_audio(audio)
    wave = np.zeros((1, frames * step), np.float32)
    n = min(normalised.size, frames * step)
    wave[0, :n] = normalised[:n]
    with torch.no_grad():
        latents = audioldm.vae_encode_module(components)(torch.from_numpy(wave)).numpy()
    return latents, gain


# ----------------------------------------------------------------------------------------------------------------
# front end and encoder
# ----------------------------------------------------------------------------------------------------------------
def test_mel_front_end_matches_reference_stft(components):
    import torch
    from transformers.audio_utils import spectrogram, window_function

    config = audioldm.mel_config(components)
    assert (config["n_fft"], config["win_length"], config["fmin_hz"], config["fmax_hz"]) == (1024, 1024, 0.0, 8000.0)
    x = clip(1.0)
    want = spectrogram(x, window_function(1024, "hann", periodic=True), frame_length=1024,
                       hop_length=config["hop_length"], fft_length=1024, power=1.0, center=True, pad_mode="reflect",
                       mel_filters=audioldm.mel_filters(config).T, mel_floor=1e-5, log_mel="log").T
    with torch.no_grad():
        got = audioldm.mel_front_end(components)(torch.from_numpy(x[None]))[0, 0].numpy()
    frames = x.size // config["hop_length"]
    assert got.shape == (frames, config["n_mels"])
    err = float(np.max(np.abs(got - want[:frames])))
    print(f"[mel] max |front end - reference| = {err:.2g} (log-mel range {want.min():.1f}..{want.max():.1f})")
    assert err < 1e-4


def test_full_profile_front_end_is_audioldm_s():
    """AudioLDM-S's numbers: 16 kHz, hop 160 (10 ms), 64 mel bins, fmax 8 kHz (no weights are built)."""
    arch = audioldm.PROFILES["full"]
    assert int(np.prod(arch.vocoder["upsample_rates"])) == 160 and arch.vocoder["model_in_dim"] == 64
    assert arch.vocoder["sampling_rate"] == 16000 and audioldm.MEL_FMAX_HZ == 8000.0


def test_served_encoder_matches_pytorch(server, components):
    import torch

    step = audioldm.mel_config(components)["hop_length"] * components.vae_scale_factor
    wave, _ = audioldm.normalize_init_audio(clip(0.5))
    wave = wave[: (wave.size // step) * step][None]
    tensor = tritonclient_grpc.InferInput("waveform", list(wave.shape), "FP32")
    tensor.set_data_from_numpy(wave)
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    try:
        got = client.infer("vae_encoder", [tensor]).as_numpy("latents")
    finally:
        client.close()
    with torch.no_grad():
        want = audioldm.vae_encode_module(components)(torch.from_numpy(wave)).numpy()
    assert got.shape == want.shape == (1, components.unet.config.in_channels, wave.shape[1] // step,
                                       components.vocoder.config.model_in_dim // components.vae_scale_factor)
    assert np.max(np.abs(got - want)) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# VARY
# ----------------------------------------------------------------------------------------------------------------
def test_vary_strength_zero_is_the_decoded_init(server, components):
    init, duration = clip(0.5), 0.5
    got = generate(server, mode="vary", init_audio=init, init_strength=0.0, seed=3, steps=4, duration_s=duration)
    assert got.error is None, got.error
    assert got.steps == [] and got.events == ["audio", "final"]  # no denoising step ran
    latents, gain = reference_encode(components, init, latent_frames(components, duration))
    want = (reference_decode(components, latents) / gain)[: got.waveform.size]
    err = float(np.max(np.abs(got.waveform - want)))
    print(f"[vary 0] max |served - decoded init| = {err:.2g}, peak {np.max(np.abs(want)):.3g}")
    assert got.waveform.size == int(duration * RATE)
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


def test_vary_strength_one_is_the_text_generation(server):
    params = dict(seed=11, steps=4, duration_s=0.5, guidance_scale=2.5)
    text = generate(server, **params)
    varied = generate(server, mode="vary", init_audio=clip(0.5), init_strength=1.0, **params)
    assert text.error is None and varied.error is None
    assert varied.steps == text.steps == [(i, 4) for i in range(1, 5)]
    assert np.array_equal(varied.waveform, text.waveform)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler", "pndm", "lms"])
def test_vary_partial_strength_runs_the_last_steps(server, scheduler):
    init = clip(0.5)
    half = generate(server, mode="vary", init_audio=init, init_strength=0.5, seed=5, steps=6, duration_s=0.5,
                    scheduler=scheduler)
    zero = generate(server, mode="vary", init_audio=init, init_strength=0.0, seed=5, steps=6, duration_s=0.5,
                    scheduler=scheduler)
    text = generate(server, seed=5, steps=6, duration_s=0.5, scheduler=scheduler)
    assert half.error is None, half.error
    assert half.steps and half.steps[-1][0] == half.steps[-1][1] < text.steps[-1][1]
    assert np.isfinite(half.waveform).all() and half.waveform.size == 8000
    assert not np.allclose(half.waveform, zero.waveform) and not np.allclose(half.waveform, text.waveform)
    again = generate(server, mode="vary", init_audio=init, init_strength=0.5, seed=5, steps=6, duration_s=0.5,
                     scheduler=scheduler)
    assert np.array_equal(half.waveform, again.waveform)  # deterministic for a seed


# ----------------------------------------------------------------------------------------------------------------
# CONTINUE
# ----------------------------------------------------------------------------------------------------------------
def reference_continuation(components, init: np.ndarray, known: int, new_frames: int, *, seed: int, steps: int,
                           guidance: float) -> tuple[np.ndarray, float]:
    """diffusers' AudioLDMPipeline (DDIM) doing the RePaint continuation through its public hooks: the starting
    ``latents`` carry the known region noised to the first timestep, and the step ``callback`` re-imposes it noised
    to the next timestep (exactly, after the last step). Returns (the whole window's waveform, normalisation gain)."""
    import torch

    step = audioldm.mel_config(components)["hop_length"] * components.vae_scale_factor
    known_latents, gain = reference_encode(components, init[init.size - known * step:], known)
    known_latents = torch.from_numpy(known_latents)
    pipe = audioldm.reference_pipeline(components, "ddim")
    shape = (1, components.unet.config.in_channels, known + new_frames,
             components.vocoder.config.model_in_dim // components.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    latents = noise.clone()  # DDIM's init_noise_sigma is 1
    latents[:, :, :known] = pipe.scheduler.add_noise(known_latents, noise[:, :, :known], timesteps[:1])

    def impose(i: int, t, x) -> None:
        nxt = pipe.scheduler.add_noise(known_latents, noise[:, :, :known], timesteps[i + 1].reshape(1)) \
            if i + 1 < len(timesteps) else known_latents
        x[:, :, :known] = nxt

    window_s = (known + new_frames) * step / RATE + 0.001
    audio = pipe(PROMPT, audio_length_in_s=window_s, num_inference_steps=steps, guidance_scale=guidance,
                 latents=latents, callback=impose, callback_steps=1,
                 generator=torch.Generator().manual_seed(seed)).audios[0]
    return audio / gain, gain


def test_continue_matches_diffusers_repaint_and_starts_where_the_init_ends(server, components):
    init, context_s, duration = clip(1.0), 0.256, 0.512
    got = generate(server, mode="continue", init_audio=init, context_s=context_s, seed=9, steps=5,
                   duration_s=duration, guidance_scale=2.5, scheduler="ddim")
    assert got.error is None, got.error
    step = audioldm.mel_config(components)["hop_length"] * components.vae_scale_factor
    known = int(context_s * RATE) // step
    assert got.waveform.size == int(duration * RATE) and got.context.size == known * step
    window, _ = reference_continuation(components, init, known, latent_frames(components, duration), seed=9,
                                       steps=5, guidance=2.5)
    offset = known * step
    err_new = float(np.max(np.abs(got.waveform - window[offset: offset + got.waveform.size])))
    err_known = float(np.max(np.abs(got.context - window[:offset])))
    peak = float(np.max(np.abs(window)))
    print(f"[continue] vs diffusers RePaint: max err new audio {err_new:.2g}, known region {err_known:.2g}, "
          f"peak {peak:.3g}")
    assert peak > 1e-2 and err_new <= 1e-4 * max(1.0, peak) and err_known <= 1e-4 * max(1.0, peak)
    # The output is the audio after the known region: the window's samples from `offset` on, not its start.
    assert not np.allclose(got.waveform[:step], window[:step], atol=1e-3)
    again = generate(server, mode="continue", init_audio=init, context_s=context_s, seed=9, steps=5,
                     duration_s=duration, guidance_scale=2.5, scheduler="ddim")
    assert np.array_equal(got.waveform, again.waveform)


def test_continue_default_context_and_batching_with_text(server):
    """Continuations and text generations run together; the UNet rows all execute (shape groups aside)."""
    client_a, client_b = StreamClient(server.grpc_url), StreamClient(server.grpc_url)
    try:
        rid_a = client_a.submit(mode="continue", init_audio=clip(0.3), seed=1, steps=3, duration_s=0.256)
        rid_b = client_b.submit(seed=2, steps=3, duration_s=0.25)
        for c in (client_a, client_b):
            c.wait_all(60)
    finally:
        client_a.close()
        client_b.close()
    a, b = client_a.streams[rid_a], client_b.streams[rid_b]
    assert a.error is None and b.error is None
    assert a.waveform.size == 4096 and a.context.size > 0


# ----------------------------------------------------------------------------------------------------------------
# refusals and cancellation
# ----------------------------------------------------------------------------------------------------------------
BAD = [
    (dict(init_audio=clip(0.1)), "'init_audio' is given but 'mode' is text"),
    (dict(mode="vary"), "mode vary needs 'init_audio'"),
    (dict(mode="continue"), "mode continue needs 'init_audio'"),
    (dict(mode="remix", init_audio=clip(0.1)), "unknown 'mode' 'remix'"),
    (dict(mode="vary", init_audio=clip(0.1), init_strength=1.5), "'init_strength' must be in [0, 1]"),
    (dict(mode="vary", init_audio=clip(0.1), init_strength=float("nan")), "'init_strength' must be in [0, 1]"),
    (dict(mode="vary", init_audio=np.array([0.0, np.nan, 0.1])), "NaN or infinite"),
    (dict(mode="continue", init_audio=clip(0.001)), "continuation needs at least"),
    (dict(mode="continue", init_audio=clip(0.5), context_s=-1.0), "'context_s' must be a positive"),
    (dict(mode="continue", init_audio=clip(1.0), context_s=1.0, duration_s=29.5), "exceeds the 30 s"),
    (dict(mode="vary", init_audio=np.zeros(31 * RATE, np.float32)), "at most 30 s"),
]


@pytest.mark.parametrize("params,message", BAD, ids=[m for _, m in BAD])
def test_bad_init_requests_are_refused_before_any_model_runs(server, params, message):
    before = unet_inferences(server)
    got = generate(server, **({"steps": 2, "duration_s": 0.25} | params))
    assert got.events == ["error"] and message in got.error, got.error
    assert unet_inferences(server) == before


def test_cancel_during_vary_stops_within_a_step(server):
    total = 200
    before = unet_inferences(server)
    client = StreamClient(server.grpc_url)
    rid = client.submit(mode="vary", init_audio=clip(0.5), init_strength=1.0, seed=3, steps=total, duration_s=0.5)
    while len(client.streams[rid].steps) < 3:
        assert client.pump()[1].error is None
    seen = len(client.streams[rid].steps)
    client.close(cancel=True)
    deadline = time.monotonic() + 30
    while f"audioldm {rid}: cancelled" not in server.log():
        assert time.monotonic() < deadline, "the pipeline model never reported the cancellation"
        time.sleep(0.1)
    executed = (unet_inferences(server) - before) // 2
    print(f"[cancel vary] progress seen {seen}, UNet steps executed {executed} of {total}")
    assert seen <= executed < seen + 20
