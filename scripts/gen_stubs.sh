#!/usr/bin/env bash
# Generate the non-Python gRPC stubs of the grym-synth API from proto/ (never committed).
#
#   C++:  protoc + grpc_cpp_plugin (Debian's protobuf-compiler / protobuf-compiler-grpc, the same versions the
#         client links against, so generated code and headers always match) -> clients/cpp/gen/
#         The grpc.health.v1 proto (vendored under clients/cpp/proto/) is generated alongside.
#   Node: the Node client loads proto/ at run time with @grpc/proto-loader, so it needs no generated code; this
#         script only checks that every proto file loads (catches syntax the JS loader rejects).
#
# Python stubs come from scripts/gen_protos.py. clients/cpp/CMakeLists.txt calls this script to (re)generate the
# C++ stubs whenever a .proto changes, so there is exactly one protoc invocation to maintain.
#
# Usage: scripts/gen_stubs.sh [--cpp-out DIR] [--cpp-only | --node-only]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROTO_DIR="$ROOT/proto"
HEALTH_PROTO_DIR="$ROOT/clients/cpp/proto"
CPP_OUT="$ROOT/clients/cpp/gen"
do_cpp=1
do_node=1
while (($#)); do
  case "$1" in
    --cpp-out) CPP_OUT="$2"; shift 2 ;;
    --cpp-only) do_node=0; shift ;;
    --node-only) do_cpp=0; shift ;;
    *) echo "gen_stubs: unknown argument: $1" >&2; exit 2 ;;
  esac
done

mapfile -t PROTOS < <(cd "$PROTO_DIR" && find . -name '*.proto' | sed 's#^\./##' | LC_ALL=C sort)

if ((do_cpp)); then
  for tool in protoc grpc_cpp_plugin; do
    command -v "$tool" >/dev/null || { echo "gen_stubs: $tool not found: run scripts/install_tools.sh" >&2; exit 1; }
  done
  mkdir -p "$CPP_OUT"
  # Well-known types (google/protobuf/timestamp.proto) resolve from protoc's own include dir.
  protoc -I"$PROTO_DIR" --cpp_out="$CPP_OUT" --grpc_out="$CPP_OUT" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" "${PROTOS[@]}"
  protoc -I"$HEALTH_PROTO_DIR" --cpp_out="$CPP_OUT" --grpc_out="$CPP_OUT" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" grpc/health/v1/health.proto
  echo "gen_stubs: C++ stubs for ${#PROTOS[@]} proto files + grpc.health.v1 in $CPP_OUT"
fi

if ((do_node)); then
  node_dir="$ROOT/clients/node"
  [[ -d "$node_dir/node_modules/@grpc/proto-loader" ]] \
    || { echo "gen_stubs: clients/node dependencies missing: run scripts/install_tools.sh" >&2; exit 1; }
  (cd "$node_dir" && node -e 'require("./src/client").loadProtos(); console.log("gen_stubs: Node loads", process.argv[1], "proto files")' "${#PROTOS[@]}")
fi
