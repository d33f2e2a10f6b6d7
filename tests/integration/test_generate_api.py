"""Generate through the real orchestrator and Triton: stream order, parity with diffusers, reproducibility,
cancellation, batching of concurrent generations, bad inputs and missing models."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc.aio as ta

from conftest import orchestrator_args
from grym import AsyncClient, Client, GrymError, wav_from_events
from grym.v1 import orchestrator_pb2 as pb
from grym_synth.inference.triton_process import EmbeddedTriton, free_port
from support import OrchestratorProcess

PROMPT = "warm analog pad, slow attack"


def audio_of(events: list[pb.GenerateResponse]) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(wav_from_events(events)), dtype="float32")
    assert rate == 16_000
    return samples


def test_stream_order_progress_audio_result_and_store(client: Client) -> None:
    events = list(client.generate(PROMPT, seconds=2.0, steps=6, seed=1234, store=True, tags={"kind": "pad"}))
    kinds = [e.WhichOneof("event") for e in events]
    n_progress = kinds.count("progress")
    assert kinds == ["progress"] * n_progress + ["audio"] * kinds.count("audio") + ["result"]
    assert [e.progress.step for e in events[:n_progress]] == list(range(1, 7))
    assert {e.progress.total_steps for e in events[:n_progress]} == {6}
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks))) and chunks[-1].last
    result = events[-1].result
    audio = audio_of(events)
    assert result.seed == 1234 and result.sample_rate_hz == 16_000
    assert result.duration_seconds == pytest.approx(len(audio) / 16_000) and abs(len(audio) / 16_000 - 2.0) < 0.2
    assert result.frames > 0 and len(result.embedding) == 32
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0

    pattern = client.get_pattern(result.pattern_id)
    assert pattern.source == "generate" and dict(pattern.tags) == {"kind": "pad"}
    meta = dict(pattern.metadata)
    assert meta["prompt"] == PROMPT and meta["seed"] == "1234" and meta["steps"] == "6"
    assert meta["scheduler"] == "ddim" and meta["model"] == "audioldm"
    # The metadata regenerates the audio exactly.
    again = list(client.generate(meta["prompt"], seconds=float(meta["duration_s"]), steps=int(meta["steps"]),
                                 guidance_scale=float(meta["guidance_scale"]), seed=int(meta["seed"]),
                                 scheduler=meta["scheduler"]))
    np.testing.assert_array_equal(audio_of(again), audio)


def test_served_audio_matches_diffusers_pipeline(client: Client) -> None:
    """Same seeded weights, seed, scheduler and steps: the served WAV equals diffusers' AudioLDMPipeline output
    up to the 16-bit WAV quantisation (plus ONNX-vs-PyTorch float noise)."""
    import torch

    from grym_synth.inference.export.audioldm import build_components, reference_pipeline

    for scheduler, seed in (("ddim", 99), ("dpm", 100)):
        events = list(client.generate(PROMPT, seconds=2.0, steps=5, seed=seed, guidance_scale=2.5,
                                      negative_prompt="noise", scheduler=scheduler))
        served = audio_of(events)
        pipe = reference_pipeline(build_components("tiny", None, 0), scheduler=scheduler)
        ref = pipe(PROMPT, negative_prompt="noise", num_inference_steps=5, guidance_scale=2.5, audio_length_in_s=2.0,
                   generator=torch.Generator().manual_seed(seed)).audios[0]
        assert served.shape == ref.shape
        assert np.abs(served - np.clip(ref, -1, 1)).max() < 2e-3, (scheduler, np.abs(served - ref).max())


async def _unet_stats(triton: EmbeddedTriton) -> tuple[int, int]:
    c = ta.InferenceServerClient(triton.grpc_url)
    try:
        s = (await c.get_inference_statistics("unet", as_json=True))["model_stats"][0]
    finally:
        await c.close()
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


async def test_concurrent_generations_share_unet_batches(orchestrator, triton: EmbeddedTriton) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(orchestrator.target) as c:
        async def one(seed: int) -> list[pb.GenerateResponse]:
            return [e async for e in c.generate(PROMPT, seconds=2.0, steps=8, seed=seed)]

        before = await _unet_stats(triton)
        results = await asyncio.gather(*(one(5000 + i) for i in range(4)))
        after = await _unet_stats(triton)
    assert all(r[-1].WhichOneof("event") == "result" and not r[-1].result.cached for r in results)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences >= 4 * 8  # every step of every generation ran the UNet
    assert executions < inferences, (executions, inferences)


async def test_cancel_stops_the_denoising_loop(orchestrator, triton: EmbeddedTriton) -> None:  # type: ignore[no-untyped-def]
    steps = 150
    async with AsyncClient(orchestrator.target) as c:
        before = await _unet_stats(triton)
        seen = 0
        stream = c.generate(PROMPT, seconds=2.0, steps=steps, seed=77)
        async for event in stream:
            if event.WhichOneof("event") == "progress":
                seen = event.progress.step
                if seen >= 3:
                    break
        await stream.aclose()  # what leaving the loop does once the generator is collected: cancels the RPC
        await asyncio.sleep(2.0)  # let the cancellation reach the pipeline model
        mid = await _unet_stats(triton)
        await asyncio.sleep(1.5)
        after = await _unet_stats(triton)
        # The server is still healthy and serves the next request.
        events = [e async for e in c.generate(PROMPT, seconds=1.0, steps=2, seed=78)]
    assert seen == 3
    assert after[0] == mid[0], "UNet still being called after cancellation"
    assert after[0] - before[0] < steps // 2, after[0] - before[0]
    assert events[-1].WhichOneof("event") == "result"


def test_deadline_stops_generation(client: Client) -> None:
    t0 = time.perf_counter()
    with pytest.raises(GrymError) as err:
        list(client.generate(PROMPT, seconds=2.0, steps=200, seed=5, timeout_s=1.0))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - t0 < 3.0


BAD = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * 1001}, "at most 1000"),
    ({"prompt": PROMPT, "steps": 201}, "steps"),
    ({"prompt": PROMPT, "steps": -1}, "steps"),
    ({"prompt": PROMPT, "duration_seconds": 31}, "duration_seconds"),
    ({"prompt": PROMPT, "duration_seconds": -2}, "duration_seconds"),
    ({"prompt": PROMPT, "guidance_scale": -0.5}, "guidance_scale"),
    ({"prompt": PROMPT, "guidance_scale": 51}, "guidance_scale"),
    ({"prompt": PROMPT, "guidance_scale": float("nan")}, "guidance_scale"),
    ({"prompt": PROMPT, "scheduler": 99}, "scheduler"),
    ({"prompt": PROMPT, "seed": -3}, "seed"),
    ({"prompt": PROMPT, "store": True, "tags": {"bad key": "v"}}, "key"),
]


@pytest.mark.parametrize("fields,says", BAD, ids=[s for _, s in BAD])
def test_bad_generate_requests(client: Client, fields: dict, says: str) -> None:
    before = sorted(p.pattern_id for p in client.list_patterns(page_size=1000))
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in err.value.details()
    assert sorted(p.pattern_id for p in client.list_patterns(page_size=1000)) == before


def test_missing_component_model_is_unavailable_with_its_name(tiny_repository: Path, tmp_path: Path) -> None:
    """Triton serves the pipeline but not the UNet: Generate is UNAVAILABLE naming it, analysis still works,
    and nothing is written to the pattern store."""
    server = EmbeddedTriton(tiny_repository, tmp_path / "triton.log", ports=(free_port(), free_port(), free_port()),
                            extra_args=["--model-control-mode=explicit", "--load-model=wav2vec2",
                                        "--load-model=audioldm", "--load-model=clap_text_encoder",
                                        "--load-model=vae_decoder", "--load-model=vocoder"])
    server.start()
    orch = OrchestratorProcess(tmp_path / "orch", orchestrator_args(server)).start()
    try:
        with Client(orch.target) as c:
            assert c.health("generation") == "NOT_SERVING" and c.health() == "SERVING"
            with pytest.raises(GrymError) as err:
                list(c.generate(PROMPT, seconds=1.0, steps=2, seed=1, store=True))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "triton:unet" in err.value.message
            assert list(c.list_patterns()) == []
    finally:
        orch.stop()
        server.stop()
