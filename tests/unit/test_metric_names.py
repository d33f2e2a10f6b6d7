"""Metric conventions (core/metrics.py): Triton's cumulative statistics become counters that only grow (also across
a Triton restart), breaker states are one 0/1 gauge per state, names end in their base unit or ``_total``."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from grym_synth.core.metrics import BREAKER_STATES, Metrics


def stats(count: int, queue_ns: int, infer_ns: int, model: str = "wav2vec2") -> dict:
    return {"model_stats": [{"name": model, "inference_stats": {
        "success": {"count": count}, "queue": {"ns": queue_ns}, "compute_input": {"ns": 0},
        "compute_infer": {"ns": infer_ns}, "compute_output": {"ns": 0}}}]}


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_triton_statistics_become_counters_that_survive_a_restart() -> None:
    m = Metrics()
    m.record_triton_stats(stats(4, 2_000_000_000, 6_000_000_000))
    m.record_triton_stats(stats(10, 5_000_000_000, 9_000_000_000))
    assert value(m, "grym_triton_inferences_total", model="wav2vec2") == 10
    assert value(m, "grym_triton_queue_seconds_total", model="wav2vec2") == 5.0
    assert value(m, "grym_triton_compute_seconds_total", model="wav2vec2") == 9.0
    m.record_triton_stats(stats(3, 1_000_000_000, 1_500_000_000))  # Triton restarted: its numbers began again
    assert value(m, "grym_triton_inferences_total", model="wav2vec2") == 13
    assert value(m, "grym_triton_queue_seconds_total", model="wav2vec2") == 6.0
    assert value(m, "grym_triton_compute_seconds_total", model="wav2vec2") == 10.5
    m.record_triton_stats({"model_stats": [{"name": "empty"}]})  # a model with no statistics yet
    assert value(m, "grym_triton_queue_seconds_total", model="empty") == 0.0


def test_breaker_state_is_one_gauge_per_state() -> None:
    m = Metrics()
    for pybreaker_name, label in BREAKER_STATES.items():
        m.set_breaker_state("milvus", pybreaker_name)
        got = {s: value(m, "grym_breaker_state", breaker="milvus", state=s) for s in BREAKER_STATES.values()}
        assert got == {s: (1.0 if s == label else 0.0) for s in BREAKER_STATES.values()}


def test_names_follow_prometheus_conventions() -> None:
    """Counters end in _total, histograms and durations in _seconds, sizes in _bytes; no averaged gauges."""
    m = Metrics()
    m.stream_errors.labels("Generate", "DEADLINE_EXCEEDED").inc()
    m.triton_errors.labels("audioldm", "DEADLINE_EXCEEDED").inc()
    text = generate_latest(m.registry).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M))
    ours = {n: t for n, t in types.items() if n.startswith("grym_")}
    assert ours
    for name, kind in ours.items():
        assert not name.endswith("_avg"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        base = name.removesuffix("_total")
        if "seconds" in base or "bytes" in base:
            assert base.split("_")[-1] in ("seconds", "bytes"), name  # the unit is last (before _total)
    assert 'grym_stream_errors_total{code="DEADLINE_EXCEEDED",method="Generate"} 1.0' in text
    assert 'grym_triton_errors_total{code="DEADLINE_EXCEEDED",model="audioldm"} 1.0' in text


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_a_cancel_at_the_deadline_is_labelled_deadline_exceeded() -> None:
    import grpc

    from grym_synth.api import servicer

    assert servicer._cancel_code(_Context(None)) == grpc.StatusCode.CANCELLED  # no deadline: the client cancelled
    assert servicer._cancel_code(_Context(30.0)) == grpc.StatusCode.CANCELLED
    assert servicer._cancel_code(_Context(0.1)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer._cancel_code(object()) == grpc.StatusCode.CANCELLED  # type: ignore[arg-type]
    token = servicer._write_timed_out.set(True)
    try:
        assert servicer._cancel_code(_Context(30.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        servicer._write_timed_out.reset(token)
    assert "Generate" in servicer.STREAMING_METHODS and "AnalyzeAudio" not in servicer.STREAMING_METHODS
