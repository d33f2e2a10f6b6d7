"""Structured JSON logs with the request id of the operation that wrote them, and nothing else on stderr.

The request id travels in a context variable set by the transport layer, so serving code logs normally and
every line of one request can be found by its id in logs, metrics exemplars and error messages alike.

"JSON lines without exception" holds because every other writer is routed through the same formatter:
Python warnings (TracerWarnings during export included) through ``logging.captureWarnings``; third-party
loggers through the root handler (libraries that install their own handler, like transformers and diffusers,
are set to propagate instead); progress bars are switched off by environment before those libraries load;
and what native code writes to file descriptor 2 (libmpg123's notes, ONNX Runtime, a Python traceback
printed at exit) goes through a pipe whose reader wraps each line as a JSON entry of logger ``stderr``.
Triton's own log is followed by :class:`FileFollower` (see inference/triton_process.py).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
import atexit
from collections.abc import Callable
from pathlib import Path
from typing import IO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage().rstrip(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# Switch progress bars off in every library that draws them (set before they are imported; setdefault keeps an
# operator's explicit choice). TQDM_DISABLE is read by tqdm >= 4.66 for every bar, huggingface_hub, transformers
# and diffusers included.
QUIET_ENVIRONMENT = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                     "TOKENIZERS_PARALLELISM": "false"}
# Libraries that attach their own stderr handler to their root logger: made to propagate to ours instead.
OWN_HANDLER_LOGGERS = ("transformers", "diffusers", "huggingface_hub")
NOISY_LOGGERS = ("pymilvus", "urllib3", "httpx", "grpc", "milvus_lite")


def _entry(level: str, logger: str, msg: str) -> str:
    now = time.time()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    return json.dumps({"ts": ts, "level": level, "logger": logger, "msg": msg}, ensure_ascii=False)


class StderrCapture:
    """Route file descriptor 2 through a pipe whose reader writes every line as JSON to the real stderr.

    Lines that already are JSON objects (our own handler writes to the pipe too, so that the order of lines is
    the order they were written) pass unchanged; anything else becomes ``{"logger": "stderr", "msg": line}``.
    Carriage returns end a line too, so a progress bar that slipped through still yields JSON lines only."""

    def __init__(self) -> None:
        self.real = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._thread = threading.Thread(target=self._pump, name="stderr-json", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def close(self, timeout_s: float = 2.0) -> None:
        """Put the real stderr back and wait for the reader to write out what is left (at exit this includes the
        traceback or SystemExit message Python prints before it runs the atexit hooks). Child processes that
        inherited the pipe keep it open: the wait is bounded."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 2)
        self._thread.join(timeout_s)

    def _pump(self) -> None:
        pending = b""
        while True:
            data = self._reader.read(65536)
            if not data:
                break
            pending += data
            *lines, pending = re.split(rb"\r\n|\r|\n", pending)
            self._emit(lines)
        self._emit([pending])

    def _emit(self, lines: list[bytes]) -> None:
        out = []
        for raw in lines:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text.strip():
                out.append(text if _is_json_object(text) else _entry(_stderr_level(text), "stderr", text))
        if out:
            self._write(("\n".join(out) + "\n").encode())

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to the real stderr; if that is gone (a closed pipe), drop it and keep draining ours,
        so that writers to fd 2 never block on a full pipe nobody reads."""
        try:
            while data:
                data = data[os.write(self.real, data):]
        except OSError:
            pass


# Level prefixes native code writes: glog ("W1130 12:00:00.0 ...", torch's "[W1130 ...]") and Python logging's
# default "LEVEL:name:" / "[LEVEL]" forms. Anything else written to stderr is a WARNING: nobody meant it as a log.
_STDERR_LEVEL = re.compile(r"^\[?(?:([IWEF])\d{4} |(DEBUG|INFO|WARNING|ERROR|CRITICAL)[:\]])"
                           r"|\[(DEBUG|INFO|WARNING|ERROR)\]")
_GLOG_NAMES = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}


def _stderr_level(text: str) -> str:
    m = _STDERR_LEVEL.search(text[:80])
    if not m:
        return "WARNING"
    return _GLOG_NAMES[m.group(1)] if m.group(1) else (m.group(2) or m.group(3))


def _is_json_object(text: str) -> bool:
    if not (text.startswith("{") and text.endswith("}")):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


_capture: StderrCapture | None = None


def configure(level: str = "INFO", json_logs: bool = True, capture_stderr: bool | None = None) -> None:
    """Send every log record, warning and (with ``capture_stderr``, the default for JSON logs) every byte written
    to stderr through one formatter."""
    global _capture
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if json_logs and (capture_stderr if capture_stderr is not None else True) and _capture is None:
        sys.stderr.flush()
        _capture = StderrCapture()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the handler above
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in OWN_HANDLER_LOGGERS:
        adopt_library_logger(name)


def adopt_library_logger(name: str) -> None:
    """Make a library logger that carries its own stderr handler propagate to the root's JSON handler instead.

    transformers and diffusers configure their library root logger on first use (adding a handler and turning
    propagation off); :class:`_AdoptOnConfigure` catches that, as it happens after ``configure``."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
    logger.propagate = True
    if not isinstance(logger, _AdoptOnConfigure):
        logger.__class__ = _AdoptOnConfigure


class _AdoptOnConfigure(logging.Logger):
    """A library root logger that refuses its own stream handlers and keeps propagating to the root logger."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 (logging's API)
        if isinstance(hdlr, logging.StreamHandler) and not isinstance(hdlr, logging.FileHandler):
            return
        super().addHandler(hdlr)

    def __setattr__(self, key: str, value: object) -> None:
        super().__setattr__(key, True if key == "propagate" else value)


# --- following another process's log file ---------------------------------------------------------------------------
# glog, as Triton writes it: "I1130 14:52:38.123456 1234 server.cc:123] message".
_GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^\]]+)\] ?(.*)$")
_GLOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def glog_record(line: str) -> tuple[int, str]:
    """(level, message) of one line of a glog-style log (Triton); other lines (a stub's prints) are INFO."""
    m = _GLOG.match(line)
    if not m:
        return logging.INFO, line
    msg = m.group(3)
    if len(msg) >= 2 and msg.startswith('"') and msg.endswith('"'):  # Triton 2.5x quotes its messages
        try:
            msg = json.loads(msg)
        except ValueError:
            pass
    return _GLOG_LEVELS[m.group(1)], f"{msg} ({m.group(2)})"


class FileFollower:
    """Re-emit the lines appended to a file (a child process's log) as log records, from ``offset`` on.

    The child keeps its own file (operators and error messages read it); the server's log carries the same lines
    as JSON, so one stream holds everything. Polls: a log line is late by at most ``interval_s``."""

    def __init__(self, path: Path, logger: logging.Logger, *, offset: int | None = None,
                 parse: Callable[[str], tuple[int, str]] = glog_record, interval_s: float = 0.25) -> None:
        self.path, self.logger, self.parse, self.interval_s = Path(path), logger, parse, interval_s
        self.offset = offset if offset is not None else (self.path.stat().st_size if self.path.exists() else 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{self.path.name}", daemon=True)

    def start(self) -> "FileFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Emit what is left and stop (the last lines a dying child wrote are not lost)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        f: IO[bytes] | None = None
        pending = b""
        try:
            while True:
                stopping = self._stop.is_set()
                if f is None and self.path.exists():
                    f = open(self.path, "rb")
                    f.seek(self.offset)
                if f is not None:
                    pending += f.read()
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        self._emit(raw)
                if stopping:
                    self._emit(pending)
                    return
                self._stop.wait(self.interval_s)
        finally:
            if f is not None:
                f.close()

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if text:
            level, msg = self.parse(text)
            self.logger.log(level, msg)
