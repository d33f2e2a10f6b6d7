#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC stubs from proto/ into clients/python/grym/v1/ (never committed).

The stubs live in the client package (``grym.v1``) so that the server and every Python client import one copy.
Other languages generate their own stubs from the same files (clients/cpp, clients/node).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "clients" / "python"


def main() -> int:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return int(code)
    print(f"generated {len(protos)} proto files into {OUT_DIR / 'grym' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
