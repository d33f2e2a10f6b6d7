"""grym-synth orchestrator: the public gRPC API in front of Triton, Milvus and the coordinator."""

__version__ = "0.1.0"
