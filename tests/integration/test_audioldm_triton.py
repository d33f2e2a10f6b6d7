"""AudioLDM on a real tritonserver (tiny profile): parity with diffusers, streaming, cancellation, batching, errors.

The server is the session's shared tritonserver (tests/conftest.py ``triton``) when it serves the tiny AudioLDM
models built with seed SEED, else one started for this module over a repository with just those five models. The
tests use per-test deltas of Triton's statistics, so other traffic before them does not matter. The diffusers
reference is ``AudioLDMPipeline`` over the very same seeded components (the exporter caches
them per (profile, weights, seed)) and the tokenizer loaded from the built repository, i.e. from disk, like the
pipeline model does.

Parity tolerance: the Triton pipeline runs the components in onnxruntime, diffusers in torch; per-component
differences are ~1e-6 (see test_audioldm_export.py) and the denoising loop (x guidance) carries them to the audio.
Measured on the tiny profile (2-core Xeon, ORT 1.32, torch 2.13): max |triton - diffusers| over the waveform
7e-8 .. 1.5e-7 for every case below (ddim, dpm + negative prompt, euler, pndm, no-CFG), with waveform peaks ~0.1.
WAVEFORM_ATOL = 1e-5 leaves ~60x headroom for other CPUs / kernels while staying four orders of magnitude below the
signal, so a wrong step, guidance or scheduler detail (which changes the audio at the 1e-2 .. 1e-1 level) fails.
"""

from __future__ import annotations

import json
import sys
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
WAVEFORM_ATOL = 1e-5
PIPELINE = "audioldm"
PROMPT = "A hammer hitting a wooden surface"


# ----------------------------------------------------------------------------------------------------------------
# server
# ----------------------------------------------------------------------------------------------------------------
def _shared_triton(request):
    """The session's shared tritonserver (tests/conftest.py ``triton``) when it serves a tiny AudioLDM built with
    SEED — the reference below must use the same weights — else None."""
    try:
        shared = request.getfixturevalue("triton")
    except Exception:  # no such fixture (FixtureLookupError), or it could not start: use our own server
        return None
    manifest_path = Path(shared.repo_dir) / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("profile") != "tiny" or manifest.get("seed") != SEED or manifest.get("weights"):
        return None
    if not set(audioldm.MODELS) <= set(manifest.get("models", {})):
        return None
    try:
        shared.wait_models_ready(audioldm.MODELS, timeout_s=5)
    except Exception:
        return None
    return shared


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    shared = _shared_triton(request)
    if shared is not None:
        yield shared
        return
    root = tmp_path_factory.mktemp("audioldm_triton")
    build_repository("tiny", root / "repo", models=audioldm.MODELS, seed=SEED)
    triton = EmbeddedTriton(
        root / "repo",
        root / "triton.log",
        startup_timeout_s=180,
    )
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def repo_dir(server) -> Path:
    return server.repo_dir


@pytest.fixture(scope="module")
def reference(repo_dir):
    """(components, tokenizer loaded from the built repository)."""
    from transformers import RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(repo_dir / PIPELINE / "1" / "tokenizer", local_files_only=True)
    return audioldm.build_components("tiny", None, SEED), tokenizer


def diffusers_audio(reference, *, seed, steps, guidance_scale, duration_s, scheduler, negative_prompt=None):
    """diffusers' AudioLDMPipeline with exactly the values the server sees (FP32 inputs -> python floats)."""
    import torch

    components, tokenizer = reference
    pipe = audioldm.reference_pipeline(components, scheduler, tokenizer=tokenizer)
    return pipe(
        PROMPT,
        audio_length_in_s=float(np.float32(duration_s)),
        num_inference_steps=steps,
        guidance_scale=float(np.float32(guidance_scale)),
        negative_prompt=negative_prompt,
        generator=torch.Generator().manual_seed(seed),
    ).audios[0]


# ----------------------------------------------------------------------------------------------------------------
# client helpers
# ----------------------------------------------------------------------------------------------------------------
def StreamClient(url: str) -> audioldm_stream.StreamClient:  # noqa: N802 (a client with this module's prompt)
    return audioldm_stream.StreamClient(url, PROMPT)


def generate(server, prompt: str | None = PROMPT, **params) -> audioldm_stream.Stream:
    return audioldm_stream.generate(server.grpc_url, prompt, **params)


def stats(server, model: str) -> dict[str, int]:
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    try:
        s = client.get_inference_statistics(model_name=model).model_stats[0]
        return {
            "executions": int(s.execution_count),
            "inferences": int(s.inference_count),
            "requests": int(s.inference_stats.success.count),
        }
    finally:
        client.close()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
PARITY_CASES = [
    # (scheduler, steps, guidance, duration_s, negative prompt)
    ("ddim", 4, 2.5, 0.5, None),
    ("dpm", 3, 3.0, 0.25, "low quality, noise"),
    ("euler", 3, 2.5, 0.5, None),
    ("pndm", 3, 2.5, 0.375, None),
    ("ddim", 2, 1.0, 0.5, None),  # guidance <= 1: no classifier-free guidance (batch 1)
]


@pytest.mark.parametrize("scheduler,steps,guidance,duration,negative", PARITY_CASES)
def test_matches_diffusers(server, reference, scheduler, steps, guidance, duration, negative):
    got = generate(server, seed=7, steps=steps, guidance_scale=guidance, duration_s=duration,
                   scheduler=scheduler, negative_prompt=negative)
    assert got.error is None, got.error
    want = diffusers_audio(reference, seed=7, steps=steps, guidance_scale=guidance, duration_s=duration,
                           scheduler=scheduler, negative_prompt=negative)
    # Same length as diffusers — which is int(duration * sr) unless int(duration / hop) rounds the mel frames
    # down (0.25 s on the tiny 4 ms hop: 62 frames -> 3968 samples): the pipeline cuts but never pads.
    assert got.waveform.shape == want.shape and want.shape[0] <= int(duration * got.sample_rate)
    diff = float(np.max(np.abs(got.waveform - want)))
    print(f"[parity] {scheduler} steps={steps} g={guidance} d={duration}: max|triton-diffusers|={diff:.3g}, "
          f"peak={np.max(np.abs(want)):.3g}")
    assert np.max(np.abs(want)) > 100 * WAVEFORM_ATOL  # the comparison is not between two near-silent signals
    assert diff <= WAVEFORM_ATOL
    # A different seed must give different audio (the seed really drives the latents).
    other = diffusers_audio(reference, seed=8, steps=steps, guidance_scale=guidance, duration_s=duration,
                            scheduler=scheduler, negative_prompt=negative)
    assert np.max(np.abs(got.waveform - other)) > 100 * WAVEFORM_ATOL


def test_same_seed_same_audio(server):
    params = dict(seed=123, steps=3, guidance_scale=2.5, duration_s=0.5, scheduler="dpm")
    first, second = generate(server, **params), generate(server, **params)
    assert first.error is None and second.error is None
    assert np.array_equal(first.waveform, second.waveform)
    assert first.seed == second.seed == 123
    third = generate(server, **(params | {"seed": 124}))
    assert not np.allclose(first.waveform, third.waveform)


def test_omitted_seed_is_random_and_reported(server, reference):
    got = generate(server, steps=2, guidance_scale=2.5, duration_s=0.25)
    assert got.error is None and got.seed is not None and got.seed >= 0
    want = diffusers_audio(reference, seed=got.seed, steps=2, guidance_scale=2.5, duration_s=0.25, scheduler="ddim")
    assert np.max(np.abs(got.waveform - want)) <= WAVEFORM_ATOL


def test_stream_order(server):
    steps = 5
    got = generate(server, seed=1, steps=steps, guidance_scale=2.5, duration_s=0.5, scheduler="ddim")
    assert got.events == ["progress"] * steps + ["audio", "final"]
    assert got.steps == [(i, steps) for i in range(1, steps + 1)]
    assert got.sample_rate == 16000 and got.waveform.dtype == np.float32 and got.waveform.shape == (8000,)
    # PNDM (PLMS) runs one extra model evaluation: total_steps reports the real number of UNet steps.
    pndm = generate(server, seed=1, steps=3, guidance_scale=2.5, duration_s=0.25, scheduler="pndm")
    assert pndm.steps == [(i, 4) for i in range(1, 5)] and pndm.events[-2:] == ["audio", "final"]


def test_cancel_stops_early_and_server_stays_healthy(server):
    total = 200
    before = stats(server, "unet")
    client = StreamClient(server.grpc_url)
    rid = client.submit(seed=3, steps=total, guidance_scale=2.5, duration_s=0.5, scheduler="ddim")
    seen = 0
    while seen < 3:
        _, stream = client.pump(timeout=60)
        assert stream.error is None, stream.error
        seen = len(stream.steps)
    client.close(cancel=True)

    deadline = time.monotonic() + 30
    while f"audioldm {rid}: cancelled" not in server.log():
        assert time.monotonic() < deadline, "the pipeline model never reported the cancellation"
        time.sleep(0.1)
    executed = delta(before, stats(server, "unet"))["inferences"] // 2  # CFG: two UNet rows per step
    print(f"[cancel] progress seen by client: {seen}, UNet steps executed: {executed} of {total}")
    assert seen <= executed < seen + 20  # stopped within a few steps of the cancel, nowhere near 200
    time.sleep(0.5)
    assert delta(before, stats(server, "unet"))["inferences"] // 2 == executed  # and nothing ran afterwards

    after = generate(server, seed=3, steps=2, guidance_scale=2.5, duration_s=0.25)
    assert after.error is None and after.events[-2:] == ["audio", "final"]


BATCHING_ROUNDS = 3


def test_concurrent_generations_batch_unet(server, reference):
    """Four concurrent generations: every UNet step's rows are batched (CFG pairs), and steps of different
    generations share executions. That sharing is opportunistic by design (the dynamic batcher joins what is queued
    within its delay), so on a loaded machine one round's steps can all miss each other; it must happen in at least
    one of BATCHING_ROUNDS rounds, and every round's audio must equal diffusers'."""
    n, steps = 4, 8
    shared = []
    for _ in range(BATCHING_ROUNDS):
        before = stats(server, "unet")
        client = StreamClient(server.grpc_url)
        try:
            ids = [client.submit(seed=10 + i, steps=steps, guidance_scale=2.5, duration_s=0.5, scheduler="ddim")
                   for i in range(n)]
            client.wait_all()
        finally:
            client.close()
        d = delta(before, stats(server, "unet"))
        print(f"[batching] {n} concurrent generations x {steps} steps: unet requests={d['requests']} "
              f"rows={d['inferences']} executions={d['executions']}")
        assert d["requests"] == n * steps and d["inferences"] == 2 * n * steps
        assert d["executions"] < d["inferences"]
        for i, rid in enumerate(ids):
            got = client.streams[rid]
            assert got.error is None and got.events[-2:] == ["audio", "final"]
            want = diffusers_audio(reference, seed=10 + i, steps=steps, guidance_scale=2.5, duration_s=0.5,
                                   scheduler="ddim")
            assert np.max(np.abs(got.waveform - want)) <= WAVEFORM_ATOL  # batching does not change results
        shared.append(d["executions"] < d["requests"])  # requests of different generations shared executions
        if shared[-1]:
            break
    assert any(shared), shared


def test_unet_row_slices_match_one_run(server, repo_dir):
    """The UNet config runs batches of >= 2 rows as two row slices side by side (row_parallelism); each row must
    come back as one whole-batch onnxruntime run computes it, in order, for even and odd splits and for a single
    row (which takes the all-cores session)."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repo_dir / "unet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.parameters["row_parallelism"].string_value == "2"
    session = ort.InferenceSession(str(repo_dir / "unet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    channels, width = session.get_inputs()[0].shape[1], session.get_inputs()[0].shape[3]
    labels_dim = session.get_inputs()[2].shape[1]
    rng = np.random.default_rng(7)
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    try:
        for rows in (1, 2, 3, 5):
            feeds = {"sample": rng.standard_normal((rows, channels, 16, width)).astype(np.float32),
                     "timestep": rng.uniform(0, 999, (rows, 1)).astype(np.float32),
                     "class_labels": rng.standard_normal((rows, labels_dim)).astype(np.float32)}
            inputs = []
            for name, array in feeds.items():
                tensor = tritonclient_grpc.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            got = client.infer("unet", inputs).as_numpy("noise_pred")
            want = session.run(["noise_pred"], feeds)[0]
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= 1e-5, rows
    finally:
        client.close()


BAD_REQUESTS = [
    (dict(prompt=""), "'prompt' must be a non-empty string"),
    (dict(prompt="   "), "'prompt' must be a non-empty string"),
    (dict(prompt="synth " * 100), "'prompt' is"),
    (dict(negative_prompt="noise " * 100), "'negative_prompt' is"),
    (dict(steps=0), "'steps' must be in [1, 200]"),
    (dict(steps=201), "'steps' must be in [1, 200]"),
    (dict(duration_s=0.001), "'duration_s' must be in"),
    (dict(duration_s=31.0), "'duration_s' must be in"),
    (dict(duration_s=float("nan")), "'duration_s' must be in"),
    (dict(guidance_scale=-0.5), "'guidance_scale' must be a finite number >= 0"),
    (dict(guidance_scale=float("inf")), "'guidance_scale' must be a finite number >= 0"),
    (dict(scheduler="warp-drive"), "unknown 'scheduler' 'warp-drive'"),
    (dict(seed=-1), "'seed' must be >= 0"),
]


@pytest.mark.parametrize("params,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_rejected_before_any_model_runs(server, params, message):
    before = {m: stats(server, m) for m in ("clap_text_encoder", "unet")}
    request = {"prompt": PROMPT, "steps": 2, "duration_s": 0.25} | params
    got = generate(server, **request)
    assert got.events == ["error"], got.events
    assert message in got.error
    for model, b in before.items():
        assert stats(server, model)["requests"] == b["requests"], f"{model} ran for an invalid request"


def test_missing_prompt_rejected_by_triton(server):
    got = generate(server, prompt=None, steps=2)
    assert got.events == ["error"] and "prompt" in got.error


def test_pipeline_log_has_no_errors(server):
    assert "generation failed" not in server.log()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
