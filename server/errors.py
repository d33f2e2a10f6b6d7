"""One error shape for the whole orchestrator.

Serving code raises a :class:`GrymError` subclass for every *expected* failure (bad input, unknown id, a
downstream that is down); the transport layer turns it into a gRPC status in one place
(:func:`server.service.rpc_errors`). Anything else is a bug: it is logged with the request id and answered as
INTERNAL. The status message always ends with the request id so a user can quote it.
"""

from __future__ import annotations

import grpc


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
