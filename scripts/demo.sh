#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, export the models, start Triton +
# milvus-lite + the orchestrator, run the demo through the `grym` client, and stop everything.
#   PROFILE=base ./scripts/demo.sh     # the real wav2vec2-base architecture (seeded weights unless WEIGHTS_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

PROFILE=${PROFILE:-tiny}
DATA=${DATA_DIR:-data}
mkdir -p "$DATA/demo"
PORTS="$DATA/demo/ports"; rm -f "$PORTS"
extra=()
[ -n "${WEIGHTS_DIR:-}" ] && extra+=(--weights-dir "$WEIGHTS_DIR")

echo "== starting grym-synth (profile=$PROFILE, data=$DATA): exports models if missing, starts Triton and Milvus"
grym-synth --plain-logs serve --profile "$PROFILE" --data-dir "$DATA" --port 0 --metrics-port 0 \
  --port-file "$PORTS" "${extra[@]}" > "$DATA/demo/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  [ -s "$PORTS" ] && break
  kill -0 $SERVER 2>/dev/null || { echo "server failed to start:"; tail -40 "$DATA/demo/server.log"; exit 1; }
  sleep 1
done
[ -s "$PORTS" ] || { echo "server not ready after 15 minutes"; tail -40 "$DATA/demo/server.log"; exit 1; }
read -r PORT METRICS < "$PORTS"
export GRYM_TARGET=127.0.0.1:$PORT
echo "== orchestrator on $GRYM_TARGET, Prometheus metrics on http://127.0.0.1:$METRICS/metrics"

python scripts/make_demo_audio.py "$DATA/demo"
set -x
grym health
grym analyze "$DATA/demo/pad_c_major.wav" --store --tag mood=calm --tag kind=pad
grym analyze "$DATA/demo/pad_a_minor.wav" --store --tag mood=dark --tag kind=pad
grym analyze "$DATA/demo/pulse_120bpm.wav" --store --tag mood=driving --tag kind=rhythm
grym search --like "$DATA/demo/pad_c_major.wav" --top-k 3
grym patterns list --tag kind=pad
grym generate "warm analog pad, slow attack" --seconds 5 --steps 10 --seed 7 --out "$DATA/demo/generated_pad.wav" \
  --store --tag kind=generated
grym compose "10 second ambient piece, rain, slow build" --max-tokens 48 --out "$DATA/demo/composition.wav" \
  --tag session=demo
grym workflows
grym clusters
# Music analysis (docs/music_analysis.md): renders of self-made MIDI by fluidsynth, analysed and searched through
# the `grym` Python client (scripts/demo_music.py), its numbers printed beside the MIDI's truth.
python scripts/demo_music.py "$DATA/demo/music"
set +x
echo "== audio written to $DATA/demo/generated_pad.wav and $DATA/demo/composition.wav (seeded weights: the"
echo "   pipeline and its numbers are real, the sound is not music; see README 'About the weights')"
echo "== demo done; stopping (SIGTERM drains requests and stops Triton and Milvus)"
