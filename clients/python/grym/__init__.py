"""grym: Python client for the grym-synth orchestrator (``grym.Client``, ``grym.AsyncClient``, the ``grym`` CLI)."""

from grym.client import Analysis, AsyncClient, Client, GrymError, audio_input

__all__ = ["Analysis", "AsyncClient", "Client", "GrymError", "audio_input"]
