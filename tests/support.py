"""Shared test helpers: the real orchestrator as a process (``grym-synth serve``), test audio, the status-message
leak check, and in-memory workflow executors for the engine tests."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from grym_synth.planning.plan import Plan, Step
from grym_synth.planning.validation import validate_plan
from grym_synth.workflow.events import WorkflowEvent
from grym_synth.workflow.executors import StepContext

ROOT = Path(__file__).resolve().parent.parent
GRYM_SYNTH = [sys.executable, "-m", "grym_synth.cli"]


@dataclass
class OrchestratorProcess:
    """A ``grym-synth serve`` child process on loopback with its own data dir."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "orchestrator.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, wait_ready: bool = True, timeout_s: float = 240.0) -> "OrchestratorProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "ports"
        port_file.unlink(missing_ok=True)
        cmd = [*GRYM_SYNTH, "--plain-logs", "serve", "--port", "0", "--metrics-port", "0", "--data-dir",
               str(self.data_dir), "--port-file", str(port_file), *self.args]
        logf = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        if wait_ready:
            deadline = time.monotonic() + timeout_s
            while not port_file.exists() or not port_file.read_text().strip():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"orchestrator exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"orchestrator not ready in {timeout_s}s:\n{self.log()[-4000:]}")
                time.sleep(0.2)
            self.port, self.metrics_port = (int(x) for x in port_file.read_text().split())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A deterministic test signal: a tone plus a little seeded noise (never constant, never silent)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    if channels > 1:
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def child_pids(pid: int) -> set[int]:
    """All descendants of ``pid`` (from /proc), for orphan checks."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- status messages ------------------------------------------------------------------------------------------------
# What no status message may carry: peer addresses, gRPC dumps, exception class names, reprs.
LEAK = re.compile(r"127\.0\.0\.1|ipv4|ipv6|localhost:\d|debug_error_string|grpc_status|\b[A-Z]\w*(?:Error|Exception)\b"
                  r"|object at 0x|Traceback")


def assert_clean(message: str) -> None:
    assert not LEAK.search(message), f"status message leaks internals: {message!r}"


# --- in-memory workflow executors -------------------------------------------------------------------------------------
WORKFLOW_DIM = 8  # embedding size of the in-test analysis
RATE = 100  # samples per second of the in-test "audio": small arrays, same shapes as the real thing


class Trace:
    """What executors did, with monotonic timestamps."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str, float]] = []
        self.inputs: dict[str, dict[str, Any]] = {}

    def mark(self, step_id: str, what: str) -> None:
        self.marks.append((step_id, what, time.monotonic()))

    def at(self, step_id: str, what: str) -> float:
        return next(t for s, w, t in self.marks if s == step_id and w == what)

    def saw(self, what: str) -> set[str]:
        return {s for s, w, _ in self.marks if w == what}


def generator(trace: Trace, delay_s: float = 0.0, fail: dict[str, BaseException] | None = None) -> Any:
    """A generate/vary executor: seeded noise of the requested length (RATE samples per second) after ``delay_s``."""

    async def execute(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        trace.mark(step.id, "start")
        trace.inputs[step.id] = inputs
        try:
            for i in range(4):
                await asyncio.sleep(delay_s / 4)
                await ctx.progress(i + 1, 4, "denoising")
            if fail and step.id in fail:
                raise fail[step.id]
        except asyncio.CancelledError:
            trace.mark(step.id, "cancelled")
            raise
        trace.mark(step.id, "end")
        params = inputs["params"]
        audio = np.random.default_rng(params["seed"] % 2**32).standard_normal(int(params["duration_s"] * RATE))
        return {"audio": audio.astype(np.float32), "sample_rate_hz": RATE}

    return execute


def analyzer(trace: Trace) -> Any:
    async def execute(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        trace.mark(step.id, "start")
        trace.inputs[step.id] = inputs
        spectrum = np.abs(np.fft.rfft(inputs["audio"]))[:WORKFLOW_DIM] + 1e-3
        trace.mark(step.id, "end")
        return {"embedding": spectrum.astype(np.float32), "duration_s": len(inputs["audio"]) / inputs["sample_rate_hz"]}

    return execute


def hanging(trace: Trace) -> Any:
    async def execute(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        trace.mark(step.id, "start")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            trace.mark(step.id, "cancelled")
            raise
        return {}

    return execute


def plan_of(*steps: dict[str, Any]) -> Plan:
    return validate_plan({"version": 1, "intent": "test", "steps": list(steps)})


def gen(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "generate", "params": {"prompt": "calm piano", "duration_s": 2, **params}}


def analyze(step_id: str, source: str) -> dict[str, Any]:
    return {"id": step_id, "type": "analyze", "inputs": {"audio": f"{source}.audio"}}


async def collect(events: AsyncIterator[WorkflowEvent]) -> list[WorkflowEvent]:
    return [e async for e in events]


def kinds(events: list[WorkflowEvent], step_id: str | None = None) -> list[str]:
    return [e.kind for e in events if step_id is None or getattr(e, "step_id", None) == step_id]
