#!/usr/bin/env bash
# bench/fleet.sh: what a fleet costs. Runs `nightlight fleet` (release, virtual build) with
# DEVICES devices (10,000) reading every INTERVAL_MS (5,000) for DURATION_S (120) against a private
# mosquitto on a free loopback port, and prints the fleet's own line (sent, acked, lost,
# duplicated, reading-to-PUBACK p50/p99, the process's peak RSS and CPU) and mosquitto's CPU and
# RSS beside it. The goals (docs/fleet.md): 10,000 devices in at most 64 MiB and 10 % of one core.
# SMOKE=1 runs 200 devices for 5 s (CI: it checks the script, not the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-10000} INTERVAL_MS=${INTERVAL_MS:-5000} DURATION_S=${DURATION_S:-120}
if [ "${SMOKE:-0}" = 1 ]; then DEVICES=200 DURATION_S=5 INTERVAL_MS=500; fi
export PATH="$PATH:/usr/sbin"
tdir=$(scripts/target-dir.sh)
cargo build --release --no-default-features --features virtual --bin nightlight
bin="$tdir/release/nightlight"
work=$(mktemp -d)
trap 'kill "$mpid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
max_queued_messages 0
CONF
[ "$(id -u)" -ne 0 ] || echo "user root" >>"$work/mosquitto.conf"
# One descriptor per device on each side, and then some.
ulimit -n "$(ulimit -Hn)"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mpid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
ticks() { awk '{ print $14 + $15 }' "/proc/$mpid/stat"; }
t0=$(ticks)
"$bin" fleet --devices "$DEVICES" --broker "127.0.0.1:$port" --duration-s "$DURATION_S" --interval-ms "$INTERVAL_MS" \
  | tee "$work/fleet.out"
t1=$(ticks)
hz=$(getconf CLK_TCK)
mrss=$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")
awk -v t="$((t1 - t0))" -v hz="$hz" -v d="$DURATION_S" -v rss="$mrss" \
  'BEGIN { printf "mosquitto: cpu %.1f %% (over the run), peak rss %.1f MiB\n", t / hz / d * 100, rss / 1024 }'
tail -1 "$work/fleet.out" | grep -q '^fleet: .* 0 lost'
