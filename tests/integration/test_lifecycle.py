"""Process lifecycle: health transitions, Triton crash and recovery, restart persistence, clean SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from conftest import orchestrator_args
from grym import Client, GrymError
from grym_synth.inference.triton_process import EmbeddedTriton, free_port
from support import OrchestratorProcess, alive, child_pids, tone


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def health(target: str, service: str = "") -> str:
    try:
        with Client(target, timeout_s=5) as c:
            return c.health(service)
    except GrymError as err:
        return err.code.name


def test_restart_keeps_every_pattern(triton: EmbeddedTriton, tmp_path: Path) -> None:
    first = OrchestratorProcess(tmp_path / "data", orchestrator_args(triton)).start()
    with Client(first.target) as c:
        stored = [c.analyze(tone(0.6, seed=i), sample_rate_hz=16_000, store=True, tags={"n": str(i)}).pattern_id
                  for i in range(3)]
        c.delete_pattern(stored[1])
        before = sorted(p.pattern_id for p in c.list_patterns())
        probe = c.get_pattern(stored[2], include_embedding=True)
    assert first.stop() == 0  # SIGTERM: a clean exit

    second = OrchestratorProcess(tmp_path / "data", orchestrator_args(triton)).start()
    try:
        with Client(second.target) as c:
            assert sorted(p.pattern_id for p in c.list_patterns()) == before == sorted([stored[0], stored[2]])
            assert c.get_pattern(stored[0]).tags == {"n": "0"}
            hits = c.search(embedding=list(probe.embedding), top_k=1)  # reopened collection is loaded
            assert hits[0].pattern.pattern_id == stored[2]
    finally:
        second.stop()


def test_health_follows_triton_down_and_up(tiny_repository: Path, tmp_path: Path) -> None:
    """NOT_SERVING until Triton's models are ready; a killed Triton is noticed (UNAVAILABLE naming the model,
    health NOT_SERVING) and a restarted one is picked up again without restarting the orchestrator."""
    server = EmbeddedTriton(tiny_repository, tmp_path / "triton.log", ports=(free_port(), free_port(), free_port()),
                            extra_args=["--model-control-mode=explicit", "--load-model=wav2vec2"])
    orch = OrchestratorProcess(tmp_path / "data", orchestrator_args(server, "--triton-channels", "1"))
    orch.start(wait_ready=False)
    try:
        assert wait_for(lambda: (tmp_path / "data" / "ports").exists() or health_port(orch), 30)
        assert health(orch.target) == "NOT_SERVING"
        assert health(orch.target, "triton") == "NOT_SERVING"
        with pytest.raises(GrymError) as err, Client(orch.target) as c:
            c.analyze(tone(0.5), sample_rate_hz=16_000)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "starting" in err.value.message

        server.start()
        assert wait_for(lambda: health(orch.target) == "SERVING", 120), orch.log()[-3000:]
        with Client(orch.target) as c:
            assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24

        server.kill()
        with Client(orch.target) as c, pytest.raises(GrymError) as err:
            c.analyze(tone(0.5, seed=11), sample_rate_hz=16_000)  # a new clip: no cache hit
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "triton:wav2vec2" in err.value.message
        assert wait_for(lambda: health(orch.target, "triton") == "NOT_SERVING", 15)
        assert health(orch.target) == "NOT_SERVING"

        server.restart()
        assert wait_for(lambda: health(orch.target) == "SERVING", 60)

        def analyze_ok() -> bool:
            try:
                with Client(orch.target) as c:
                    return c.analyze(tone(0.5, seed=12), sample_rate_hz=16_000).frames == 24
            except GrymError:
                return False  # the breaker may still be open for its reset timeout

        assert wait_for(analyze_ok, 30)
    finally:
        orch.stop()
        server.stop()


def health_port(orch: OrchestratorProcess) -> bool:
    """Before the port file exists (it is written once ready), read the bound port from the log."""
    for line in orch.log().splitlines():
        if "gRPC API bound to" in line:
            orch.port = int(line.rsplit(":", 1)[1].split()[0])
            return True
    return False


def test_sigterm_stops_embedded_triton_without_orphans(tmp_path: Path) -> None:
    """Embedded mode: the orchestrator owns Triton and milvus-lite; SIGTERM ends all of them."""
    orch = OrchestratorProcess(tmp_path / "data", ["--profile", "tiny", "--grace-period-s", "2"]).start(timeout_s=400)
    descendants = child_pids(orch.proc.pid)  # type: ignore[union-attr]
    assert descendants, "expected tritonserver (and its python stubs) as children"
    with Client(orch.target) as c:
        assert c.health() == "SERVING"
        assert c.analyze(tone(0.5), sample_rate_hz=16_000).frames == 24
    assert orch.stop(signal.SIGTERM) == 0
    assert wait_for(lambda: not any(alive(p) for p in descendants), 20), [p for p in descendants if alive(p)]
    assert "grym-synth stopped" in orch.log()


def test_embedded_triton_rate_limits_the_cpu_components_by_default(tmp_path: Path) -> None:
    """The CPU components share one "cpu" resource (their configs); the embedded server enforces it unless told
    not to (``--no-triton-rate-limit``)."""
    from grym_synth.inference.export.repository import TEMPLATE_DIR
    from grym_synth.inference.triton_process import CPU_RESOURCE

    on = EmbeddedTriton(tmp_path, tmp_path / "a.log").command()
    off = EmbeddedTriton(tmp_path, tmp_path / "b.log", rate_limit=False).command()
    assert "--rate-limit=execution_count" in on and f"--rate-limit-resource={CPU_RESOURCE}:1" in on
    assert not any(arg.startswith("--rate-limit") for arg in off)
    for model in ("wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder"):
        config = (TEMPLATE_DIR / model / "config.pbtxt").read_text()
        assert f'resources [ {{ name: "{CPU_RESOURCE}" global: true count: 1 }} ]' in config, model
    # audioldm waits on the components (holding the resource would deadlock); the coordinator streams for seconds.
    for decoupled in ("audioldm", "coordinator"):
        assert "rate_limiter" not in (TEMPLATE_DIR / decoupled / "config.pbtxt").read_text()
