#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run the whole suite (real Triton, milvus-lite,
# orchestrator, and the C++/Node clients). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x scripts/install_tools.sh ]; then bash scripts/install_tools.sh; fi
. .venv/bin/activate
# Line coverage of the package, the orchestrator child processes included (coverage's subprocess patch).
exec python -m pytest -q -p no:cacheprovider --durations=40 --cov --cov-report=term "$@"
