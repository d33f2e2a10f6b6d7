"""The server's stderr is JSON lines without exception (issue 13, item 4), on a real ``grym-synth serve`` with its
embedded Triton: the start-up export (TracerWarnings from torch.onnx, native ONNX warnings), Triton's and its python
stubs' own log, libmpg123's notes on a damaged MP3, bad and hostile requests, and shutdown.

Not vacuous: besides "every line parses", the test asserts that each kind of foreign output was there and was
captured (a py.warnings TracerWarning, a line of logger ``tritonserver``, a line of logger ``stderr`` from native
code), so that a change that merely silenced them, or routed them elsewhere, would be seen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc
from grym_synth.core.audio import AudioFormat, encode_audio
from support import GRYM_SYNTH, ROOT, tone

C = grpc.StatusCode


def _start(data_dir: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    port_file, err_path = data_dir / "ports", data_dir / "stderr.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*GRYM_SYNTH, "serve", "--profile", "tiny", "--port", "0", "--metrics-port", "0", "--data-dir",
           str(data_dir), "--port-file", str(port_file), "--triton-models", "wav2vec2,clap_text_encoder"]
    with open(err_path, "wb") as err, open(data_dir / "stdout.log", "wb") as out:
        # No TQDM_DISABLE etc. from the test's environment: the server must switch progress bars off itself.
        env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)
    return proc, port_file, err_path


def _requests(target: str) -> list[C]:
    """Good, bad and hostile calls; returns their status codes."""
    codes = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        x = tone(1.0)
        mp3 = encode_audio(x, 16_000, AudioFormat.MP3)
        files = [encode_audio(x, 16_000, AudioFormat.FLAC), mp3,
                 mp3[: len(mp3) // 2] + bytes(300),  # libmpg123 writes "Note: Illegal Audio-MPEG-Header" to fd 2
                 b"\x89PNG\r\n\x1a\n" + bytes(64), b"\x00\x00\x00\x20ftypM4A " + bytes(64)]
        for data in files:
            try:
                stub.AnalyzeAudio(pb.AnalyzeAudioRequest(audio=common_pb2.AudioInput(file=data)), timeout=60)
                codes.append(C.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        raw = channel.unary_unary("/grym.v1.Orchestrator/AnalyzeAudio")  # bytes that are no protobuf at all
        try:
            raw(b"\xff\xff\xff\xff garbage", timeout=30)
        except grpc.RpcError as err:
            codes.append(err.code())
        try:
            channel.unary_unary("/grym.v1.Orchestrator/NoSuchMethod")(b"", timeout=10)
        except grpc.RpcError as err:
            codes.append(err.code())
    return codes


def test_server_stderr_is_json_lines_without_exception(tmp_path: Path) -> None:
    proc, port_file, err_path = _start(tmp_path / "server")
    try:
        deadline = time.monotonic() + 400
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, err_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.5)
        port = int(port_file.read_text().split()[0])
        codes = _requests(f"127.0.0.1:{port}")
        assert codes[:2] == [C.OK, C.OK] and codes[3:5] == [C.INVALID_ARGUMENT] * 2, codes
        assert codes[5] == C.INVALID_ARGUMENT and codes[6] == C.UNIMPLEMENTED, codes
        time.sleep(1.0)  # Triton's log is followed by polling
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lines = err_path.read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line[:300]!r}")
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= entry.keys(), line
        entries.append(entry)
    loggers = {e["logger"] for e in entries}
    assert any(e["logger"] == "py.warnings" and "TracerWarning" in e["msg"] for e in entries), loggers
    assert any(e["logger"] == "tritonserver" and "wav2vec2" in e["msg"] for e in entries), loggers
    assert any(e["logger"] == "stderr" and "MPEG" in e["msg"] for e in entries), loggers
    assert any(e["msg"] == "grym-synth stopped" for e in entries), entries[-5:]
    assert not any("%|" in e["msg"] for e in entries)  # no progress bar drew, even as JSON
    assert proc.returncode == 0


def test_stderr_capture_keeps_exit_messages(tmp_path: Path) -> None:
    """A crash's traceback, printed by Python after the last log record, still comes out as JSON lines."""
    script = ("from grym_synth.core import logs\nimport logging, os, warnings\nlogs.configure()\n"
              "logging.getLogger('x').info('one')\nwarnings.warn('two')\nos.write(2, b'three\\rfour\\n')\n"
              "raise RuntimeError('five')\n")
    done = subprocess.run([GRYM_SYNTH[0], "-c", script], capture_output=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    entries = [json.loads(line) for line in done.stderr.decode().splitlines()]
    msgs = [e["msg"] for e in entries]
    assert msgs[0] == "one" and "UserWarning: two" in msgs[1] and msgs[2:4] == ["three", "four"], msgs
    assert msgs[-1] == "RuntimeError: five" and entries[-1]["logger"] == "stderr", msgs
    assert np.all([e["level"] in ("INFO", "WARNING", "ERROR") for e in entries])
