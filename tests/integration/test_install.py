"""Installed as a user installs it: the wheel in a fresh virtualenv, used from an empty directory.

Nothing of the checkout is on the path: the server, its model templates, the plan schema and the gRPC stubs all
come from the installed wheel, and the data dir is ``./data`` of the working directory. The light client
(``pip install ./clients/python``) brings no torch and no Triton.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from support import ROOT, alive, child_pids, tone, wav_bytes

pytestmark = pytest.mark.timeout(1200)


def _env() -> dict[str, str]:
    """The user's environment: no PYTHONPATH, no coverage hooks, no grym settings from the test run."""
    drop = ("PYTHONPATH", "COVERAGE_PROCESS_START", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("GRYM_", "COV_CORE"))}


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def _run(*cmd: str | Path, cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout_s)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _site_packages(bin_dir: Path) -> Path:
    return next((bin_dir.parent / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT, cwd=out)
    return next(out.glob("grym_synth-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bin_dir = _venv(tmp_path_factory.mktemp("venv") / "server")
    _run(bin_dir / "pip", "install", "-q", wheel, cwd=wheel.parent)
    return bin_dir


def test_the_wheel_holds_one_import_package_and_its_runtime_files(installed: Path) -> None:
    site = _site_packages(installed)
    assert not (site / "server").exists(), "no top-level `server` module may shadow a user's own package"
    for needed in ("grym_synth/api/v1/orchestrator_pb2.py", "grym_synth/planning/plan.schema.json",
                   "grym_synth/model_repository/audioldm/config.pbtxt", "grym/v1/orchestrator_pb2_grpc.py"):
        assert (site / needed).is_file(), f"{needed} is missing from the wheel"


def test_both_commands_report_one_version(installed: Path, tmp_path: Path) -> None:
    versions = {_run(installed / "grym-synth", "--version", cwd=tmp_path).stdout.split()[-1],
                _run(installed / "grym", "--version", cwd=tmp_path).stdout.split()[-1],
                _run(installed / "python", "-m", "grym_synth", "--version", cwd=tmp_path).stdout.split()[-1],
                _run(installed / "python", "-m", "grym", "--version", cwd=tmp_path).stdout.split()[-1]}
    assert len(versions) == 1 and "unknown" not in versions.pop()


@pytest.fixture(scope="module")
def served(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``grym-synth serve`` (embedded Triton, tiny profile) started from an empty directory."""
    work = tmp_path_factory.mktemp("empty")
    log = open(work.parent / "serve.log", "wb")
    proc = subprocess.Popen([str(installed / "grym-synth"), "serve", "--port", "0", "--metrics-port", "0",
                             "--port-file", "ports", "--profile", "tiny"], cwd=work, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    ports = work / "ports"
    deadline = time.monotonic() + 600
    while not (ports.exists() and ports.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"grym-synth serve did not start:\n{(work.parent / 'serve.log').read_text()[-4000:]}")
        time.sleep(0.5)
    yield f"127.0.0.1:{ports.read_text().split()[0]}", work
    children = child_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (work.parent / "serve.log").read_text()[-4000:]
    time.sleep(1)
    assert not [p for p in children if alive(p)], "a process started by the server outlived it"


def test_serve_from_an_empty_directory_analyze_generate_compose(installed: Path,
                                                                served: tuple[str, Path]) -> None:
    target, work = served
    assert (work / "data" / "model_repository" / "tiny").is_dir(), "the data dir is ./data of the working directory"
    (work / "clip.wav").write_bytes(wav_bytes(tone(1.0), 16_000))
    grym = [installed / "grym", "--target", target]
    analysis = json.loads(_run(*grym, "analyze", "clip.wav", "--store", "--tag", "origin=install-test",
                               cwd=work).stdout)
    assert analysis["pattern_id"] and analysis["tags"] == {"origin": "install-test"}
    _run(*grym, "generate", "soft rain", "--seconds", "1", "--steps", "2", "--seed", "1", "--out", "rain.wav", cwd=work)
    rain, rate = sf.read(work / "rain.wav")
    assert rate > 0 and abs(len(rain) / rate - 1.0) < 0.1
    _run(*grym, "compose", "4 second calm drone", "--max-tokens", "8", "--quiet-tokens", "--out", "piece.wav", cwd=work)
    piece, rate = sf.read(work / "piece.wav")
    assert len(piece) / rate > 1.0


def test_the_light_client_brings_no_server_stack(tmp_path: Path, orchestrator_target: str) -> None:
    bin_dir = _venv(tmp_path / "client")
    _run(bin_dir / "pip", "install", "-q", ROOT / "clients" / "python", cwd=tmp_path)
    installed = {line.split("==")[0].lower() for line in _run(bin_dir / "pip", "freeze", cwd=tmp_path).stdout.split()}
    assert not installed & {"torch", "tritonclient", "nvidia-pytriton", "onnxruntime", "pymilvus", "grym-synth"}
    size = sum(f.stat().st_size for f in (tmp_path / "client").rglob("*") if f.is_file())
    assert size < 250 * 2**20, f"the client install is {size / 2**20:.0f} MiB"
    assert _run(bin_dir / "grym", "--target", orchestrator_target, "health", cwd=tmp_path).stdout.strip() == "SERVING"
