"""The one version of grym-synth: both distributions (grym-synth, the server with this client; grym, the client
alone) read it at build time, and both commands' ``--version`` print it."""

__version__ = "0.2.0"
