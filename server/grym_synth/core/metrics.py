"""Prometheus metrics with stable names (the Grafana dashboard in deploy/grafana is built on them).

All metrics live in one registry owned by the process; ``Metrics.serve`` exposes it on the metrics port.
Names are part of the product's interface: rename only with a migration note (docs/observability.md).
Conventions (https://prometheus.io/docs/practices/naming/): base units, unit last (``_seconds``, ``_bytes``),
counters end in ``_total`` (prometheus_client appends it), states as one 0/1 gauge per state, never a numeric
code; durations Triton reports as sums are exported as counters, so that ``rate(a_total) / rate(b_total)`` gives
an average over any window instead of a gauge averaged over an interval nobody chose.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    PlatformCollector,
    start_http_server,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# pybreaker's state names -> the label values of grym_breaker_state (Prometheus label values use underscores).
BREAKER_STATES = {"closed": "closed", "half-open": "half_open", "open": "open"}
# Triton statistics (per model, cumulative since Triton started) exported as counters of seconds.
TRITON_DURATIONS = {"queue": ("queue",), "compute": ("compute_input", "compute_infer", "compute_output")}


class Metrics:
    """The orchestrator's metrics; one instance per process (tests create their own registries)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.rpc_requests = Counter("grym_rpc_requests", "RPCs finished, by method and gRPC status code.",
                                    ["method", "code"], registry=r)
        self.rpc_latency = Histogram("grym_rpc_latency_seconds", "RPC latency from receipt to last message.",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rpc_inflight = Gauge("grym_rpc_inflight", "RPCs being served now.", ["method"], registry=r)
        self.rpc_rejected = Counter("grym_rpc_rejected", "RPCs refused by admission control.",
                                    ["method", "reason"], registry=r)
        self.triton_latency = Histogram("grym_triton_request_latency_seconds",
                                        "Latency of one Triton inference call as seen by the orchestrator.",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.triton_errors = Counter("grym_triton_errors", "Failed Triton calls by model and gRPC status code "
                                     "(a timeout is DEADLINE_EXCEEDED).", ["model", "code"], registry=r)
        self.triton_retries = Counter("grym_triton_retries", "Retried Triton calls.", ["model"], registry=r)
        self.triton_inferences = Counter("grym_triton_inferences", "Successful inferences per model, from Triton's "
                                         "statistics API (polled).", ["model"], registry=r)
        self.triton_queue = Counter("grym_triton_queue_seconds", "Time requests waited in Triton's queue, per model "
                                    "(statistics API; divide its rate by grym_triton_inferences_total's).",
                                    ["model"], registry=r)
        self.triton_compute = Counter("grym_triton_compute_seconds", "Time Triton spent computing (input, infer, "
                                      "output), per model (statistics API).", ["model"], registry=r)
        self.breaker_state = Gauge("grym_breaker_state", "1 for the state each circuit breaker is in, 0 for the "
                                   "others (state: closed, half_open, open).", ["breaker", "state"], registry=r)
        self.breaker_trips = Counter("grym_breaker_trips", "Times a circuit breaker opened.", ["breaker"],
                                     registry=r)
        self.stream_errors = Counter("grym_stream_errors", "Streaming RPCs that ended with an error, by method and "
                                     "gRPC status code (a write or idle timeout is DEADLINE_EXCEEDED; a client that "
                                     "cancels is not an error).", ["method", "code"], registry=r)
        self.cache_requests = Counter("grym_cache_requests", "Cache look-ups by cache and result (hit/miss).",
                                      ["cache", "result"], registry=r)
        self.inflight_bytes = Gauge("grym_inflight_audio_bytes",
                                    "Bytes of audio and tensors held by in-flight requests.", registry=r)
        self.patterns_stored = Counter("grym_patterns_stored", "Patterns written to the pattern memory.",
                                       ["source"], registry=r)
        self.health = Gauge("grym_health_serving", "1 when the named health service is SERVING.", ["service"],
                            registry=r)
        self._server: Any = None
        self._triton_last: dict[str, dict[str, float]] = {}

    def set_breaker_state(self, breaker: str, state: str) -> None:
        """Set ``state`` (a pybreaker state name) to 1 and the breaker's other states to 0."""
        current = BREAKER_STATES.get(state, state)
        for value in BREAKER_STATES.values():
            self.breaker_state.labels(breaker, value).set(1 if value == current else 0)

    def record_triton_stats(self, stats: dict[str, Any]) -> None:
        """Advance the Triton counters by what Triton's cumulative statistics grew since the last call.

        Triton's numbers restart at zero when Triton restarts (the supervisor restarts a dead one): a value below
        the last one seen counts from zero again, so the counters only ever grow, as Prometheus requires."""
        for model in stats.get("model_stats", []):
            name = str(model.get("name", ""))
            inf = model.get("inference_stats", {})
            now = {"count": float(inf.get("success", {}).get("count", 0))}
            for key, parts in TRITON_DURATIONS.items():
                now[key] = sum(float(inf.get(part, {}).get("ns", 0)) for part in parts) / 1e9
            before = self._triton_last.get(name, {})
            restarted = now["count"] < before.get("count", 0.0)
            delta = {k: v - (0.0 if restarted else before.get(k, 0.0)) for k, v in now.items()}
            self._triton_last[name] = now
            if delta["count"] > 0:
                self.triton_inferences.labels(name).inc(delta["count"])
            for key, counter in (("queue", self.triton_queue), ("compute", self.triton_compute)):
                counter.labels(name).inc(max(delta[key], 0.0))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
