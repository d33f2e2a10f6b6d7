"""The composition root: builds every component once, starts them in order, and stops them cleanly.

Start order: metrics and the gRPC server come up first with health NOT_SERVING (so a Kubernetes startup probe
can watch), then the model repository is built if missing, the embedded Triton is started (or an external one is
waited for), the pattern store is opened (and its recall index starts loading in the background: text recall
queries Milvus until it is ready), and health flips to SERVING. Stop order is the reverse, after a drain:
health NOT_SERVING, new RPCs refused, in-flight RPCs given ``grace_period_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from grym_synth.api.v1 import orchestrator_pb2
from grym_synth.analysis.service import MODEL as ANALYSIS_MODEL, AnalysisService
from grym_synth.core.audio import TARGET_RATE_HZ
from grym_synth.inference.export.repository import build_repository, default_models
from grym_synth.inference.music_models import MUSICNN_EMBEDDING, MusicModels
from grym_synth.analysis.music import MusicAnalyzer
from grym_synth.inference.export.wav2vec2 import MIN_SAMPLES
from grym_synth.compose.service import ComposeService
from grym_synth.coordinator.grammar import plan_answer_schema
from grym_synth.coordinator.base import CoordinatorBackend
from grym_synth.coordinator.openai_backend import OpenAICoordinatorBackend
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.core.errors import InvalidArgument, NotFound
from grym_synth.generation.service import COMPONENT_MODELS as GENERATION_COMPONENTS
from grym_synth.generation.service import PIPELINE_MODEL as GENERATION_PIPELINE
from grym_synth.generation.service import GenerationService
from grym_synth.generation.service import load_limits as load_generation_limits
from grym_synth.generation.service import use_limits as use_generation_limits
from grym_synth.api.health import HealthMonitor
from grym_synth.core.logs import FileFollower
from grym_synth.core.metrics import Metrics
from grym_synth.memory.audio_store import AudioStore
from grym_synth.memory.store import PatternStore
from grym_synth.core.cache import LruCache
from grym_synth.memory.learning import FeedbackStore
from grym_synth.planning.rules import RuleBasedPlanner
from grym_synth.planning.sections import WindowSpec
from grym_synth.compose.mastering import MasterSettings
from grym_synth.memory.recall_index import RecallIndex
from grym_synth.core.resilience import AdmissionControl, AsyncBreaker, MemoryBudget, RetryPolicy
from grym_synth.workflow.store import open_workflow_store
from grym_synth.api.security import BearerTokenInterceptor, server_credentials
from grym_synth.api.servicer import Gate, OrchestratorService
from grym_synth.api.servicer import add_to_server as add_orchestrator_to_server
from grym_synth.settings import Settings
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import AUTH_HEADER, EmbeddedTriton, TritonSupervisor, free_port

log = logging.getLogger(__name__)

REQUIRED_MODELS = (ANALYSIS_MODEL,)


class App:
    """One orchestrator: gRPC API + (embedded or external) Triton + pattern memory + metrics."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.gate = Gate()
        self.triton_process: EmbeddedTriton | None = None
        self._triton_log: FileFollower | None = None
        self.triton: TritonClient | None = None
        self.store: PatternStore | None = None
        self.server: grpc.aio.Server | None = None
        self.health: HealthMonitor | None = None
        self.port = 0
        self.metrics_port = 0
        self.manifest: dict[str, Any] = {}
        self.admission: AdmissionControl | None = None
        self.cache: LruCache[Any] | None = None
        self.compose: ComposeService | None = None
        self.workflows: Any = None
        self.feedback: Any = None
        self._stats_task: asyncio.Task[None] | None = None
        self._supervisor_task: asyncio.Task[None] | None = None
        self.recall_index = RecallIndex()
        self._recall_index_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # --- start --------------------------------------------------------------------------------------------------
    def _prepare_models(self) -> None:
        """Build the profile's repository (embedded Triton only: an external Triton serves its own)."""
        s = self.settings
        self.manifest = build_repository(s.profile, s.repository_dir, weights=s.model_weights, seed=s.seed,
                                         models=s.triton_model_list or default_models())

    def _triton_url(self) -> str:
        s = self.settings
        if not s.embedded_triton:
            return str(s.triton_url)
        self.triton_process = EmbeddedTriton(
            s.repository_dir, s.data_dir / "logs" / "tritonserver.log", config_name=s.triton_model_config_name,
            startup_timeout_s=s.triton_startup_timeout_s, ports=(free_port(), free_port(), free_port()),
            rate_limit=s.triton_rate_limit, http=s.triton_http, restrict=s.triton_restrict,
            models=s.triton_model_list,
        )
        # Triton and its python stubs write glog lines to their file; the server's log re-emits them as JSON lines
        # (logger "tritonserver"), across supervised restarts (the file is appended to, never truncated).
        self._triton_log = FileFollower(self.triton_process.log_path, logging.getLogger("tritonserver")).start()
        return self.triton_process.grpc_url

    def _triton_headers(self) -> dict[str, str] | None:
        """The secret header Triton demands: the embedded server's (the very dict it renews at each start), or
        the one from ``triton_secret_file`` for an external server; None when Triton is not restricted."""
        s = self.settings
        if self.triton_process is not None:
            return self.triton_process.auth_headers if s.triton_restrict else None
        secret = s.triton_secret
        return {AUTH_HEADER: secret} if secret else None

    async def _wait_models(self, timeout_s: float) -> None:
        assert self.triton is not None
        deadline = time.monotonic() + timeout_s
        while not await self._triton_ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Triton at {self.triton.url} has not served {list(REQUIRED_MODELS)} within "
                                   f"{timeout_s:.0f}s")
            await asyncio.sleep(0.5)

    async def _probe_embedding_dim(self) -> int:
        """Ask the served model itself: works for an external Triton whose repository we never saw."""
        assert self.triton is not None
        probe = np.zeros((1, TARGET_RATE_HZ), dtype=np.float32)
        probe[0, ::100] = 0.1  # not constant: the in-graph normalisation divides by the variance
        out = await self.triton.infer(ANALYSIS_MODEL, {"audio": probe}, ["embedding"],
                                      deadline=time.monotonic() + 120)
        return int(out["embedding"].shape[-1])

    async def _boot(self) -> None:
        """Everything slow: models, Triton, the pattern store. RPCs answer UNAVAILABLE until it is done."""
        s = self.settings
        if self.triton_process is not None:
            await asyncio.to_thread(self._prepare_models)
            self.triton_process.launch()  # on the event-loop thread: PR_SET_PDEATHSIG follows the launching thread
            try:
                await asyncio.to_thread(self.triton_process.wait_ready)
            except BaseException:
                await asyncio.to_thread(self.triton_process.stop)
                raise
        await self._wait_models(s.triton_startup_timeout_s)
        if self.music_models is not None:  # only the music models Triton serves are asked
            log.info("music models served: %s", ", ".join(sorted(await self.music_models.probe())) or "none")
            started = time.perf_counter()
            prepared = await self.music_models.prepare()
            log.info("music pre/post-processing ready in %.1f s (%s)", time.perf_counter() - started,
                     ", ".join(prepared) or "none")
        assert self.store is not None
        self.store.dim = await self._probe_embedding_dim()
        # Refuses (start-up fails, saying why) a damaged store, or a missing one beside a non-empty workflow history.
        await asyncio.to_thread(self.store.open, self.workflows.count_sync)
        if self.store.audio_store is not None:
            await asyncio.to_thread(self.store.audio_store.open)
        self._recall_index_task = asyncio.create_task(
            self.recall_index.keep_in_sync(self.store, s.recall_index_refresh_s), name="recall-index")
        interrupted = await self.workflows.mark_interrupted_on_startup()
        if interrupted:
            log.warning("workflows left unfinished by a previous run are now INTERRUPTED: %s", interrupted)
        assert self.health is not None
        await self.health.check_once()
        self.gate.ready = True
        self._stats_task = asyncio.create_task(self._poll_triton_stats(), name="triton-stats")
        if self.triton_process is not None and s.triton_supervise:
            supervisor = TritonSupervisor(self.triton_process, on_down=self._triton_down, on_up=self._triton_up,
                                          backoff_s=s.triton_restart_backoff_s,
                                          backoff_max_s=s.triton_restart_backoff_max_s)
            self._supervisor_task = asyncio.create_task(self._supervise(supervisor), name="triton-supervisor")

    async def _supervise(self, supervisor: TritonSupervisor) -> None:
        try:
            await supervisor.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("supervisor: stopped by an unexpected error; a dead Triton will not be restarted")

    async def _triton_down(self, reason: str) -> None:
        """The embedded Triton died: NOT_SERVING at once, until it is back and the breakers are reset."""
        assert self.health is not None
        await self.health.hold("triton", reason)

    async def _triton_up(self) -> None:
        """The restarted Triton is ready: forget the failures the dead one caused, then report SERVING."""
        assert self.health is not None
        self._reset_triton_breakers()
        await self.health.release("triton")

    def _reset_triton_breakers(self) -> None:
        breakers = []
        if self.triton is not None:
            models = (*REQUIRED_MODELS, GENERATION_PIPELINE, *GENERATION_COMPONENTS)
            if self.settings.coordinator_backend == "triton":
                models += (self.settings.coordinator_model,)
            breakers += [self.triton.breaker(m) for m in models]
        if self.compose is not None and self.settings.coordinator_backend == "triton":
            breakers.append(self.compose.breaker)
        for breaker in breakers:
            if breaker.state != "closed" or breaker.breaker.fail_counter:
                breaker.breaker.close()  # pybreaker's public reset: closed, failure count 0
        log.info("supervisor: Triton breakers reset")

    async def _poll_triton_stats(self, interval_s: float = 5.0) -> None:
        """Export Triton's own queue vs compute time per model as counters (Metrics.record_triton_stats)."""
        assert self.triton is not None
        while True:
            await asyncio.sleep(interval_s)
            try:
                stats = await self.triton.statistics()
            except Exception as exc:  # Triton down: health and breakers report it; keep polling
                log.debug("triton statistics unavailable: %s", exc)
                continue
            self.metrics.record_triton_stats(stats)

    async def start(self) -> None:
        """Serve health at once (NOT_SERVING), then boot; returns when every component is ready."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
        triton_url = self._triton_url()
        self.triton = TritonClient(triton_url, channels=s.triton_channels, timeout_s=s.triton_timeout_s,
                                   headers=self._triton_headers(),
                                   idle_timeout_s=s.triton_idle_timeout_s,
                                   metrics=self.metrics, retry_policy=RetryPolicy(attempts=s.retry_attempts),
                                   breaker_fail_max=s.breaker_fail_max, breaker_reset_s=s.breaker_reset_s)
        self.store = PatternStore(s.milvus_target, dim=0, model=ANALYSIS_MODEL, profile=s.profile,
                                  collection_prefix=s.collection_prefix, token=s.milvus_token,
                                  breaker=AsyncBreaker("milvus", fail_max=s.breaker_fail_max,
                                                       reset_timeout_s=s.breaker_reset_s,
                                                       exclude=[InvalidArgument, NotFound], metrics=self.metrics),
                                  recall_index=self.recall_index, audio_store=AudioStore(s.audio_store_target))
        budget = MemoryBudget(s.max_inflight_audio_bytes, self.metrics)
        self.cache = LruCache("analysis", max_entries=s.cache_max_entries, max_bytes=s.cache_max_bytes,
                              metrics=self.metrics)
        # The music description (analysis/music.py): signal analysis plus the trained music models that are served.
        self.music_models = MusicModels(self.triton) if s.music_analysis else None
        self.store.music_dim = MUSICNN_EMBEDDING if s.music_analysis else 0
        analysis = AnalysisService(
            self.triton, self.store, profile=s.profile, min_samples=MIN_SAMPLES, max_audio_s=s.max_audio_seconds,
            max_stream_s=s.max_stream_seconds, window_s=s.stream_window_seconds, budget=budget, metrics=self.metrics,
            cache=self.cache, max_stream_buffer_bytes=s.max_stream_buffer_bytes,
            music=MusicAnalyzer(self.music_models) if s.music_analysis else None,
        )
        # The audioldm model's limits and CLAP tokenizer, once: Generate refuses what the model would refuse.
        limits = use_generation_limits(load_generation_limits(s.profile, s.repository_dir, s.audioldm_weights_dir))
        window = WindowSpec(min(s.compose_window_s, s.max_generate_seconds, limits.max_duration_s), s.compose_overlap_s)
        generation = GenerationService(
            self.triton, analysis, self.store, profile=s.profile, max_duration_s=s.max_generate_seconds,
            cache=LruCache("generation", max_entries=s.cache_max_entries, max_bytes=s.cache_max_bytes,
                           metrics=self.metrics),
            metrics=self.metrics, max_concurrent=s.max_concurrent_generations,
        )
        self.workflows = open_workflow_store(s.workflow_store_target)
        self.feedback = FeedbackStore(self.workflows.db).open()
        compose = ComposeService(
            coordinator=self._coordinator_backend(self.triton),
            breaker=AsyncBreaker("coordinator", fail_max=s.breaker_fail_max, reset_timeout_s=s.breaker_reset_s,
                                 exclude=[InvalidArgument], metrics=self.metrics),
            generation=generation, analysis=analysis, patterns=self.store, workflows=self.workflows,
            feedback=self.feedback, rules=RuleBasedPlanner(window=window),
            max_tokens=s.coordinator_max_tokens,
            mastering=MasterSettings(target_lufs=s.compose_target_lufs, true_peak_dbtp=s.compose_true_peak_dbtp),
            windows_in_flight=s.compose_windows_in_flight,
        )
        self.compose = compose
        self.admission = AdmissionControl(s.max_concurrent_requests, s.method_limit_map, metrics=self.metrics)
        self.health = HealthMonitor({"triton": self._triton_ready, "milvus": self._milvus_ready},
                                    optional={"generation": self._generation_ready}, metrics=self.metrics)
        self.server = self._grpc_server(OrchestratorService(analysis, self.store, self.admission, self.gate,
                                                            self.metrics, generation, compose,
                                                            write_timeout_s=s.stream_write_timeout_s))
        await self.server.start()
        log.info("gRPC API bound to %s:%d (NOT_SERVING until Triton and Milvus are ready)", s.host, self.port)
        await self.health.start()
        await self._boot()
        log.info("grym-synth serving on %s:%d (profile=%s, triton=%s, milvus=%s, metrics=:%d)", s.host, self.port,
                 s.profile, triton_url, s.milvus_target, self.metrics_port)

    def _grpc_server(self, service: OrchestratorService) -> grpc.aio.Server:
        s = self.settings
        interceptors = [BearerTokenInterceptor(s.auth_token)] if s.auth_token else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        add_orchestrator_to_server(service, server)  # undecodable request bytes -> INVALID_ARGUMENT
        assert self.health is not None
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        names = (orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name,
                 "grpc.health.v1.Health", reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{s.host}:{s.port}"
        if s.tls_cert and s.tls_key:
            self.port = server.add_secure_port(address, server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca))
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind the gRPC API to {s.host}:{s.port}")
        return server

    async def _triton_ready(self) -> bool:
        if self.triton is None or not await self.triton.server_ready():
            return False
        results = await asyncio.gather(*(self.triton.model_ready(m) for m in REQUIRED_MODELS))
        return all(results)

    def _coordinator_backend(self, triton: TritonClient) -> CoordinatorBackend | None:
        s = self.settings
        if s.coordinator_backend == "none":
            return None
        schema = plan_answer_schema() if s.coordinator_constrained else None
        if s.coordinator_backend == "openai":
            return OpenAICoordinatorBackend(str(s.coordinator_openai_url), s.coordinator_openai_model,
                                            s.coordinator_api_key, token_timeout_s=s.coordinator_token_timeout_s,
                                            json_schema=schema)
        # Through the app's TritonClient (the one path to Triton): its breaker, error mapping and secret header.
        return TritonCoordinatorBackend(triton, s.coordinator_model, protocol=s.coordinator_triton_protocol,
                                        token_timeout_s=s.coordinator_token_timeout_s, json_schema=schema)

    async def _generation_ready(self) -> bool:
        """Generation is optional: a deployment without AudioLDM still serves analysis (Generate answers
        UNAVAILABLE naming the missing model)."""
        if self.triton is None:
            return False
        models = (GENERATION_PIPELINE, *GENERATION_COMPONENTS)
        return all(await asyncio.gather(*(self.triton.model_ready(m) for m in models)))

    async def _milvus_ready(self) -> bool:
        if self.store is None or not self.store.ready:
            return False
        await self.store.count()
        return True

    def endpoints(self) -> dict[str, Any]:
        """Where everything listens, for the ports file (``grym-synth serve``) and the start-up line: the API and
        metrics ports, and Triton's gRPC URL (the embedded server's real, randomly chosen ports included)."""
        s = self.settings
        out: dict[str, Any] = {"host": s.host, "grpc_port": self.port, "metrics_port": self.metrics_port,
                               "tls": bool(s.tls_cert), "triton_embedded": s.embedded_triton,
                               "triton_grpc_url": self.triton.url if self.triton else s.triton_url,
                               "triton_grpc_port": None, "triton_metrics_url": None, "triton_http_url": None,
                               "triton_restricted": s.triton_restrict if s.embedded_triton else None}
        if self.triton_process is not None:
            t = self.triton_process
            out.update(triton_grpc_port=t.grpc_port, triton_metrics_url=t.metrics_url,
                       triton_http_url=t.http_url if s.triton_http else None)
        elif out["triton_grpc_url"]:
            port = str(out["triton_grpc_url"]).rsplit(":", 1)[-1]
            out["triton_grpc_port"] = int(port) if port.isdigit() else None
        return out

    # --- stop ---------------------------------------------------------------------------------------------------
    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, then close everything; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._supervisor_task:  # before anything stops Triton: a deliberate stop is not a crash
            self._supervisor_task.cancel()
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self.gate.ready = False
        self.gate.reason = "the server is shutting down; retry against another replica"
        if self.health:
            await self.health.drain()
        if self.server:
            await self.server.stop(grace)
        if self.compose:
            await self.compose.engine.shutdown("the orchestrator stopped before the workflow finished")
            await self.compose.close()
            if self.compose.coordinator:
                await self.compose.coordinator.close()
        if self.health:
            await self.health.stop()
        if self._stats_task:
            self._stats_task.cancel()
        if self._recall_index_task:
            self._recall_index_task.cancel()
        if self.triton:
            await self.triton.close()
        if self.store:
            await asyncio.to_thread(self.store.close)
        if self.workflows:
            self.feedback.close()
            self.workflows.close()
        if self.triton_process:
            await asyncio.to_thread(self.triton_process.stop)
        if self._triton_log:
            await asyncio.to_thread(self._triton_log.stop)
        self.metrics.close()
        log.info("grym-synth stopped")

    async def wait(self) -> None:
        await self._stopped.wait()

