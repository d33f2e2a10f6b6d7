#!/usr/bin/env bash
# Install the non-Python tools the API-contract, other-language-client and deploy tests need, idempotently.
#
# WHY a script: CI runs on a fresh machine, so everything beyond the Python venv must be installed by the project
# itself. Each step checks first and does nothing when the tool is already there, so running it on every CI run
# (or by hand, repeatedly) is cheap.
#
#   * Debian toolchain for the C++ client: protoc + grpc_cpp_plugin, libgrpc++/libprotobuf headers, g++, cmake.
#   * buf (API lint/breaking checks) and the Node client's dependencies, both from npm into gitignored folders:
#     build/tools/node/ (buf) and clients/node/node_modules/.
#
#   * the CUDA runtime library perf_analyzer links against, from PyPI into build/tools/cuda/ (needs .venv).
#
# Usage: scripts/install_tools.sh [--no-apt] [--no-npm] [--no-pip]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/build/tools"  # build/ is gitignored
BUF_VERSION="${BUF_VERSION:-1.75.0}"
do_apt=1
do_npm=1
do_pip=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) do_apt=0 ;;
    --no-npm) do_npm=0 ;;
    --no-pip) do_pip=0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

APT_PACKAGES=(
  g++ make cmake pkg-config
  protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev
  # runtime library of the perf_analyzer binary that tritonclient's wheel ships (docs/perf_analyzer.md)
  libb64-0d
  # the workflow store's shared-database backend is tested against a real server the tests start
  postgresql
  # TLS tests make their certificates with the openssl CLI
  openssl
)

missing_apt_packages() {
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      echo "$pkg"
    fi
  done
  # Node may come from another source (e.g. NodeSource's nodejs bundles npm and conflicts with Debian's npm
  # package): ask Debian for it only when the commands are missing.
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo nodejs
    echo npm
  fi
}

if [[ $do_apt == 1 ]]; then
  mapfile -t missing < <(missing_apt_packages)
  if ((${#missing[@]})); then
    echo "install_tools: apt-get install ${missing[*]}"
    SUDO=""
    if [[ $(id -u) != 0 ]]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "install_tools: Debian packages present"
  fi
fi

if [[ $do_npm == 1 ]]; then
  if ! command -v npm >/dev/null; then
    echo "install_tools: npm not found (run without --no-apt)" >&2
    exit 1
  fi
  # buf: the npm package ships the prebuilt binary for this platform as an optional dependency.
  if [[ ! -x "$TOOLS/node/node_modules/.bin/buf" ]] \
     || [[ "$("$TOOLS/node/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
    echo "install_tools: npm install @bufbuild/buf@$BUF_VERSION into $TOOLS/node"
    mkdir -p "$TOOLS/node"
    npm install --prefix "$TOOLS/node" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
  else
    echo "install_tools: buf $BUF_VERSION present"
  fi
  # Node client: install exactly what package-lock.json pins when the lock is there (npm ci), else resolve.
  node_dir="$ROOT/clients/node"
  stamp="$node_dir/node_modules/.grym-installed"
  if [[ ! -f "$stamp" ]] || [[ "$node_dir/package.json" -nt "$stamp" ]] \
     || { [[ -f "$node_dir/package-lock.json" ]] && [[ "$node_dir/package-lock.json" -nt "$stamp" ]]; }; then
    echo "install_tools: npm install in clients/node"
    if [[ -f "$node_dir/package-lock.json" ]]; then
      npm ci --prefix "$node_dir" --no-audit --no-fund --silent
    else
      npm install --prefix "$node_dir" --no-audit --no-fund --silent
    fi
    touch "$stamp"
  else
    echo "install_tools: clients/node dependencies present"
  fi
fi

# perf_analyzer: tritonclient wheels after 2.4x no longer ship it, and the client that matches the embedded Triton
# 2.51 is one of those; the 2.41 wheel's binary speaks the same v2 protocol, so it is taken from that wheel (a
# PyPI package, unpacked, not installed) into build/tools/perf_analyzer/. It links libcudart.so.12 even for CPU-only
# use; NVIDIA's runtime wheel provides it without a CUDA toolkit. tests/contract/test_deploy_manifests.py puts both
# folders on PATH / LD_LIBRARY_PATH.
if [[ $do_pip == 1 ]]; then
  pa_dir="$TOOLS/perf_analyzer"
  if [[ ! -x "$pa_dir/perf_analyzer" ]]; then
    echo "install_tools: perf_analyzer from the tritonclient 2.41.0 wheel into $pa_dir"
    tmp=$(mktemp -d)
    "$ROOT/.venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "tritonclient==2.41.0"
    mkdir -p "$pa_dir"
    "$ROOT/.venv/bin/python" - "$tmp" "$pa_dir" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("tritonclient-2.41.0-*.whl"))
out = pathlib.Path(sys.argv[2]) / "perf_analyzer"
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith("/bin/perf_analyzer"))
    out.write_bytes(zf.read(name))
out.chmod(0o755)
PY
    rm -rf "$tmp"
  else
    echo "install_tools: perf_analyzer present"
  fi
  cuda_rt="$TOOLS/cuda"
  if [[ -x "$pa_dir/perf_analyzer" ]] && ! compgen -G "$cuda_rt/nvidia/cuda_runtime/lib/libcudart.so.12*" >/dev/null; then
    echo "install_tools: pip install nvidia-cuda-runtime-cu12 into $cuda_rt"
    "$ROOT/.venv/bin/python" -m pip install --quiet --target "$cuda_rt" "nvidia-cuda-runtime-cu12>=12,<13"
  else
    echo "install_tools: perf_analyzer runtime present"
  fi
fi

echo "install_tools: done"
