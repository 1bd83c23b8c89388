#!/usr/bin/env bash
# Try the nightlight on a laptop: builds the simulated device (no hardware, no rppal), starts a
# private mosquitto on a free loopback port (installing it when missing), and runs the device
# against it until Ctrl-C. Extra arguments go to `nightlight run`.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [ ! -x "$MOSQUITTO" ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q mosquitto mosquitto-clients
  MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi
cargo build --release --no-default-features --features virtual
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' "$port" >"$work/mosquitto.conf"
"$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$work"' EXIT
sleep 0.3
cat >&2 <<MSG

  mosquitto is on 127.0.0.1:$port. In another terminal:
    mosquitto_sub -p $port -t 'nightlight-01/#' -v
    mosquitto_pub -p $port -t nightlight-01/commands -m '{"led_on": true}'
    mosquitto_pub -p $port -t nightlight-01/virtual/light -m 150
  Ctrl-C stops the device (and the broker).

MSG
NIGHTLIGHT__MQTT__HOST=127.0.0.1 NIGHTLIGHT__MQTT__PORT=$port NIGHTLIGHT__QUEUE__DIR="$work/queue" \
  "$(scripts/target-dir.sh)/release/nightlight" run "$@" || true
