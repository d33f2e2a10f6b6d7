"""Prometheus metrics with stable names (the Grafana dashboard in deploy/grafana is built on them).

All metrics live in one registry owned by the process; ``Metrics.serve`` exposes it on the metrics port.
Names are part of the product's interface: rename only with a migration note.
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
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


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
        self.triton_errors = Counter("grym_triton_errors", "Failed Triton calls by model and error kind.",
                                     ["model", "kind"], registry=r)
        self.triton_retries = Counter("grym_triton_retries", "Retried Triton calls.", ["model"], registry=r)
        self.triton_queue = Gauge("grym_triton_queue_seconds_avg",
                                  "Average Triton queue time per request (from Triton's statistics API).",
                                  ["model"], registry=r)
        self.triton_compute = Gauge("grym_triton_compute_seconds_avg",
                                    "Average Triton compute time per request (from Triton's statistics API).",
                                    ["model"], registry=r)
        self.breaker_state = Gauge("grym_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                                   ["downstream"], registry=r)
        self.breaker_trips = Counter("grym_breaker_trips", "Times a circuit breaker opened.", ["downstream"],
                                     registry=r)
        self.cache_requests = Counter("grym_cache_requests", "Cache look-ups by cache and result (hit/miss).",
                                      ["cache", "result"], registry=r)
        self.inflight_bytes = Gauge("grym_inflight_audio_bytes",
                                    "Bytes of audio and tensors held by in-flight requests.", registry=r)
        self.patterns_stored = Counter("grym_patterns_stored", "Patterns written to the pattern memory.",
                                       ["source"], registry=r)
        self.health = Gauge("grym_health_serving", "1 when the named health service is SERVING.", ["service"],
                            registry=r)
        self._server: Any = None

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
