"""Supervision and least exposure of the embedded Triton, on real processes.

Two orchestrators with an embedded Triton (``--triton-models``: wav2vec2, and the coordinator for the first), both
sharing one repository built once for the module: the first (token from a file) is crashed and must recover by
itself (its coordinator streams through the TritonClient with the renewed secret), is probed for what its Triton
exposes, and is finally stopped with SIGTERM; the second (token from the environment) is SIGKILLed. After
either stop no tritonserver, python stub or watchdog may be left, nor any /dev/shm segment. A third orchestrator
uses a restricted external Triton through --triton-secret-file. The watchdog is also tested on its own (no
orchestrator); the supervisor's backoff and the token settings are in tests/unit/test_supervisor_and_settings.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from grym import Client, GrymError
from grym_synth.inference.export.repository import build_repository
from grym_synth.inference.triton_process import AUTH_HEADER, group_members, shm_segments
from support import OrchestratorProcess, alive, child_pids, tone

TOKEN_FILE_VALUE = "file-token-5f1c"
TOKEN_ENV_VALUE = "env-token-93ab"
RECOVERY_S = 60.0


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def health(target: str) -> str:
    try:
        with Client(target, timeout_s=5) as c:
            return c.health()
    except GrymError as err:
        return err.code.name


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def environ(pid: int) -> str:
    return (Path("/proc") / str(pid) / "environ").read_bytes().decode(errors="replace")


class Embedded:
    """What an orchestrator started: its tritonserver (pid, process group, shm prefix, gRPC port) and watchdog."""

    def __init__(self, orch: OrchestratorProcess) -> None:
        assert orch.proc is not None
        self.orch = orch
        kids = child_pids(orch.proc.pid)
        tritons = [p for p in kids if (cmdline(p) or [""])[0].endswith("tritonserver")]
        assert len(tritons) == 1, [cmdline(p)[:2] for p in kids]
        self.pid = tritons[0]
        args = cmdline(self.pid)
        self.grpc_port = int(next(a for a in args if a.startswith("--grpc-port=")).split("=")[1])
        self.shm_prefix = next(a for a in args if "shm-region-prefix-name=" in a).split("=")[-1]
        self.group = group_members(self.pid)
        self.watchdogs = [p for p in kids if "--watchdog" in cmdline(p)]
        assert len(self.watchdogs) == 1, "expected one watchdog process"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def leftovers(self) -> list[str]:
        out = [f"pid {p} {cmdline(p)[:1]}" for p in [*self.group, *self.watchdogs] if alive(p)]
        return out + [f"/dev/shm/{s.name}" for s in shm_segments(self.shm_prefix)]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wav2vec2 and the coordinator, built once and linked into each orchestrator's data dir (so none rebuilds
    it)."""
    out = tmp_path_factory.mktemp("supervision_repo") / "tiny"
    build_repository("tiny", out, models=["wav2vec2", "coordinator"], seed=0)
    return out


def start_embedded(data_dir: Path, repository: Path, *extra: str, coordinator: bool = False) -> OrchestratorProcess:
    (data_dir / "model_repository").mkdir(parents=True, exist_ok=True)
    (data_dir / "model_repository" / "tiny").symlink_to(repository)
    models = ["--triton-models", "wav2vec2,coordinator", "--coordinator-backend", "triton"] if coordinator else \
        ["--triton-models", "wav2vec2", "--coordinator-backend", "none"]
    args = ["--profile", "tiny", *models, "--grace-period-s", "2", "--triton-restart-backoff-s", "0.5", *extra]
    return OrchestratorProcess(data_dir, args).start(timeout_s=240)


def coordinated(target: str, token: str | None = None) -> int:
    """Compose until the plan: the number of coordinator tokens, after checking that the coordinator answered (the
    tiny model writes no JSON, so the rules plan; an unreachable or refused coordinator would say "unavailable")."""
    tokens = 0
    with Client(target, token=token, timeout_s=60) as c:
        for event in c.compose("8 second calm piano", max_tokens=6, seed=1):
            kind = event.WhichOneof("event")
            if kind == "token":
                tokens += 1
            elif kind == "plan":
                assert event.plan.fallback_reason == "no JSON in the answer", event.plan.fallback_reason
                break
    return tokens


@pytest.fixture(scope="module")
def first(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    data = tmp_path_factory.mktemp("supervised")
    token_file = data / "token"
    token_file.write_text(TOKEN_FILE_VALUE + "\n")
    token_file.chmod(0o600)
    orch = start_embedded(data / "data", repository, "--auth-token-file", str(token_file), coordinator=True)
    yield orch
    orch.stop()


def test_token_from_a_file_is_required_and_not_on_any_command_line(first: OrchestratorProcess) -> None:
    assert first.proc is not None
    assert TOKEN_FILE_VALUE not in " ".join(cmdline(first.proc.pid))
    with Client(first.target, token=TOKEN_FILE_VALUE) as c:
        assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
    with Client(first.target) as c, pytest.raises(GrymError) as err:
        c.analyze(tone(0.5), sample_rate_hz=16_000)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    triton = Embedded(first)
    assert not any(TOKEN_FILE_VALUE in " ".join(cmdline(p)) for p in triton.group)


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in (Path("/proc") / str(pid) / "net" / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            # /proc prints each 32-bit word in host (little-endian) order
            words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
            ip = ".".join(str(b) for b in words[-1]) if table == "tcp" or words[:2] == [b"\0" * 4] * 2 else addr
            out.add((ip, int(port, 16)))
    return out


def test_triton_serves_only_restricted_grpc_and_loopback_metrics(first: OrchestratorProcess) -> None:
    """No HTTP endpoint; every gRPC group, inference included, demands the per-start secret the orchestrator holds."""
    triton = Embedded(first)
    args = cmdline(triton.pid)
    assert "--allow-http=false" in args and "--metrics-address=127.0.0.1" in args
    assert any(a.startswith("--grpc-restricted-protocol=") and "inference" in a and "health" in a for a in args)
    listening = _listening(triton.pid)
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert len(listening) == 2 and triton.grpc_port in {port for _, port in listening}, listening  # gRPC + metrics
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        audio = triton_grpc.InferInput("audio", [1, 16_000], "FP32")
        audio.set_data_from_numpy(tone(1.0)[None, :].astype(np.float32))
        for headers in (None, {AUTH_HEADER: "guessed"}):
            with pytest.raises(InferenceServerException) as err:
                client.infer("wav2vec2", [audio], headers=headers)
            assert "restricted" in str(err.value), err.value
            with pytest.raises(InferenceServerException):
                client.is_server_ready(headers=headers)
    finally:
        client.close()
    # The orchestrator, which has the secret, is served: analysis, and the coordinator's token stream (which goes
    # through the same TritonClient, secret header included).
    with Client(first.target, token=TOKEN_FILE_VALUE) as c:
        assert c.analyze(tone(0.5, seed=2), sample_rate_hz=16_000).frames == 24
    assert coordinated(first.target, TOKEN_FILE_VALUE) > 0


def test_killed_triton_is_restarted_and_serves_again(first: OrchestratorProcess) -> None:
    before = Embedded(first)
    os.kill(before.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_for(lambda: health(first.target) == "NOT_SERVING", 10), "the crash was not reported"

    def analyze_ok() -> bool:
        try:
            with Client(first.target, token=TOKEN_FILE_VALUE, timeout_s=10) as c:
                return c.analyze(tone(0.5, seed=int(time.monotonic() * 1000)), sample_rate_hz=16_000).frames == 24
        except GrymError:
            return False

    assert wait_for(lambda: health(first.target) == "SERVING", RECOVERY_S), first.log()[-3000:]
    assert analyze_ok(), first.log()[-3000:]  # the first request after SERVING: breakers were reset
    assert coordinated(first.target, TOKEN_FILE_VALUE) > 0  # the coordinator follows the renewed secret
    recovered_s = time.monotonic() - killed_at
    after = Embedded(first)
    assert after.pid != before.pid and after.grpc_port == before.grpc_port
    assert not any(alive(p) for p in before.group), "stubs of the dead server survived"
    log = first.log()
    for step in ("exited with code -9", "cleaned up after tritonserver", "restart attempt 1",
                 "is ready again", "Triton breakers reset"):
        assert "supervisor: " in log and step in log, step
    assert recovered_s < RECOVERY_S


def test_sigterm_leaves_no_process_and_no_shared_memory(first: OrchestratorProcess) -> None:
    triton = Embedded(first)
    assert shm_segments(triton.shm_prefix), "expected the python backend's segments while serving"
    assert first.stop(signal.SIGTERM) == 0
    assert wait_for(lambda: not triton.leftovers(), 10), triton.leftovers()


def test_sigkill_leaves_no_process_and_no_shared_memory(repository: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL gives the orchestrator no chance: the watchdog (and PR_SET_PDEATHSIG) clean up. The token comes from
    the environment this time, and is passed on to no child."""
    monkeypatch.setenv("GRYM_AUTH_TOKEN", TOKEN_ENV_VALUE)
    orch = start_embedded(tmp_path / "data", repository)
    monkeypatch.delenv("GRYM_AUTH_TOKEN")
    try:
        assert orch.proc is not None
        assert TOKEN_ENV_VALUE not in " ".join(cmdline(orch.proc.pid))
        with Client(orch.target, token=TOKEN_ENV_VALUE) as c:
            assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
        triton = Embedded(orch)
        assert TOKEN_ENV_VALUE not in environ(triton.pid)
        assert shm_segments(triton.shm_prefix)
        orch.stop(signal.SIGKILL)
        assert wait_for(lambda: not triton.leftovers(), 15), triton.leftovers()
    finally:
        orch.stop()


def test_external_restricted_triton_with_a_secret_file(repository: Path, tmp_path: Path) -> None:
    """An external Triton started with --grpc-restricted-protocol: the orchestrator reads its secret from a file."""
    from grym_synth.inference.triton_process import EmbeddedTriton, free_port

    triton = EmbeddedTriton(repository, tmp_path / "triton.log", restrict=True, models=["wav2vec2"],
                            ports=(free_port(), free_port(), free_port()), startup_timeout_s=120)
    triton.start()
    try:
        secret_file = tmp_path / "triton.secret"
        secret_file.write_text(triton.auth_headers[AUTH_HEADER] + "\n")
        args = ["--triton-url", triton.grpc_url, "--profile", "tiny", "--coordinator-backend", "none",
                "--grace-period-s", "1"]
        orch = OrchestratorProcess(tmp_path / "data", [*args, "--triton-secret-file", str(secret_file)]).start()
        try:
            with Client(orch.target) as c:
                assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
        finally:
            orch.stop()
        # Without it, the orchestrator never gets Triton ready (NOT_SERVING, start-up does not finish).
        blind = OrchestratorProcess(tmp_path / "blind", args).start(wait_ready=False)
        try:
            assert not wait_for(lambda: (tmp_path / "blind" / "ports").exists(), 6), blind.log()[-2000:]
        finally:
            blind.stop()
    finally:
        triton.stop()
    assert not shm_segments(triton.shm_prefix)


def test_watchdog_cleans_up_when_its_owner_goes(tmp_path: Path) -> None:
    """The watchdog on its own: EOF on its pipe with a live process group -> group killed, segments removed."""
    import subprocess
    import sys

    import grym_synth.inference.triton_process as tp

    prefix = f"grymtest{os.getpid()}_"
    segment = Path("/dev/shm") / f"{prefix}1"
    segment.write_bytes(b"x")
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    watchdog = subprocess.Popen([sys.executable, "-I", tp.__file__, "--watchdog"], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    # Then EOF, as when the owner dies.
    _, err = watchdog.communicate(f"pgid {sleeper.pid}\nshm {prefix}\n".encode(), timeout=15)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert not segment.exists()
    assert re.search(rf"killed tritonserver process group {sleeper.pid}", err.decode()), err
