"""The docs, run: README's ``grym`` walkthrough against the real server through the installed CLI, and the
perf_analyzer command of docs/perf_analyzer.md built from a running server's ports file (``grym-synth serve`` writes
Triton's real ports there) and run against Triton — the test suite's one, and an embedded one with random ports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from support import ROOT, OrchestratorProcess, tone, wav_bytes
from test_cli import grym_command  # one definition of how the CLI is found

_spec = importlib.util.spec_from_file_location("docs_contract", ROOT / "tests" / "contract" / "test_docs.py")
docs_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_contract)  # type: ignore[union-attr]


# --- perf_analyzer from the ports file ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perf_analyzer() -> tuple[str, dict[str, str]]:
    """The perf_analyzer that scripts/install_tools.sh unpacks (or one on PATH), with the CUDA runtime it links."""
    binary = ROOT / "build" / "tools" / "perf_analyzer" / "perf_analyzer"
    found = str(binary) if binary.exists() else shutil.which("perf_analyzer")
    if not found:
        pytest.skip("no perf_analyzer: run scripts/install_tools.sh")
    env = dict(os.environ)
    cuda_rt = ROOT / "build" / "tools" / "cuda" / "nvidia" / "cuda_runtime" / "lib"
    if cuda_rt.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cuda_rt), env.get("LD_LIBRARY_PATH")]))
    return found, env


def documented_wav2vec2_command() -> list[str]:
    """The first perf_analyzer command of docs/perf_analyzer.md (wav2vec2 latency vs concurrency), as written."""
    text = (ROOT / "docs" / "perf_analyzer.md").read_text().replace("\\\n", " ")
    line = next(m for m in re.findall(r"^perf_analyzer -m wav2vec2 .*$", text, re.M))
    return shlex.split(line)


def run_documented(binary: str, env: dict[str, str], ports_file: Path, tmp_path: Path) -> list[str]:
    """Build the documented command from the ports file ($TRITON), shortened to one quick measurement (not a
    benchmark: a shared 2-core box), and run it; returns the CSV rows."""
    ports = json.loads(ports_file.read_text())
    argv = documented_wav2vec2_command()
    assert "$TRITON" in argv and "-f" in argv and "--concurrency-range" in argv
    argv[0] = binary
    argv[argv.index("$TRITON")] = ports["triton_grpc_url"]
    argv[argv.index("--concurrency-range") + 1] = "1:1"
    csv = tmp_path / "pa.csv"
    argv[argv.index("-f") + 1] = str(csv)
    argv += ["--measurement-mode", "count_windows", "--measurement-request-count", "10",
             "--stability-percentage", "1000", "--max-trials", "6"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second") and float(rows[1].split(",")[1]) > 0
    return rows


def test_perf_analyzer_from_the_ports_file(orchestrator: OrchestratorProcess, triton, perf_analyzer,
                                           tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ports_file = orchestrator.data_dir / "ports.json"
    ports = json.loads(ports_file.read_text())
    assert (ports["grpc_port"], ports["metrics_port"]) == (orchestrator.port, orchestrator.metrics_port)
    assert ports["triton_grpc_url"] == triton.grpc_url and ports["triton_grpc_port"] == triton.grpc_port
    assert ports["triton_embedded"] is False
    run_documented(*perf_analyzer, ports_file, tmp_path)


def test_serve_prints_and_writes_the_embedded_tritons_ports(perf_analyzer, tmp_path: Path) -> None:  # type: ignore
    """`grym-synth serve` with its own Triton (random ports, wav2vec2 only, unrestricted as the profiling docs
    say): the start-up line and the ports file name the ports Triton really listens on; the file goes on stop."""
    ports_file = tmp_path / "run" / "ports.json"
    proc = OrchestratorProcess(tmp_path / "data", ["--profile", "tiny", "--triton-models", "wav2vec2",
                                                   "--no-triton-restrict", "--ports-file", str(ports_file)])
    proc.start(timeout_s=400)
    try:
        ports = json.loads(ports_file.read_text())
        assert ports["triton_embedded"] is True and ports["triton_restricted"] is False
        url = ports["triton_grpc_url"]
        assert url == f"127.0.0.1:{ports['triton_grpc_port']}" and ports["grpc_port"] == proc.port
        assert f"triton gRPC {url}, triton metrics {ports['triton_metrics_url']}; ports in {ports_file}" in proc.log()
        metrics = urllib.request.urlopen(ports["triton_metrics_url"], timeout=10).read().decode()
        assert 'nv_inference_request_success{model="wav2vec2"' in metrics
        run_documented(*perf_analyzer, ports_file, tmp_path)
        metrics = urllib.request.urlopen(ports["triton_metrics_url"], timeout=10).read().decode()
        count = re.search(r'nv_inference_request_success\{model="wav2vec2",version="1"\} (\d+)', metrics)
        assert count and int(count.group(1)) >= 10  # the measurement went to the Triton the file named
    finally:
        assert proc.stop() == 0
    assert not ports_file.exists()


# --- README's walkthrough -----------------------------------------------------------------------------------------------
def test_readme_grym_commands_run(orchestrator: OrchestratorProcess, tmp_path: Path) -> None:
    """Every `grym` command of README.md, run as written against the test server, with its files made real:
    song.wav and long.wav exist, <pattern-id> is a stored pattern, outputs go to a temporary folder, and compose
    asks for a 2 second piece (the tiny models on a 2-core box). Commands needing a TLS server are run by
    tests/integration/test_cli.py::test_token_and_mutual_tls."""
    (tmp_path / "song.wav").write_bytes(wav_bytes(tone(2.0, 16_000, 440.0, seed=11), 16_000))
    (tmp_path / "long.wav").write_bytes(wav_bytes(tone(12.0, 16_000, 220.0, seed=12), 16_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRYM_")}
    env["GRYM_TARGET"] = orchestrator.target

    def grym(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*grym_command(), *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=400)

    stored = json.loads(grym(["analyze", "song.wav", "--store", "--json"]).stdout)["pattern_id"]
    ran = 0
    for argv in docs_contract.commands_in(ROOT / "README.md"):
        if argv[0] != "grym" or any(a.startswith("--tls") for a in argv):
            continue
        args = [stored if a == "PLACEHOLDER" else a for a in argv[1:]]
        if "--target" in args:  # the README's localhost:50051 is the test server here
            i = args.index("--target")
            del args[i:i + 2]
        if args and args[0] == "compose":  # the request text sets the length (servers without --seconds too)
            args = [a.replace("90 second", "2 second") for a in args] + ["--max-tokens", "16"]
        result = grym(args)
        assert result.returncode == 0, f"README: grym {shlex.join(args)}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        ran += 1
    assert ran >= 8
    assert (tmp_path / "pad.wav").exists() and (tmp_path / "piece.wav").exists()
