"""wav2vec2 served by a real tritonserver (python backend): batching is exact and per-request errors are isolated.

The module materialises its own one-model repository (the builder's template copy + tiny export) and starts its
own EmbeddedTriton, so it tests exactly the committed config.pbtxt/model.py, independent of the shared suite server.
Requests go out with ``async_infer`` from one thread so a burst reaches the dynamic batcher within a few ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from grym_synth.inference.export import wav2vec2 as w2v  # noqa: E402
from grym_synth.inference.export.repository import _copy_template  # noqa: E402
from grym_synth.inference.triton_process import EmbeddedTriton  # noqa: E402

MODEL = "wav2vec2"
SEED = 7
# Triton result vs the same graph in-process, and batched vs alone: ORT picks different GEMM blockings for
# different batch sizes, which moves float32 results by ~1e-6 at most.
ATOL = 1e-5


@dataclass
class Served:
    server: EmbeddedTriton
    onnx_path: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("w2v_triton")
    model_dir = _copy_template(MODEL, root / "repo")
    w2v.export("tiny", model_dir, None, SEED)
    server = EmbeddedTriton(root / "repo", root / "triton.log", startup_timeout_s=120)
    server.start()
    try:
        server.wait_models_ready([MODEL], timeout_s=60)
        yield Served(server, model_dir / "1" / "model.onnx")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator["grpcclient.InferenceServerClient"]:
    c = grpcclient.InferenceServerClient(served.server.grpc_url)
    yield c
    c.close()


def _inputs(audio: np.ndarray) -> list:
    tensor = grpcclient.InferInput("audio", list(audio.shape), "FP32")
    tensor.set_data_from_numpy(audio)
    return [tensor]


def _outputs() -> list:
    return [grpcclient.InferRequestedOutput(name) for name in w2v.OUTPUT_NAMES]


def infer(client, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    result = client.infer(MODEL, _inputs(audio), outputs=_outputs())
    return result.as_numpy("features"), result.as_numpy("embedding")


def burst(client, clips: list[np.ndarray], timeout_s: float = 60.0) -> list:
    """Send all clips back-to-back with async_infer; return per clip (features, embedding) or the exception."""
    results: list = [None] * len(clips)
    done = threading.Semaphore(0)

    def callback(index: int):
        def _cb(result, error) -> None:
            results[index] = error if error is not None else (result.as_numpy("features"), result.as_numpy("embedding"))
            done.release()

        return _cb

    for i, clip in enumerate(clips):
        client.async_infer(MODEL, _inputs(clip), callback(i), outputs=_outputs())
    for _ in clips:
        assert done.acquire(timeout=timeout_s), "Triton did not answer the burst in time"
    return results


@dataclass
class Stats:
    inferences: int
    executions: int
    executions_by_batch_size: dict[int, int]


def stats(client) -> Stats:
    (model,) = client.get_inference_statistics(MODEL).model_stats
    by_size = {int(b.batch_size): int(b.compute_infer.count) for b in model.batch_stats}
    return Stats(int(model.inference_count), int(model.execution_count), by_size)


def clip(rng: np.random.Generator, samples: int, rows: int = 1) -> np.ndarray:
    return (0.2 * rng.standard_normal((rows, samples))).astype(np.float32)


def test_single_request_equals_the_exported_graph(client, served: Served) -> None:
    session = w2v.onnx_session(served.onnx_path)
    rng = np.random.default_rng(0)
    for samples in (w2v.MIN_SAMPLES, 3333, 16000):
        audio = clip(rng, samples, rows=2)
        features, embedding = infer(client, audio)
        ref_features, ref_embedding = session.run(list(w2v.OUTPUT_NAMES), {"audio": audio})
        assert features.shape == (2, w2v.num_frames(samples), 32)
        np.testing.assert_allclose(features, ref_features, atol=ATOL, rtol=0)
        np.testing.assert_allclose(embedding, ref_embedding, atol=ATOL, rtol=0)


def test_concurrent_distinct_lengths_are_batched_and_exact(client) -> None:
    """Every clip has its own length, so any execution with batch size > 1 mixed lengths inside model.py;
    each response must still equal the clip's single-request result."""
    rng = np.random.default_rng(1)
    lengths = [400, 401, 1000, 2345, 3200, 4000, 5555, 8000, 9999, 12000, 16000, 20000]
    clips = [clip(rng, n) for n in lengths]
    alone = [infer(client, c) for c in clips]

    before = stats(client)
    results = burst(client, clips)
    # Triton records a request's statistics when the backend releases it, which can be just after the client
    # already holds the response: wait (briefly) until the burst is counted.
    deadline = time.monotonic() + 5.0
    while (after := stats(client)).inferences - before.inferences < len(clips) and time.monotonic() < deadline:
        time.sleep(0.02)

    for n, got, ref in zip(lengths, results, alone):
        assert not isinstance(got, Exception), f"{n} samples: {got}"
        assert got[0].shape == (1, w2v.num_frames(n), 32)
        np.testing.assert_allclose(got[0], ref[0], atol=ATOL, rtol=0, err_msg=f"{n} samples")
        np.testing.assert_allclose(got[1], ref[1], atol=ATOL, rtol=0, err_msg=f"{n} samples")
    assert after.inferences - before.inferences == len(clips)
    mixed = {size: count - before.executions_by_batch_size.get(size, 0)
             for size, count in after.executions_by_batch_size.items() if size > 1}
    assert sum(mixed.values()) >= 1, f"no multi-request execution formed: {after} vs {before}"


def test_concurrent_same_length_requests_are_batched(client) -> None:
    rng = np.random.default_rng(2)
    clips = [clip(rng, 16000) for _ in range(16)]
    alone = [infer(client, c) for c in clips]

    before = stats(client)
    results = burst(client, clips)
    # Triton records a request's statistics when the backend releases it, which can be just after the client
    # already holds the response: wait (briefly) until the burst is counted.
    deadline = time.monotonic() + 5.0
    while (after := stats(client)).inferences - before.inferences < len(clips) and time.monotonic() < deadline:
        time.sleep(0.02)

    for got, ref in zip(results, alone):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got[0], ref[0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1], ref[1], atol=ATOL, rtol=0)
    inferences = after.inferences - before.inferences
    executions = after.executions - before.executions
    # >=: a request of the previous test's burst may still complete inside this window
    assert inferences >= len(clips)
    assert inferences > executions, f"16 concurrent 1 s requests ran in {executions} executions: no batching"


def test_multi_row_requests_are_split_back_correctly(client) -> None:
    """Requests carrying several rows, mixed with single-row requests of the same and other lengths."""
    rng = np.random.default_rng(3)
    clips = [clip(rng, 8000, rows=3), clip(rng, 8000), clip(rng, 4000, rows=2), clip(rng, 8000, rows=2),
             clip(rng, 4000)]
    alone = [infer(client, c) for c in clips]
    for got, ref, sent in zip(burst(client, clips), alone, clips):
        assert not isinstance(got, Exception), got
        assert got[0].shape[0] == got[1].shape[0] == sent.shape[0]
        np.testing.assert_allclose(got[0], ref[0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1], ref[1], atol=ATOL, rtol=0)


def test_bad_requests_fail_alone(client) -> None:
    rng = np.random.default_rng(4)
    good = [clip(rng, 16000), clip(rng, 16000), clip(rng, 6000)]
    too_short = clip(rng, w2v.MIN_SAMPLES - 1)
    not_finite = clip(rng, 16000)
    not_finite[0, 123] = np.nan
    infinite = clip(rng, 6000)
    infinite[0, -1] = np.inf
    alone = [infer(client, c) for c in good]

    results = burst(client, [good[0], too_short, good[1], not_finite, infinite, good[2]])

    for got, ref in zip([results[0], results[2], results[5]], alone):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got[0], ref[0], atol=ATOL, rtol=0)
    for got, needle in [(results[1], "at least 400"), (results[3], "NaN or infinite"), (results[4], "NaN or infinite")]:
        assert isinstance(got, InferenceServerException), got
        assert needle in got.message()
        assert got.status() == "StatusCode.INVALID_ARGUMENT"


def test_short_audio_is_rejected_on_the_sync_path(client) -> None:
    with pytest.raises(InferenceServerException, match="at least 400"):
        infer(client, np.zeros((1, 10), np.float32))
    # The model keeps serving after errors.
    features, _ = infer(client, np.zeros((1, w2v.MIN_SAMPLES), np.float32))
    assert features.shape == (1, 1, 32) and np.isfinite(features).all()
