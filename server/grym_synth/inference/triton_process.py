"""Lifecycle of the embedded ``tritonserver`` process: start, readiness, supervision, and cleanup.

The ``nvidia-pytriton`` 0.7 wheel ships a real Triton 2.51 binary with the python backend only; its backend stub is
shipped apart, so we assemble a backend directory (``python/`` = the backend library + the stub for this Python;
``grym_python/`` = our Python-based backend, which every model config names) and pass it with
``--backend-directory``. The stub finds this virtualenv's site-packages through ``PATH`` (it
resolves ``python3`` from the first ``bin`` on it), which is why the venv's ``bin`` goes first.

Exposure: gRPC only (HTTP off unless asked for), metrics on loopback, and with ``restrict=True`` every gRPC
protocol group demands a random per-start secret header (``--grpc-restricted-protocol``) that only the owner
knows (:attr:`EmbeddedTriton.auth_headers`).

Nothing outlives the owner: tritonserver gets ``PR_SET_PDEATHSIG`` (SIGKILL when the thread that launched it
dies), and a tiny watchdog process (this file run as a script) holds the read end of a pipe from the owner; on EOF
(the owner exited, SIGKILL included) it kills Triton's process group (the server and its python-backend stubs)
and removes the python backend's ``/dev/shm`` segments (named by ``shm-region-prefix-name``). A clean ``stop()``
does the same itself, so no segment is left either way. :class:`TritonSupervisor` restarts a server that died.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# The rate-limiter resource every CPU component model declares (model_repository/*/config.pbtxt).
CPU_RESOURCE = "cpu"

# The key of the secret on Triton's command line; Triton (2.41 and 2.51) then expects the gRPC metadata key
# "triton-grpc-protocol-<key>" (lower case, as gRPC metadata keys are) and answers UNAVAILABLE "This protocol is
# restricted, expecting header ..." without it.
AUTH_KEY = "grym-triton-key"
AUTH_HEADER = f"triton-grpc-protocol-{AUTH_KEY}"
# Every protocol group Triton 2.51 can restrict (``tritonserver --help``): with one secret for all of them, a
# local caller without it gets nothing, not even liveness or the model list.
RESTRICTED_GROUPS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                     "statistics", "trace", "logging")
SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1
# EmbeddedTriton.restart: starts of a server that exits during start-up, and the pause between them.
RESTART_ATTEMPTS, RESTART_RETRY_DELAY_S = 3, 1.0
# Our Python-based backends (NVIDIA's term: one model.py shared by many models, installed as
# <backend-directory>/<name>/model.py): package data, model_repository/backends/<name>/ in the source tree.
PYTHON_BASED_BACKENDS = Path(str(resources.files("grym_synth.model_repository") / "backends"))


class TritonStartError(RuntimeError):
    """Triton did not come up (binary missing, model failed to load, timeout); the message quotes its log."""


class TritonExitedError(TritonStartError):
    """The tritonserver process exited before it was ready (the message quotes its log)."""


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


def _copy_files(sources: Iterable[Path], folder: Path) -> None:
    """Make ``folder`` hold exactly one copy of each source (same name): copied when missing or different (size or
    mtime), files whose source is gone removed. Copies, not links: Triton 2.51 refuses a backend library whose real
    path "escapes" the backend directory, which a symlink into the nvidia-pytriton wheel does."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {src.name: src for src in sources if src.name != "__pycache__"}
    for stale in folder.iterdir():
        if stale.name not in wanted and (stale.is_file() or stale.is_symlink()):
            stale.unlink()
    for name, src in wanted.items():
        dst = folder / name
        if dst.is_symlink():
            dst.unlink()
        if dst.exists():
            a, b = src.stat(), dst.stat()
            if a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime):
                continue
        tmp = dst.with_name(f".{name}.tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)  # atomic: a Triton starting meanwhile never loads a half-written library


def prepare_backend_dir(target: Path) -> Path:
    """Assemble Triton's backend directory in ``target``: ``python/`` (copies of the python backend and the stub
    matching this interpreter) and ``<name>/`` for each of our Python-based backends (copies of its modules).

    Triton 2.51 resolves a config's ``backend: "<name>"`` to ``libtriton_<name>.so`` (model folder, then
    ``<backend-directory>/<name>/``) and otherwise to a Python-based backend ``<backend-directory>/<name>/model.py``;
    that runs on the python backend's libtriton_python.so, stub and triton_python_backend_utils.py, taken from
    ``<name>/`` when present there and from ``python/`` otherwise (ours hold only Python files). The stub puts
    ``<name>/`` on ``sys.path`` and imports model.py as ``model``; the model's own folder is passed as
    ``args["model_repository"]``."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton ships no python backend stub for Python {py} ({stub})")
    _copy_files([*sorted((root / "backends" / "python").iterdir()), stub], target / "python")
    for backend in sorted(PYTHON_BASED_BACKENDS.iterdir()):
        if (backend / "model.py").is_file():
            _copy_files(sorted(f for f in backend.iterdir() if f.is_file()), target / backend.name)
    return target


class EmbeddedTriton:
    """A ``tritonserver`` child process serving ``repo_dir`` on loopback.

    Used by ``grym-synth serve`` when no external Triton URL is configured, and by the test-suite (one per session).
    ``http``: also serve HTTP (off by default: nothing here needs it). ``restrict``: demand a random per-start
    secret header on every gRPC (and HTTP) API group; clients send :attr:`auth_headers`. ``watchdog``: a helper
    process that kills the server and removes its shared memory if this process dies without stopping it.
    ``models``: load only these (explicit model control); empty: every model in the repository.
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
        http: bool = False,
        restrict: bool = False,
        watchdog: bool = True,
        models: Sequence[str] = (),
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.log_path = Path(log_path)
        self.config_name = config_name
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.rate_limit = rate_limit
        self.host = host
        self.http = http
        self.restrict = restrict
        self.use_watchdog = watchdog
        self.models = tuple(models)
        self._ports = ports
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: IO[bytes] | None = None
        # Known up front when given, so clients can be built before the server starts.
        self.http_port, self.grpc_port, self.metrics_port = ports or (0, 0, 0)
        # The secret header of the running server. Updated in place at every start, so clients built with this
        # very dict (TritonClient(headers=...)) follow a restart without being rebuilt.
        self.auth_headers: dict[str, str] = {}
        self.shm_prefix = ""

    # --- addresses ----------------------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

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
        # The python backend names its shared-memory regions by prefix; two servers on one host (tests,
        # blue/green restarts) must not share them ("double free" at model load otherwise). It is also how
        # stop() and the watchdog find the segments to remove.
        self.shm_prefix = f"grym{os.getpid()}_{self.grpc_port}_"
        cmd = [
            str(binary),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={backend_dir}",
            f"--allow-http={'true' if self.http else 'false'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            # Metrics have no credential: loopback only, whatever host the gRPC endpoint binds.
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.http:
            cmd += [f"--http-address={self.host}", f"--http-port={self.http_port}"]
        if self.restrict:
            secret = self.auth_headers.setdefault(AUTH_HEADER, secrets.token_urlsafe(32))
            groups = ",".join(RESTRICTED_GROUPS)
            cmd.append(f"--grpc-restricted-protocol={groups}:{AUTH_KEY}={secret}")
            if self.http:
                cmd.append(f"--http-restricted-api={groups}:{AUTH_KEY}={secret}")
        if self.models:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
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
        # The orchestrator's own credentials (GRYM_AUTH_TOKEN, ...) are none of Triton's business.
        env = {k: v for k, v in os.environ.items() if not (k.startswith("GRYM_") and _looks_secret(k))}
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        # The stub must link the libpython of *this* interpreter: it loads this interpreter's stdlib extension
        # modules, and a different patch release of libpython (e.g. the system's 3.11.2 vs a 3.11.7 venv) lacks
        # symbols they need (ImportError in _ssl as soon as a model imports huggingface_hub).
        libdirs = [interpreter_libdir()]
        # The backend library and the stub are copies (see _copy_files), so their $ORIGIN-relative RPATH no longer
        # reaches the wheel's bundled libraries (libcudart, libarchive...): name that folder explicitly.
        bundled = pytriton_root().parent.parent / "nvidia_pytriton.libs"
        libdirs.append(str(bundled) if bundled.is_dir() else None)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libdirs, env.get("LD_LIBRARY_PATH")]))
        # One ORT/torch thread pool per stub process is sized by the model configs, not by OMP defaults.
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> None:
        """Start the server and wait until it reports ready (all models in the repository loaded)."""
        if self.running():
            return
        self.launch()
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def launch(self) -> None:
        """Spawn the server and return at once (:meth:`wait_ready` waits for it), on the same ports as before.

        Call it from a thread that lives as long as the server (the main or the event-loop thread): the kernel
        sends ``PR_SET_PDEATHSIG`` when the *thread* that forked the child ends, not only the process."""
        if self.running():
            return
        self.http_port, self.grpc_port, self.metrics_port = self._ports or (free_port(), free_port(), free_port())
        self._ports = (self.http_port, self.grpc_port, self.metrics_port)  # a restart keeps the clients' URL
        if self.restrict:
            self.auth_headers[AUTH_HEADER] = secrets.token_urlsafe(32)  # a new secret for every start
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_watchdog()
        logf = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=self._environment(), start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        finally:
            logf.close()
        self._tell_watchdog(f"pgid {self._proc.pid}\nshm {self.shm_prefix}\n")
        log.info("tritonserver started pid=%s grpc=%s log=%s", self._proc.pid, self.grpc_url, self.log_path)

    def _ready(self, models: Iterable[str] = ()) -> set[str] | None:
        """Over gRPC (HTTP may be off): None when the server is not ready, else the subset of ``models`` not."""
        import tritonclient.grpc as triton_grpc  # lazily: the watchdog runs this file with the stdlib only

        headers = dict(self.auth_headers) or None
        try:
            client = triton_grpc.InferenceServerClient(self.grpc_url)
        except Exception:
            return None
        try:
            if not client.is_server_ready(headers=headers, client_timeout=2.0):
                return None
            return {m for m in models if not client.is_model_ready(m, headers=headers, client_timeout=2.0)}
        except Exception:
            return None
        finally:
            client.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server is ready (every model it loads at start-up is); raise with its log tail."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise TritonExitedError(f"tritonserver exited during start-up; log tail:\n{self.log()[-4000:]}")
            if self._ready() is not None:
                return
            time.sleep(0.25)
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f}s; log tail:\n{self.log()[-4000:]}")

    def wait_models_ready(self, names: Iterable[str], timeout_s: float = 60.0) -> None:
        """Block until every named model answers ready (for repositories loaded in explicit mode)."""
        pending: set[str] | None = set(names)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            pending = self._ready(pending)
            pending = set(names) if pending is None else pending
            if pending:
                time.sleep(0.25)
        if pending:
            raise TritonStartError(f"models not ready after {timeout_s:.0f}s: {sorted(pending)}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group (server + python stubs), SIGKILL whatever is left after ``grace_s``, remove
        the server's shared-memory segments and dismiss the watchdog."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver pid=%s ignored SIGTERM for %.0fs; killing", proc.pid, grace_s)
            # The stubs are in the same process group: make sure none survives the server.
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            wait_group_gone(proc.pid, 5.0)
            removed = remove_shm(self.shm_prefix)
            log.info("tritonserver pid=%s stopped (%d shared-memory segments removed)", proc.pid, len(removed))
        self._close_watchdog()

    def reap(self) -> tuple[int, list[str]]:
        """After the server died on its own: kill what it left in its process group (python-backend stubs) and
        remove its shared-memory segments. Returns (stubs killed, segments removed); the watchdog stays."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0, []
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        left = group_members(proc.pid)
        _signal_group(proc.pid, signal.SIGKILL)
        wait_group_gone(proc.pid, 5.0)
        self._tell_watchdog("release\n")
        return len(left), remove_shm(self.shm_prefix)

    def kill(self) -> None:
        """Hard-kill the server (fault-injection tests use this to simulate a crash)."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def restart(self, attempts: int = RESTART_ATTEMPTS) -> None:
        """Start again on the same ports (clients keep their URL across a Triton restart). A server that exits
        during start-up is started again, up to ``attempts`` times, as :class:`TritonSupervisor` does: CI once saw
        a fresh tritonserver exit within 40 ms of its launch, right after a killed one, logging only a gRPC
        "epoll_wait error: Bad file descriptor". A server that starts but never gets ready is not retried."""
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        for attempt in range(1, attempts + 1):
            self.stop()
            self._ports = ports
            try:
                self.start()
                return
            except TritonExitedError as exc:
                if attempt >= attempts:
                    raise
                log.warning("tritonserver restart attempt %d of %d failed (%s); starting it again", attempt,
                            attempts, str(exc).splitlines()[0])
                time.sleep(RESTART_RETRY_DELAY_S)

    # --- the watchdog -------------------------------------------------------------------------------------------
    def _ensure_watchdog(self) -> None:
        if not self.use_watchdog or (self._watchdog is not None and self._watchdog.poll() is None):
            return
        if self._watchdog_pipe is not None:  # the last one died (killed by hand?): replace it
            log.warning("the Triton watchdog exited (code %s); starting a new one", self._watchdog.returncode
                        if self._watchdog else None)
            self._watchdog_pipe.close()
        read_end, write_end = os.pipe()  # both non-inheritable: tritonserver must not hold the write end
        try:
            # -I: isolated (no cwd, no user site, no PYTHON* env); this file needs the stdlib only.
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), "--watchdog"], stdin=read_end,
                stdout=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._watchdog_pipe = os.fdopen(write_end, "wb", buffering=0)

    def _tell_watchdog(self, lines: str) -> None:
        if self._watchdog_pipe is None:
            return
        try:
            self._watchdog_pipe.write(lines.encode())
        except OSError as exc:
            log.warning("the Triton watchdog is gone (%s): nothing will clean up if this process is killed", exc)

    def _close_watchdog(self) -> None:
        """Tell the watchdog the server is already cleaned up, then let it go (EOF)."""
        pipe, watchdog, self._watchdog_pipe, self._watchdog = self._watchdog_pipe, self._watchdog, None, None
        if pipe is not None:
            try:
                pipe.write(b"release\n")
            except OSError:
                pass
            pipe.close()
        if watchdog is not None:
            try:
                watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()

    def __enter__(self) -> "EmbeddedTriton":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TritonSupervisor:
    """Restarts an :class:`EmbeddedTriton` that died, with exponential backoff, on the same ports.

    On an exit: ``on_down(reason)`` (the owner reports NOT_SERVING), the dead server's stubs and shared memory
    are cleaned, and a new server is started after ``backoff_s * 2**n`` seconds (n: restarts without a stable
    period of ``stable_s`` in between; capped at ``backoff_max_s``); once it is ready, ``on_up()`` (the owner
    resets its breakers and reports SERVING). Each step is one log line. Cancel the task before stopping Triton.
    """

    def __init__(self, triton: EmbeddedTriton, *, on_down: Callable[[str], Awaitable[None]],
                 on_up: Callable[[], Awaitable[None]], backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 stable_s: float = 60.0, poll_s: float = 0.2) -> None:
        self.triton = triton
        self.on_down = on_down
        self.on_up = on_up
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.poll_s = poll_s
        self.restarts = 0

    async def run(self) -> None:
        failures = 0
        up_since = time.monotonic()
        while True:
            while self.triton.running():
                await asyncio.sleep(self.poll_s)
            pid, code = self.triton.pid, self.triton.returncode
            if time.monotonic() - up_since >= self.stable_s:
                failures = 0
            reason = f"tritonserver pid={pid} exited with code {code}"
            log.error("supervisor: %s; restarting it", reason)
            await self.on_down(reason)
            down_at = time.monotonic()
            while True:
                stubs, segments = await asyncio.to_thread(self.triton.reap)
                log.info("supervisor: cleaned up after tritonserver pid=%s: %d stub processes killed, %d shared-"
                         "memory segments removed", pid, stubs, len(segments))
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** failures)
                failures += 1
                log.info("supervisor: restart attempt %d in %.1fs on %s", failures, delay, self.triton.grpc_url)
                await asyncio.sleep(delay)
                try:
                    self.triton.launch()  # on the event-loop thread: PR_SET_PDEATHSIG follows the launching thread
                    pid = self.triton.pid
                    await asyncio.to_thread(self.triton.wait_ready)
                except (TritonStartError, OSError) as exc:
                    log.error("supervisor: restart attempt %d failed: %s", failures, str(exc).splitlines()[0])
                    continue
                break
            self.restarts += 1
            up_since = time.monotonic()
            log.info("supervisor: tritonserver pid=%s is ready again after %.1fs down (restart %d)", pid,
                     up_since - down_at, self.restarts)
            await self.on_up()


def _looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in ("TOKEN", "KEY", "SECRET", "PASSWORD"))


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn: SIGKILL this child when its parent (thread) dies. Resolved before the fork so the child only
    makes one libc call. None where there is no prctl (not Linux: the watchdog alone then)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no live process is left in the group (zombies waiting for their reaper do not count)."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def shm_segments(prefix: str) -> list[Path]:
    """The python backend's /dev/shm segments named with ``prefix`` (shm-region-prefix-name)."""
    if not prefix:
        return []
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_shm(prefix: str) -> list[str]:
    removed = []
    for path in shm_segments(prefix):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove shared-memory segment %s: %s", path, exc)
    return removed


def _watchdog_main() -> int:
    """The watchdog process: stdin is the read end of a pipe its owner holds. Lines: ``pgid N`` (the server to
    guard), ``shm PREFIX`` (its segments), ``release`` (the owner cleaned up itself). On EOF (the owner exited,
    however) it kills the guarded process group and removes the segments, then exits."""
    def say(msg: str) -> None:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "level": "WARNING",
                 "logger": "grym_synth.inference.triton_process.watchdog", "msg": msg}
        try:
            print(json.dumps(entry), file=sys.stderr, flush=True)
        except OSError:
            pass

    owner = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the owner; we act on its exit
    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
    pgid, prefix = 0, ""
    try:
        for raw in sys.stdin.buffer:
            command, _, arg = raw.decode(errors="replace").strip().partition(" ")
            if command == "pgid":
                pgid = int(arg)
            elif command == "shm":
                prefix = arg
            elif command == "release":
                pgid, prefix = 0, ""
    except (OSError, ValueError):
        pass
    if pgid and group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        gone = wait_group_gone(pgid, 10.0)
        say(f"owner pid={owner} gone: killed tritonserver process group {pgid}"
            + ("" if gone else " (some members still alive after 10s)"))
    removed = remove_shm(prefix) if prefix else []
    if removed:
        say(f"removed {len(removed)} shared-memory segments {prefix}*")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    sys.exit(_watchdog_main())
