"""Metrics of the real orchestrator (issue 13, item 5): stream errors counted per RPC and code, timeouts labelled
DEADLINE_EXCEEDED (not CANCELLED) on the server's side too, Triton's statistics exported as growing counters of
seconds, breakers as one 0/1 gauge per state."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grym import Client
from grym.v1 import orchestrator_pb2 as pb
from support import OrchestratorProcess, tone


def samples(proc: OrchestratorProcess) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(proc: OrchestratorProcess, name: str, **labels: str) -> float:
    return samples(proc).get((name, frozenset(labels.items())), 0.0)


def wait_for(check, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "metric did not change in time"
        time.sleep(0.25)


def test_stream_errors_are_counted_by_method_and_code(orchestrator: OrchestratorProcess, client: Client) -> None:
    before = value(orchestrator, "grym_stream_errors_total", method="Generate", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(pb.GenerateRequest(prompt="x", output_format=42), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_for(lambda: value(orchestrator, "grym_stream_errors_total", method="Generate",
                           code="INVALID_ARGUMENT") == before + 1)
    # a unary error is not a stream error
    unary = value(orchestrator, "grym_stream_errors_total", method="AnalyzeAudio", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError):
        client.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(), timeout=30)
    assert unary == 0.0 == value(orchestrator, "grym_stream_errors_total", method="AnalyzeAudio",
                                 code="INVALID_ARGUMENT")


def test_a_client_deadline_is_counted_as_deadline_exceeded(orchestrator: OrchestratorProcess,
                                                           client: Client) -> None:
    labels = {"method": "Generate", "code": "DEADLINE_EXCEEDED"}
    before = (value(orchestrator, "grym_rpc_requests_total", **labels),
              value(orchestrator, "grym_stream_errors_total", **labels))
    cancelled = value(orchestrator, "grym_rpc_requests_total", method="Generate", code="CANCELLED")
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(pb.GenerateRequest(prompt="a long drone", duration_seconds=4.0, steps=150,
                                                     seed=5), timeout=3.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: value(orchestrator, "grym_rpc_requests_total", **labels) == before[0] + 1)
    assert value(orchestrator, "grym_stream_errors_total", **labels) == before[1] + 1
    assert value(orchestrator, "grym_rpc_requests_total", method="Generate", code="CANCELLED") == cancelled


def test_triton_statistics_are_counters_of_seconds(orchestrator: OrchestratorProcess, client: Client) -> None:
    """Triton's cumulative statistics as counters: after one more inference the count and the compute seconds both
    grew. Each comparison reads one scrape (the poller may refresh between two scrapes)."""
    names = ("grym_triton_inferences_total", "grym_triton_queue_seconds_total", "grym_triton_compute_seconds_total")
    wav2vec2 = frozenset({("model", "wav2vec2")})

    def scrape() -> dict[str, float]:
        got = samples(orchestrator)
        return {n: got.get((n, wav2vec2), 0.0) for n in names}

    client.analyze(tone(0.5, seed=4242), sample_rate_hz=16_000)
    wait_for(lambda: scrape()["grym_triton_inferences_total"] > 0)  # polled each 5 s
    first = scrape()
    assert first["grym_triton_compute_seconds_total"] > 0 and first["grym_triton_queue_seconds_total"] >= 0
    client.analyze(tone(0.5, seed=4243), sample_rate_hz=16_000)
    later: dict[str, float] = {}

    def grew() -> bool:
        later.update(scrape())
        return later["grym_triton_inferences_total"] > first["grym_triton_inferences_total"]

    wait_for(grew)
    assert later["grym_triton_compute_seconds_total"] > first["grym_triton_compute_seconds_total"]
    names = {name for name, _ in samples(orchestrator)}
    assert not {n for n in names if n.endswith("_avg")}


def test_breaker_states_are_one_gauge_per_state(orchestrator: OrchestratorProcess, client: Client) -> None:
    client.analyze(tone(0.5, seed=77), sample_rate_hz=16_000)
    got = {s: value(orchestrator, "grym_breaker_state", breaker="triton:wav2vec2", state=s)
           for s in ("closed", "half_open", "open")}
    assert got == {"closed": 1.0, "half_open": 0.0, "open": 0.0}
