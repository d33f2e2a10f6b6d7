"""AnalyzeAudio, StreamAnalyze and the pattern RPCs against the real orchestrator, Triton and milvus-lite."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grym import AsyncClient, Client, GrymError
from grym.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.core.audio import to_mono_16k
from grym_synth.inference.export.wav2vec2 import num_frames
from support import tone, wav_bytes


@pytest.fixture(scope="module")
def ort_session(tiny_repository: Path) -> ort.InferenceSession:
    """The same ONNX file Triton serves, run in-process: the reference for the whole served path."""
    return ort.InferenceSession(str(tiny_repository / "wav2vec2" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])


def reference(session: ort.InferenceSession, samples_16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, embedding = session.run(["features", "embedding"], {"audio": samples_16k[None, :]})
    return features[0], embedding[0]


def test_health_reports_every_component(client: Client) -> None:
    for service in ("", "grym.v1.Orchestrator", "triton", "milvus"):
        assert client.health(service) == "SERVING", service


def test_reflection_lists_the_api(orchestrator) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(orchestrator.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"grym.v1.Orchestrator", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "rate,channels,subtype",
    [(16_000, 1, "PCM_16"), (44_100, 2, "PCM_16"), (48_000, 1, "PCM_24"), (8_000, 1, "FLOAT"), (22_050, 6, "PCM_32")],
)
def test_analyze_wav_formats_match_in_process_onnx(client: Client, ort_session, rate: int, channels: int,
                                                    subtype: str) -> None:
    samples = tone(1.5, rate, channels=channels, seed=rate)
    data = wav_bytes(samples, rate, subtype)
    result = client.analyze(data, include_features=True)
    # What the server must have computed: the WAV decoded, mixed down, resampled, then the ONNX model.
    import io
    import soundfile as sf

    decoded, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = to_mono_16k(decoded, rate)
    ref_features, ref_embedding = reference(ort_session, mono)
    assert result.frames == num_frames(len(mono)) == ref_features.shape[0]
    assert result.duration_seconds == pytest.approx(len(mono) / 16_000)
    assert result.features is not None and result.features.shape == ref_features.shape
    np.testing.assert_allclose(result.embedding, ref_embedding, atol=1e-5)
    np.testing.assert_allclose(result.features, ref_features, atol=1e-5)
    np.testing.assert_allclose(result.embedding, result.features.mean(axis=0), atol=1e-5)


def test_pcm_float32_and_linear16_equal_wav(client: Client) -> None:
    samples = tone(1.0, 16_000, seed=7)
    as_float = client.analyze(samples, sample_rate_hz=16_000)
    pcm16 = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    as_int = client._call(client.stub.AnalyzeAudio, pb.AnalyzeAudioRequest(audio=common_pb2.AudioInput(
        pcm=common_pb2.PcmAudio(data=pcm16.tobytes(), sample_rate_hz=16_000,
                                encoding=common_pb2.PcmAudio.ENCODING_LINEAR16))))
    as_wav = client.analyze(wav_bytes(samples, 16_000, "PCM_16"))
    assert as_float.frames == as_int.frames == as_wav.frames == 49
    # Two 16-bit quantisations (ours x32767, libsndfile's x32768) of the same signal: equal up to that.
    np.testing.assert_allclose(np.asarray(as_int.embedding), as_wav.embedding, atol=5e-4)
    np.testing.assert_allclose(as_float.embedding, as_wav.embedding, atol=2e-3)  # 16-bit quantisation only
    assert as_float.features is None  # only on request


def test_request_id_is_echoed(client: Client) -> None:
    result = client.analyze(tone(0.5), sample_rate_hz=16_000, request_id="my-req-42")
    assert result.request_id == "my-req-42"
    with pytest.raises(GrymError) as err:
        client.analyze(b"not a wav", request_id="bad-req-7")
    assert "request_id=bad-req-7" in err.value.message


def test_store_get_search_delete(client: Client) -> None:
    a = client.analyze(tone(1.0, freq=220, seed=1), sample_rate_hz=16_000, store=True,
                       tags={"mood": "calm", "test": "crud"}, source="unit-test")
    b = client.analyze(tone(1.0, freq=230, seed=2), sample_rate_hz=16_000, store=True,
                       tags={"mood": "dark", "test": "crud"})
    assert a.pattern_id and b.pattern_id and a.tags == {"mood": "calm", "test": "crud"}

    got = client.get_pattern(a.pattern_id, include_embedding=True)
    assert got.pattern_id == a.pattern_id and got.source == "unit-test" and got.model == "wav2vec2"
    assert got.profile == "tiny" and got.duration_seconds == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(got.embedding), a.embedding, atol=1e-6)
    assert len(client.get_pattern(a.pattern_id).embedding) == 0  # vectors only on request

    by_vector = client.search(embedding=a.embedding.tolist(), top_k=5, tag_filter={"test": "crud"})
    assert by_vector[0].pattern.pattern_id == a.pattern_id and by_vector[0].score == pytest.approx(1.0, abs=1e-4)
    assert {m.pattern.pattern_id for m in by_vector} == {a.pattern_id, b.pattern_id}
    by_id = client.search(pattern_id=a.pattern_id, top_k=5, tag_filter={"test": "crud"})
    assert [m.pattern.pattern_id for m in by_id] == [b.pattern_id]  # the anchor itself is excluded
    filtered = client.search(embedding=a.embedding.tolist(), top_k=5, tag_filter={"test": "crud", "mood": "dark"})
    assert [m.pattern.pattern_id for m in filtered] == [b.pattern_id]

    client.delete_pattern(a.pattern_id)
    with pytest.raises(GrymError) as err:
        client.get_pattern(a.pattern_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(GrymError) as err:
        client.delete_pattern(a.pattern_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert client.get_pattern(b.pattern_id).pattern_id == b.pattern_id


def test_list_patterns_pages_newest_first(client: Client) -> None:
    ids = [client.analyze(tone(0.5, seed=100 + i), sample_rate_hz=16_000, store=True,
                          tags={"test": "paging"}).pattern_id for i in range(5)]
    pages, token = [], ""
    while True:
        resp = client.stub.ListPatterns(pb.ListPatternsRequest(page_size=2, page_token=token,
                                                               tag_filter={"test": "paging"}))
        pages.append([p.pattern_id for p in resp.patterns])
        token = resp.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for page in pages for i in page] == list(reversed(ids))
    with pytest.raises(grpc.RpcError) as err:  # a token is bound to its filter
        client.stub.ListPatterns(pb.ListPatternsRequest(page_size=2, page_token=resp.next_page_token or "eyJvIjoyfQ=="))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_analyze_windows_and_summary(client: Client, ort_session) -> None:
    rate = 16_000
    samples = tone(23.0, rate, seed=3)  # windows of 10 s: 10 + 10 + 3
    responses = list(client.stream_analyze(samples, rate, store=True, tags={"test": "stream"}))
    interim, final = responses[:-1], responses[-1]
    assert [r.is_final for r in responses] == [False] * 3 + [True]
    assert [r.window_index for r in interim] == [0, 1, 2]
    assert [(r.start_seconds, r.end_seconds) for r in interim] == [(0, 10), (10, 20), (20, 23)]
    for r in interim:  # each window is exactly the single-clip analysis of that slice
        piece = samples[int(r.start_seconds * rate): int(r.end_seconds * rate)]
        _, ref = reference(ort_session, piece)
        np.testing.assert_allclose(np.asarray(r.embedding), ref, atol=1e-5)
    frames = [r.frames for r in interim]
    assert final.frames == sum(frames) and final.end_seconds == pytest.approx(23.0)
    pooled = sum(np.asarray(r.embedding) * f for r, f in zip(interim, frames)) / sum(frames)
    np.testing.assert_allclose(np.asarray(final.embedding), pooled, atol=1e-5)
    assert final.pattern_id and client.get_pattern(final.pattern_id).source == "stream"


def test_stream_analyze_resamples_chunks(client: Client) -> None:
    samples = tone(3.0, 44_100, channels=2, seed=9)
    responses = list(client.stream_analyze(samples, 44_100))
    assert responses[-1].is_final and responses[-1].end_seconds == pytest.approx(3.0, abs=1e-3)
    assert responses[-1].frames == num_frames(48_000)


async def test_concurrent_mixed_lengths_match_single_requests(orchestrator, triton, ort_session) -> None:  # type: ignore[no-untyped-def]
    """32 concurrent requests of 4 lengths (never seen before, so no cache hit): every batched result equals the
    one-clip-at-a-time ONNX Runtime result, and Triton did batch them (fewer executions than inferences)."""
    lengths = [16_000, 16_000, 24_000, 8_000] * 8
    batched_bursts = 0
    async with AsyncClient(orchestrator.target) as c:
        for burst in range(5):  # a loaded box may spread one burst out; one batched burst of five is proof
            clips = [tone(n / 16_000, seed=1000 + 100 * burst + i) for i, n in enumerate(lengths)]
            before = await _wav2vec2_stats(triton)
            batched = await asyncio.gather(*(c.analyze(x, sample_rate_hz=16_000) for x in clips))
            after = await _wav2vec2_stats(triton)
            for clip, got in zip(clips, batched):
                _, ref = reference(ort_session, clip)
                assert got.frames == num_frames(len(clip))
                np.testing.assert_allclose(got.embedding, ref, atol=1e-5)
            inferences = after["inference_count"] - before["inference_count"]
            executions = after["execution_count"] - before["execution_count"]
            assert inferences == len(clips)
            if executions < inferences:
                batched_bursts += 1
                break
    assert batched_bursts == 1, "Triton never batched concurrent AnalyzeAudio requests"


def test_repeated_audio_is_answered_from_the_cache(orchestrator, triton, client: Client) -> None:  # type: ignore[no-untyped-def]
    clip = tone(0.7, seed=4242)
    first = client.analyze(clip, sample_rate_hz=16_000)
    before = asyncio.run(_wav2vec2_stats(triton))
    again = client.analyze(clip, sample_rate_hz=16_000, store=True, tags={"test": "cache"})
    after = asyncio.run(_wav2vec2_stats(triton))
    assert after["inference_count"] == before["inference_count"]  # Triton was not asked again
    np.testing.assert_array_equal(again.embedding, first.embedding)
    assert again.pattern_id  # storing is a side effect: it still happens on a hit
    text = urllib.request.urlopen(orchestrator.metrics_url, timeout=5).read().decode()
    assert 'grym_cache_requests_total{cache="analysis",result="hit"}' in text


async def _wav2vec2_stats(triton) -> dict[str, int]:  # type: ignore[no-untyped-def]
    import tritonclient.grpc.aio as ta

    c = ta.InferenceServerClient(triton.grpc_url)
    try:
        stats = await c.get_inference_statistics("wav2vec2", as_json=True)
    finally:
        await c.close()
    s = stats["model_stats"][0]
    return {"inference_count": int(s.get("inference_count", 0)), "execution_count": int(s.get("execution_count", 0))}


def test_metrics_endpoint(orchestrator, client: Client) -> None:  # type: ignore[no-untyped-def]
    client.analyze(tone(0.5), sample_rate_hz=16_000)
    text = urllib.request.urlopen(orchestrator.metrics_url, timeout=5).read().decode()
    for name in ('grym_rpc_requests_total{code="OK",method="AnalyzeAudio"}', "grym_rpc_latency_seconds_bucket",
                 'grym_triton_request_latency_seconds_count{model="wav2vec2"}', "grym_rpc_inflight",
                 'grym_breaker_state{breaker="triton:wav2vec2",state="closed"} 1.0', "process_resident_memory_bytes",
                 'grym_health_serving{service="milvus"}', 'grym_health_serving{service="grym.v1.Orchestrator"}'):
        assert name in text, name
    # The health gauges mirror the probes, which run every 2 s with a 4 s timeout: on a loaded machine one probe can
    # miss and the gauge read 0 until the next. A healthy server reads 1 again within a few probes.
    serving = 'grym_health_serving{service="grym.v1.Orchestrator"} 1.0'
    deadline = time.monotonic() + 15
    while serving not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = urllib.request.urlopen(orchestrator.metrics_url, timeout=5).read().decode()
    assert serving in text


def test_grafana_dashboard_uses_exported_metric_names(orchestrator) -> None:  # type: ignore[no-untyped-def]
    """The dashboard in deploy/grafana is built on the metric names: every name it queries must be exported."""
    import json
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/grym-synth-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))  # rows have none
    used = set(re.findall(r"\b((?:grym|process)_[a-z_]+)", exprs))
    text = urllib.request.urlopen(orchestrator.metrics_url, timeout=5).read().decode()
    families = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    exported = families | {f + s for f in families for s in ("_total", "_bucket", "_count", "_sum")}
    assert used and used <= exported, used - exported


def test_request_id_is_an_exemplar_of_the_latency_histogram(orchestrator, client: Client) -> None:  # type: ignore[no-untyped-def]
    client.analyze(tone(0.4, seed=31337), sample_rate_hz=16_000, request_id="exemplar-req-1")
    req = urllib.request.Request(orchestrator.metrics_url, headers={"Accept": "application/openmetrics-text"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    assert '# {request_id="exemplar-req-1"}' in text
