#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions per reading at a 10 ms interval, for the device
# (release, virtual build) and the floor program (examples/bench_floor.rs), counted by valgrind's
# callgrind over ~500 readings to a private mosquitto after a 4 s warm-up.
#
# CPU time on a shared VM moves by +-50 % from one minute to the next; an instruction count
# moves by a few per cent, so this is the figure to compare two versions of the code by. It counts
# user space only: the kernel's share (the socket writes and reads, the wake-ups) is not in it.
# Installs valgrind and mosquitto when missing. Takes about 30 s. Extra arguments: more
# binaries to count the same way (another build of nightlight, copied under another name).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then $SUDO apt-get update -q && $SUDO apt-get install -y -q "${need[@]}"; fi
export PATH="$PATH:/usr/sbin"

cargo build -q --release --no-default-features --features virtual --bin nightlight --example bench_floor
tdir=$(scripts/target-dir.sh)
bins=("$tdir/release/examples/bench_floor" "$tdir/release/nightlight" "$@")

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
sleep 0.3
mosquitto_sub -p "$port" -t '+/telemetry' >"$work/seen" &
sub=$!
trap 'kill $sub $broker 2>/dev/null; rm -rf "$work"' EXIT
sleep 0.2

for bin in "${bins[@]}"; do
  name=$(basename "$bin")
  args=(run)
  [ "$name" = bench_floor ] && args=()
  env NIGHTLIGHT_ID="$name" NIGHTLIGHT_BROKER_HOST=127.0.0.1 NIGHTLIGHT_BROKER_PORT="$port" NIGHTLIGHT_INTERVAL_MS=10 \
    NIGHTLIGHT__ID="$name" NIGHTLIGHT__MQTT__HOST=127.0.0.1 NIGHTLIGHT__MQTT__PORT="$port" \
    NIGHTLIGHT__SENSOR__KIND=virtual NIGHTLIGHT__LED__KIND=virtual NIGHTLIGHT__SENSOR__INTERVAL_MS=10 \
    NIGHTLIGHT__QUEUE__DIR="$work/queue-$name" NIGHTLIGHT_CONFIG=/dev/null \
    valgrind -q --tool=callgrind --callgrind-out-file="$work/cg.$name.%p" "$bin" "${args[@]}" >/dev/null 2>&1 &
  pid=$!
  sleep 4
  callgrind_control -z "$pid" >/dev/null 2>&1
  before=$(grep -c "" "$work/seen")
  sleep 5
  after=$(grep -c "" "$work/seen")
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  ir=$(awk '/^summary:/ {print $2}' "$work"/cg."$name".*.1)
  echo "$name: $((after - before)) readings, $((ir / (after - before))) instructions per reading"
done
