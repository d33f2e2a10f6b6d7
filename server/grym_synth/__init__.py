"""grym-synth orchestrator: the public gRPC API in front of Triton, Milvus and the coordinator."""

from importlib import metadata

try:  # the distribution's version (read from grym/_version.py at build time): the one version source
    __version__ = metadata.version("grym-synth")
except metadata.PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"
