#!/usr/bin/env bash
# bench/compare.sh: nightlight (release, virtual build) and the lesson's Python device, measured by
# the shared harness (../shared/bench) over the same private mosquitto in one run. Writes
# bench/RESULTS.md (a Markdown table with ratios) and bench/results.json. A third program,
# examples/bench_floor.rs, is measured for CPU per reading only: the floor for any QoS 1 publisher.
# REPS=3 by default; SMOKE=1 runs one short repetition (used by CI: it checks the script, not
# the figures). Takes ~6 minutes with REPS=3.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=${NIGHTLIGHT_BENCH_HARNESS:-../shared/bench}
REPS=${REPS:-3}
[ -f "$HARNESS/measure_peer.py" ] || { echo "no harness at $HARNESS (set NIGHTLIGHT_BENCH_HARNESS)" >&2; exit 2; }
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q && $SUDO apt-get install -y -q mosquitto mosquitto-clients; }
export PATH="$PATH:/usr/sbin"

# A private copy of the harness and its own venv, so nothing is written into the shared folder.
work=target/bench
rm -rf "$work/harness" && mkdir -p "$work"
cp -r "$HARNESS" "$work/harness"
rm -rf "$work/harness/.venv" "$work/harness/run" "$work/harness/results"
mkdir -p "$work/harness/results" "$work/harness/run"
chmod -R u+w "$work/harness"
if [ ! -x "$work/venv/bin/python" ]; then python3 -m venv "$work/venv"; fi
"$work/venv/bin/pip" install -q paho-mqtt==2.2.0
ln -sfn "$PWD/$work/venv" "$work/harness/.venv"

cargo build --release --no-default-features --features virtual --bin nightlight --example bench_floor
BIN="$PWD/target/release/nightlight"
FLOOR="$PWD/target/release/examples/bench_floor"
PY="$PWD/$work/venv/bin/python"
OUT="$PWD/$work/results.json"
rm -f "$OUT"
extra=()
if [ "${SMOKE:-0}" = 1 ]; then
  REPS=1
  extra=(--commands 20 --fast-messages 100 --idle-window-s 2 --rss-after-s 1 --floor 50)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cd "$work/harness"
"$PY" measure_peer.py --name paho-lesson --reps "$REPS" --port "$port" --out "$OUT" "${extra[@]}" \
  --version-cmd "$PY -c 'import paho.mqtt; print(\"paho-mqtt\", paho.mqtt.__version__)'" \
  --note "the lesson's device on paho-mqtt 2.x" \
  -- "$PY" "{bench}/peers/paho_nightlight.py"
"$PY" measure_peer.py --name nightlight --reps "$REPS" --port "$port" --out "$OUT" "${extra[@]}" \
  --version-cmd "$BIN --version" \
  --env NIGHTLIGHT__ID={id} --env NIGHTLIGHT__MQTT__HOST={host} --env NIGHTLIGHT__MQTT__PORT={port} \
  --env NIGHTLIGHT__SENSOR__KIND=virtual --env NIGHTLIGHT__LED__KIND=virtual \
  --env NIGHTLIGHT__SENSOR__INTERVAL_MS={interval_ms} --env "NIGHTLIGHT__QUEUE__DIR={bench}/run/queue-{id}" \
  --env NIGHTLIGHT_CONFIG=/dev/null \
  --note "release build, --no-default-features --features virtual; durable queue on" \
  -- "$BIN" run
# The yardstick for CPU per reading: a blocking loop of hand-built QoS 1 publishes, fast phase only.
"$PY" measure_peer.py --name floor --reps "$REPS" --port "$port" --out "$OUT" "${extra[@]}" --phases fast \
  --note "examples/bench_floor.rs: blocking QoS 1 publish + PUBACK + sleep; no runtime, library or queue" \
  -- "$FLOOR"
cd - >/dev/null
python3 bench/table.py "$OUT" > "$work/RESULTS.md"
if [ "${SMOKE:-0}" != 1 ]; then
  cp "$OUT" bench/results.json
  cp "$work/RESULTS.md" bench/RESULTS.md
fi
cat "$work/RESULTS.md"
