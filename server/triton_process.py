"""Lifecycle of the embedded ``tritonserver`` process.

The ``nvidia-pytriton`` wheel ships a real Triton 2.51 binary with the python backend only; its backend stub is
shipped apart, so we assemble a backend directory (``python/`` = the backend library + the stub for this Python)
and pass it with ``--backend-directory``. The stub finds this virtualenv's site-packages through ``PATH`` (it
resolves ``python3`` from the first ``bin`` on it), which is why the venv's ``bin`` goes first.

Everything binds to 127.0.0.1 on free ports; logs go to a file the orchestrator can show; ``stop()`` sends SIGTERM
to the whole process group and SIGKILL after a grace period so no stub process outlives the server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# The rate-limiter resource every CPU component model declares (model_repository/*/config.pbtxt).
CPU_RESOURCE = "cpu"


class TritonStartError(RuntimeError):
    """Triton did not come up (binary missing, model failed to load, timeout); the message quotes its log."""


def pytriton_root() -> Path:
    """Directory of the tritonserver distribution inside the nvidia-pytriton wheel."""
    import pytriton  # imported lazily: only the embedded mode needs it

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def interpreter_libdir() -> str | None:
    """Directory holding this interpreter's shared libpython, when it was built with one."""
    import sysconfig

    libdir, lib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and lib and (Path(libdir) / lib).exists():
        return str(libdir)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (the small race with other binders is acceptable for loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def prepare_backend_dir(target: Path) -> Path:
    """Assemble ``target/python`` with links to the python backend and the stub matching this interpreter."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton ships no python backend stub for Python {py} ({stub})")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*sorted((root / "backends" / "python").iterdir()), stub]:
        if src.name == "__pycache__":
            continue
        link = python_dir / src.name
        if link.is_symlink() or link.exists():
            if link.resolve() == src.resolve():
                continue
            link.unlink()
        link.symlink_to(src)
    return target


class EmbeddedTriton:
    """A ``tritonserver`` child process serving ``repo_dir`` on loopback.

    Used by ``grym-synth serve`` when no external Triton URL is configured, and by the test-suite (one per session).
    """

    def __init__(
        self,
        repo_dir: Path,
        log_path: Path,
        *,
        config_name: str | None = None,
        startup_timeout_s: float = 180.0,
        extra_args: Sequence[str] = (),
        rate_limit: bool = True,
        host: str = "127.0.0.1",
        ports: tuple[int, int, int] | None = None,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.log_path = Path(log_path)
        self.config_name = config_name
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.rate_limit = rate_limit
        self.host = host
        self._ports = ports
        self._proc: subprocess.Popen[bytes] | None = None
        # Known up front when given, so clients can be built before the server starts.
        self.http_port, self.grpc_port, self.metrics_port = ports or (0, 0, 0)

    # --- addresses ----------------------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The server's log so far (for error messages and tests)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        binary = pytriton_root() / "bin" / "tritonserver"
        backend_dir = prepare_backend_dir(self.log_path.parent / "triton_backends")
        cmd = [
            str(binary),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            "--exit-timeout-secs=10",
            # The python backend names its shared-memory regions by prefix; two servers on one host (tests,
            # blue/green restarts) must not share them ("double free" at model load otherwise).
            f"--backend-config=python,shm-region-prefix-name=grym{os.getpid()}_{self.grpc_port}_",
        ]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        if self.rate_limit:
            # The CPU components each declare the global "cpu" resource (their config.pbtxt): one executes at a
            # time, on every core, instead of several splitting the cores with thread pools that each assume all
            # of them. Measured (tiny UNet batch 8 + VAE sent together): the sum of their times with it, 6% more
            # without; AudioLDM tiny 1 s clips at concurrency 4: 1.23x -> 1.33x diffusers.
            cmd += ["--rate-limit=execution_count", f"--rate-limit-resource={CPU_RESOURCE}:1"]
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        # The stub must link the libpython of *this* interpreter: it loads this interpreter's stdlib extension
        # modules, and a different patch release of libpython (e.g. the system's 3.11.2 vs a 3.11.7 venv) lacks
        # symbols they need (ImportError in _ssl as soon as a model imports huggingface_hub).
        libdir = interpreter_libdir()
        if libdir:
            env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
        # One ORT/torch thread pool per stub process is sized by the model configs, not by OMP defaults.
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> None:
        """Start the server and wait until it reports ready (all models in the repository loaded)."""
        if self.running():
            return
        self.http_port, self.grpc_port, self.metrics_port = self._ports or (free_port(), free_port(), free_port())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT, env=self._environment(), start_new_session=True
            )
        finally:
            logf.close()
        log.info("tritonserver started pid=%s grpc=%s log=%s", self._proc.pid, self.grpc_url, self.log_path)
        try:
            self._wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise TritonStartError(f"tritonserver exited during start-up; log tail:\n{self.log()[-4000:]}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f}s; log tail:\n{self.log()[-4000:]}")

    def wait_models_ready(self, names: Iterable[str], timeout_s: float = 60.0) -> None:
        """Block until every named model answers ready (for repositories loaded in explicit mode)."""
        pending = set(names)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            pending = {n for n in pending if self._get(f"/v2/models/{n}/ready") != 200}
            if pending:
                time.sleep(0.25)
        if pending:
            raise TritonStartError(f"models not ready after {timeout_s:.0f}s: {sorted(pending)}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group (server + python stubs), SIGKILL whatever is left after ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver pid=%s ignored SIGTERM for %.0fs; killing", proc.pid, grace_s)
        # The stubs are in the same session: make sure none survives the server.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        log.info("tritonserver pid=%s stopped", proc.pid)

    def kill(self) -> None:
        """Hard-kill the server (fault-injection tests use this to simulate a crash)."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same ports (clients keep their URL across a Triton restart)."""
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        self.stop()
        self._ports = ports
        self.start()

    def __enter__(self) -> "EmbeddedTriton":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
