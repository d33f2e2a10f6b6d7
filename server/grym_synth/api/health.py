"""grpc.health.v1 health with per-component status.

Services reported: "" (the whole server), ``grym.v1.Orchestrator`` (same as ""), ``triton`` (server and every
required model ready), ``milvus`` (pattern store open and answering) and optional features such as
``generation`` (the AudioLDM models loaded), which do not gate the whole server. The whole server is SERVING only when
every component is; a monitor task re-checks them so a Triton restart or a lost Milvus connection shows up
(NOT_SERVING) and recovery flips it back without a restart. A component can also be *held* NOT_SERVING whatever
its probe says (:meth:`HealthMonitor.hold`): the Triton supervisor does so from a crash until the restarted
server is ready and the breakers are reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2

from grym_synth.core.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "grym.v1.Orchestrator"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Probe = Callable[[], Awaitable[bool]]


class HealthMonitor:
    """Owns the health servicer; probes components periodically and publishes their status."""

    def __init__(self, probes: dict[str, Probe], *, optional: dict[str, Probe] | None = None,
                 interval_s: float = 2.0, metrics: Metrics | None = None) -> None:
        self.servicer = health.aio.HealthServicer()
        self.probes = probes
        # Reported per service but not required for the whole server to be SERVING (e.g. "generation").
        self.optional = optional or {}
        self.interval_s = interval_s
        self.metrics = metrics
        self.status: dict[str, bool] = {name: False for name in probes}
        self.optional_status: dict[str, bool] = {name: False for name in self.optional}
        self.draining = False
        self.held: dict[str, str] = {}  # component -> why it is held NOT_SERVING
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def _publish(self) -> None:
        everything = all(self.status.values()) and not self.draining
        for name, ok in {**self.status, **self.optional_status}.items():
            await self.servicer.set(name, SERVING if ok else NOT_SERVING)
            if self.metrics:
                self.metrics.health.labels(name).set(1 if ok else 0)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, SERVING if everything else NOT_SERVING)
        if self.metrics:
            self.metrics.health.labels(SERVICE_NAME).set(1 if everything else 0)

    @property
    def serving(self) -> bool:
        return all(self.status.values()) and not self.draining

    async def check_once(self) -> dict[str, bool]:
        probes = {**self.probes, **self.optional}
        results = await asyncio.gather(*(self._probe(n, p) for n, p in probes.items()))
        changed = False
        for name, ok in zip(probes, results):
            ok = ok and name not in self.held
            if name in self.optional:
                self.optional_status[name] = ok
                continue
            if self.status.get(name) != ok:
                log.info("health: %s is %s", name, "SERVING" if ok else "NOT_SERVING")
                changed = True
            self.status[name] = ok
        await self._publish()
        if changed:
            self._changed.set()
        return dict(self.status)

    async def hold(self, name: str, reason: str) -> None:
        """Report ``name`` NOT_SERVING, whatever its probe says, until :meth:`release`; published at once."""
        self.held[name] = reason
        log.warning("health: %s held NOT_SERVING: %s", name, reason)
        await self.check_once()

    async def release(self, name: str) -> None:
        """Let ``name``'s probe decide again; re-checked at once."""
        if self.held.pop(name, None) is not None:
            log.info("health: %s released", name)
        await self.check_once()

    async def _probe(self, name: str, probe: Probe) -> bool:
        try:
            return bool(await asyncio.wait_for(probe(), timeout=max(1.0, self.interval_s * 2)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("health probe %s failed: %s", name, exc)
            return False

    async def start(self) -> None:
        await self._publish()
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval_s)

    async def wait_serving(self, timeout_s: float) -> bool:
        async def waiter() -> None:
            while not self.serving:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(waiter(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def drain(self) -> None:
        """SIGTERM: report NOT_SERVING at once so load balancers stop sending traffic."""
        self.draining = True
        await self._publish()
        await self.servicer.enter_graceful_shutdown()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
