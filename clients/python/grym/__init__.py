"""grym: Python client for the grym-synth orchestrator (``grym.Client``, ``grym.AsyncClient``, the ``grym`` CLI)."""

from grym._version import __version__
from grym.client import Analysis, AsyncClient, Client, GrymError, audio_input, wav_from_events

__all__ = ["__version__", "Analysis", "AsyncClient", "Client", "GrymError", "audio_input", "wav_from_events"]
