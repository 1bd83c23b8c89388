#!/usr/bin/env bash
# bench/compare.sh: nightlight (release, virtual build) and the lesson's Python device
# (bench/harness/peers/lesson_device.py on paho-mqtt), measured by the harness in bench/harness
# over the same private mosquitto in one run. Needs nothing outside the repository: it makes its
# own Python venv (bench/harness/requirements.txt) in cargo's target directory. Writes
# bench/RESULTS.md (a Markdown table with ratios) and bench/results.json. A third program,
# examples/bench_floor.rs, is measured for CPU per reading only: the floor for any QoS 1 publisher.
# REPS=3 by default; SMOKE=1 runs one short repetition (used by CI: it checks the script, not
# the figures). Takes ~6 minutes with REPS=3.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=bench/harness
REPS=${REPS:-3}
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q && $SUDO apt-get install -y -q mosquitto mosquitto-clients; }
export PATH="$PATH:/usr/sbin"

# A scratch copy of the harness (its run/ logs and results land beside it) and its own venv,
# both in the target directory, so a run writes nothing into the checkout but its figures (bench/RESULTS.md, bench/results.json;
# a smoke run writes neither).
tdir=$(scripts/target-dir.sh)
work="$tdir/bench"
rm -rf "$work/harness" && mkdir -p "$work"
cp -r "$HARNESS" "$work/harness"
rm -rf "$work/harness/.venv" "$work/harness/run" "$work/harness/results"
mkdir -p "$work/harness/results" "$work/harness/run"
chmod -R u+w "$work/harness"
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv" 2>/dev/null || {
    # Debian splits venv (and the pip it bootstraps) into its own package.
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv
    rm -rf "$work/venv"; python3 -m venv "$work/venv"; }
fi
"$work/venv/bin/pip" install -q -r "$HARNESS/requirements.txt"
ln -sfn "$work/venv" "$work/harness/.venv"

cargo build --release --no-default-features --features virtual --bin nightlight --example bench_floor
BIN="$tdir/release/nightlight"
FLOOR="$tdir/release/examples/bench_floor"
PY="$work/venv/bin/python"
OUT="$work/results.json"
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
  -- "$PY" "{bench}/peers/lesson_device.py"
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
