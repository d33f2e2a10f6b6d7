"""The embedded Triton's supervisor (backoff until a restart holds) with a fake server, and the bearer-token settings
with their errors: no processes."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_supervisor_backs_off_exponentially_until_a_restart_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without processes: a server that fails to start twice is retried after 1x, 2x, 4x the backoff; the owner
    hears down once and up once."""
    import asyncio

    from grym_synth.inference.triton_process import TritonStartError, TritonSupervisor

    class FakeTriton:
        grpc_url = "127.0.0.1:1"
        pid, returncode = 42, -9

        def __init__(self) -> None:
            self.alive, self.launches, self.reaped = False, 0, 0

        def running(self) -> bool:
            return self.alive

        def reap(self) -> tuple[int, list[str]]:
            self.reaped += 1
            return 1, ["grym_seg"]

        def launch(self) -> None:
            self.launches += 1

        def wait_ready(self) -> None:
            if self.launches < 3:
                raise TritonStartError("tritonserver exited during start-up")
            self.alive = True

    async def scenario() -> tuple[list[str], list[float], FakeTriton]:
        fake, events, sleeps = FakeTriton(), [], []
        real_sleep = asyncio.sleep

        async def sleep(delay: float) -> None:
            if delay >= 0.1:
                sleeps.append(delay)
            await real_sleep(0)

        async def down(reason: str) -> None:
            events.append("down: " + reason)

        async def up() -> None:
            events.append("up")

        supervisor = TritonSupervisor(fake, on_down=down, on_up=up, backoff_s=1.0, backoff_max_s=3.0,
                                      poll_s=0.01)
        monkeypatch.setattr(asyncio, "sleep", sleep)  # record the backoff delays instead of waiting them
        task = asyncio.create_task(supervisor.run())
        while "up" not in events:
            await real_sleep(0.01)
        task.cancel()
        return events, sleeps, fake

    events, sleeps, fake = asyncio.run(scenario())
    assert events == ["down: tritonserver pid=42 exited with code -9", "up"]
    assert sleeps == [1.0, 2.0, 3.0]  # doubled, capped at backoff_max_s
    assert fake.launches == 3 and fake.reaped == 3



def test_restart_starts_again_a_server_that_exits_during_start_up(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """Without processes: EmbeddedTriton.restart keeps the ports and retries a start whose server exited (twice
    here), but not one that timed out, and gives up after RESTART_ATTEMPTS exits."""
    from grym_synth.inference import triton_process as tp

    server = tp.EmbeddedTriton(tmp_path, tmp_path / "triton.log", ports=(1, 2, 3), watchdog=False)
    outcomes: list[BaseException | None] = []
    seen_ports: list[tuple[int, int, int] | None] = []

    def start() -> None:
        seen_ports.append(server._ports)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(server, "start", start)
    monkeypatch.setattr(server, "stop", lambda: None)
    monkeypatch.setattr(tp.time, "sleep", lambda s: None)
    exited = tp.TritonExitedError("tritonserver exited during start-up")
    outcomes[:] = [exited, exited, None]
    server.restart()
    assert not outcomes and seen_ports == [(1, 2, 3)] * 3
    outcomes[:] = [tp.TritonStartError("tritonserver not ready after 180s"), None]
    with pytest.raises(tp.TritonStartError, match="not ready"):
        server.restart()
    outcomes[:] = [exited] * tp.RESTART_ATTEMPTS + [None]
    with pytest.raises(tp.TritonExitedError):
        server.restart()
    assert outcomes == [None]

def test_token_settings_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from grym_synth.cli import main
    from grym_synth.settings import Settings

    monkeypatch.delenv("GRYM_AUTH_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert Settings(auth_token_file=token).auth_token == "s3cret"
    monkeypatch.setenv("GRYM_AUTH_TOKEN", "from-env")
    assert Settings().auth_token == "from-env"
    with pytest.raises(ValueError, match="exclude each other"):
        Settings(auth_token_file=token)
    monkeypatch.delenv("GRYM_AUTH_TOKEN")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Settings(auth_token_file=tmp_path / "empty")
    # The flag still works but warns; a settings error names the problem, never the values.
    assert main(["serve", "--auth-token", "visible-token", "--auth-token-file", str(token)]) == 2
    err = capsys.readouterr().err
    assert "--auth-token is visible" in err and "exclude each other" in err
    assert "visible-token" not in err and "s3cret" not in err
