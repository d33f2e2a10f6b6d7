"""One error shape for the whole orchestrator.

Serving code raises a :class:`GrymError` subclass for every *expected* failure (bad input, unknown id, a
downstream that is down); the transport layer turns it into a gRPC status in one place
(:func:`grym_synth.api.servicer.rpc_errors`). Anything else is a bug: it is logged with the request id and answered as
INTERNAL. The status message always ends with the request id so a user can quote it.
"""

from __future__ import annotations

import re

import grpc

# What a status message must never carry: peer addresses (``127.0.0.1:41234``, ``ipv4:...``, ``[::1]:8001``,
# ``unix:/run/x.sock``), gRPC debug dumps, object reprs and memory addresses. These stay in the JSON log, next to
# the request id; the client gets the field or the downstream's name.
_GRPC_DUMP = re.compile(r"(<_?\w*RpcError\b|debug_error_string|grpc_status:|created_time:|UNKNOWN:Error received)"
                        r".*", re.S)
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock|dns|tcp):[^\s,;'\")\]]*"  # gRPC peer/target notation
    r"|\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\](?::\d+)?"  # [::1]:8001
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # 127.0.0.1:41234
    r"|\blocalhost:\d+\b"
    r"|\b[a-z][a-z0-9+.-]*://[^\s'\"]+"  # URLs (http://host:port/..., grpc://...)
)
_REPR = re.compile(r"<[^<>]*\bobject at 0x[0-9A-Fa-f]+>|<[^<>]* at 0x[0-9A-Fa-f]+>|\b0x[0-9A-Fa-f]{6,}\b")
_CLASS_NAME = re.compile(r"\b(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b:?\s*")


def public_message(text: str, limit: int = 400) -> str:
    """``text`` made fit for a status message: addresses, gRPC dumps and reprs removed, length bounded."""
    text = _GRPC_DUMP.sub("(details in the server log)", str(text))
    text = _ADDRESS.sub("<internal>", text)
    text = _REPR.sub("<object>", text)
    text = _CLASS_NAME.sub("", text)  # "ClientConnectorError: cannot connect" -> "cannot connect"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class GrymError(Exception):
    """An expected failure with the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GrymError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GrymError):
    code = grpc.StatusCode.NOT_FOUND


class OutOfRange(GrymError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(GrymError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(GrymError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(GrymError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GrymError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(GrymError):
    """A downstream cannot serve right now; ``downstream`` names it (e.g. ``triton:wav2vec2``, ``milvus``)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, downstream: str, message: str) -> None:
        super().__init__(f"{downstream} is unavailable: {message}")
        self.downstream = downstream


class DownstreamError(GrymError):
    """A downstream failed on a request that was valid (a model raised, storage rejected a write)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, downstream: str, message: str) -> None:
        super().__init__(f"{downstream} failed: {message}")
        self.downstream = downstream
