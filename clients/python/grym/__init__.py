"""grym: Python client for the grym-synth orchestrator (``grym.Client``, ``grym.AsyncClient``, the ``grym`` CLI).

The client names load on first use (PEP 562), so that ``grym.cli`` can configure gRPC's logging before gRPC is
imported."""

from typing import Any

from grym._version import __version__

__all__ = ["__version__", "Analysis", "AsyncClient", "Client", "GrymError", "audio_input", "wav_from_events"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from grym import client

        return getattr(client, name)
    raise AttributeError(f"module 'grym' has no attribute {name!r}")
