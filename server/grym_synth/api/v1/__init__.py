"""Generated protobuf and gRPC stubs for grym.v1, the server's own copy (built from proto/ by the wheel's build hook or scripts/gen_protos.py; not committed)."""
