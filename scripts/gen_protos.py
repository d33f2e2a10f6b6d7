#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC stubs from proto/ (never committed; the wheels' build hook calls this).

Two copies, one per distribution: ``grym.v1`` in the client package (clients/python/grym/v1) and
``grym_synth.api.v1`` in the server package (server/grym_synth/api/v1), so that the server never imports its
client (KServe's layout). protoc writes ``from grym.v1 import common_pb2``; the server copy's imports are rewritten
to its own package. Both register the same descriptors ("grym/v1/*.proto"), which protobuf accepts when the files
are identical, so a process may load both. Other languages generate their own stubs (scripts/gen_stubs.sh).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
TARGETS = {"grym.v1": ROOT / "clients" / "python" / "grym" / "v1",
           "grym_synth.api.v1": ROOT / "server" / "grym_synth" / "api" / "v1"}


def generate(targets: dict[str, Path] | None = None, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """protoc into a scratch dir, then copy each stub into every target package with its imports rewritten."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        code = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={scratch}",
                            f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *protos])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) on {protos}")
        generated = sorted((Path(scratch) / "grym" / "v1").glob("*_pb2*.py*"))
        for package, out_dir in (targets or TARGETS).items():
            out_dir.mkdir(parents=True, exist_ok=True)
            for src in generated:
                text = re.sub(r"^from grym\.v1 import", f"from {package} import", src.read_text(), flags=re.M)
                dst = out_dir / src.name
                if not dst.exists() or dst.read_text() != text:
                    dst.write_text(text)
                written.append(dst)
    return written


def main() -> int:
    written = generate()
    print(f"generated {len(written)} stub files into {', '.join(str(p) for p in TARGETS.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
