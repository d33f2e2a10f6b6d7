"""Generated protobuf and gRPC stubs for grym.v1 (run scripts/gen_protos.py; not committed)."""
