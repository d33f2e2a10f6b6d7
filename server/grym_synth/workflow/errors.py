"""How a step's failure is described: a gRPC code name and a message safe to store and stream."""

from __future__ import annotations

import logging

from grym_synth.core.errors import GrymError, public_message

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(gRPC code name, message) for an executor failure; unexpected exceptions are bugs and are logged.

    The message is stored in the workflow record and streamed to the client, so it gets the same treatment as a
    status message: no addresses, reprs or exception class names (the log keeps the full error)."""
    if isinstance(exc, GrymError):
        return exc.code.name, public_message(exc.message)
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED", "the step ran past its deadline"
    log.error("step failed with an unexpected error", exc_info=exc)
    return "INTERNAL", "internal error in the step; the server log has the details under the request id"
