"""Log plumbing without a server (core/logs.py): Triton's glog lines keep their level, a followed file's lines
become records (partial lines wait for their end; the rest is flushed at stop), library loggers that bring their
own stderr handler are made to propagate to the root's JSON handler."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from grym_synth.core import logs


@pytest.mark.parametrize("line, level, msg", [
    ('I1130 14:52:38.123456 1234 model_lifecycle.cc:472] "loading: wav2vec2:1"', logging.INFO,
     "loading: wav2vec2:1 (model_lifecycle.cc:472)"),
    ("W1130 14:52:38.1 77 pinned_memory_manager.cc:273] Unable to allocate", logging.WARNING,
     "Unable to allocate (pinned_memory_manager.cc:273)"),
    ("E1130 14:52:38.1 77 server.cc:241] CudaDriverHelper", logging.ERROR, "CudaDriverHelper (server.cc:241)"),
    ("print from a python stub", logging.INFO, "print from a python stub"),
])
def test_glog_lines_keep_their_level(line: str, level: int, msg: str) -> None:
    assert logs.glog_record(line) == (level, msg)


def test_file_follower_emits_appended_lines_from_its_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "child.log"
    path.write_bytes(b"I1130 10:00:00.0 1 a.cc:1] before the follower\n")
    follower = logs.FileFollower(path, logging.getLogger("child"), interval_s=0.02).start()
    with caplog.at_level(logging.INFO, logger="child"), open(path, "ab") as f:
        f.write(b"W1130 10:00:01.0 1 b.cc:2] first\npartial ")
        f.flush()
        time.sleep(0.2)
        assert [r.getMessage() for r in caplog.records] == ["first (b.cc:2)"]
        f.write(b"line\nlast without newline")
        f.flush()
        follower.stop()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "first (b.cc:2)"), (logging.INFO, "partial line"), (logging.INFO, "last without newline")]


def test_file_follower_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "later.log"
    follower = logs.FileFollower(path, logging.getLogger("later"), interval_s=0.02).start()
    with caplog.at_level(logging.INFO, logger="later"):
        path.write_bytes(b"hello\n")
        time.sleep(0.2)
        follower.stop()
    assert [r.getMessage() for r in caplog.records] == ["hello"]


def test_library_loggers_propagate_instead_of_printing(tmp_path: Path) -> None:
    lib = logging.getLogger("some_library_with_own_handler")
    logs.adopt_library_logger(lib.name)
    lib.addHandler(logging.StreamHandler())  # what transformers does on first use...
    lib.propagate = False  # ...and this
    assert lib.propagate and not lib.handlers
    file_handler = logging.FileHandler(tmp_path / "lib.log", delay=True)
    lib.addHandler(file_handler)  # file handlers are not stderr: kept
    assert lib.handlers == [file_handler]
    lib.removeHandler(file_handler)


def test_stderr_levels_and_json_detection() -> None:
    assert logs._stderr_level("[W1130 15:00:14.15 shape.cpp:1] Warning: x") == "WARNING"
    assert logs._stderr_level("I1130 15:00:40.2 2748 fork_posix.cc:71] x") == "INFO"
    assert logs._stderr_level("2026-11-30 15:01:34,998 [ERROR][x]: y") == "ERROR"
    assert logs._stderr_level("Note: Illegal Audio-MPEG-Header") == "WARNING"
    assert logs._is_json_object(json.dumps({"a": 1})) and not logs._is_json_object("{not json}")
    assert not logs._is_json_object("[1]")


def test_stderr_capture_keeps_draining_when_the_real_stderr_is_gone() -> None:
    """The parent that read our stderr went away: writers to fd 2 must not block on a pipe nobody drains."""
    import subprocess
    import sys

    script = ("import os, sys\nfrom grym_synth.core import logs\nlogs.configure()\n"
              "os.close(logs._capture.real); logs._capture.real = os.open(os.devnull, os.O_RDONLY)\n"
              "for i in range(20000):\n    os.write(2, b'x' * 100 + b'\\n')\n"
              "sys.stdout.write('done'); sys.stdout.flush()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.stdout == b"done"
