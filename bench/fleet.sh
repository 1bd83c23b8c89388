#!/usr/bin/env bash
# bench/fleet.sh: what a fleet costs. Runs `nightlight fleet` (release, virtual build) with
# DEVICES devices (10,000) reading every INTERVAL_MS (5,000) for DURATION_S (120) against a private
# mosquitto on a free loopback port, and prints the fleet's own line (sent, acked, lost,
# duplicated, reading-to-PUBACK p50/p99, the process's peak RSS and CPU) and mosquitto's CPU and
# RSS beside it. The goals (docs/fleet.md): 10,000 devices in at most 64 MiB and 10 % of one core.
# CONTROLLERS (2) `nightlight server` instances in one shared group decide the fleet's readings
# meanwhile: their readings must add up to what the broker delivered to the fleet's observer
# (every reading decided exactly once), their commands to what the devices obeyed; their CPU
# gives readings decided per second per core.
# KILL=1 kills the first controller (SIGKILL) halfway through and says how many readings no
# controller decided: the gap before the other took over, in readings and in seconds of the
# fleet's rate (the killed one's share comes from its last once-a-second count).
# ROLLOUT_FAIL=P (unset: no rollout) gives the devices a release key and P % bad installs, and a
# third into the run sends them a signed update with `nightlight release rollout --abort-after
# 200 --abort-at 5`, printing its last line and how many failed devices it listed.
# BROKER=HOST:PORT runs against a broker of yours instead of the private mosquitto (a cluster's
# node, say), and CONTROLLER_BROKERS="HOST:PORT ..." puts the controllers on other brokers (the
# i-th on the i-th, cycling): with a cluster, readings and commands then cross its nodes.
# SMOKE=1 runs 200 devices for 5 s (CI: it checks the script, not the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-10000} INTERVAL_MS=${INTERVAL_MS:-5000} DURATION_S=${DURATION_S:-120} CONTROLLERS=${CONTROLLERS:-2}
if [ "${SMOKE:-0}" = 1 ]; then DEVICES=200 DURATION_S=5 INTERVAL_MS=500; fi
export PATH="$PATH:/usr/sbin"
tdir=$(scripts/target-dir.sh)
cargo build --release --no-default-features --features virtual --bin nightlight
bin="$tdir/release/nightlight"
work=$(mktemp -d)
pids=()
mpid=""
trap 'kill "${pids[@]}" $mpid 2>/dev/null || true; rm -rf "$work"' EXIT
# One descriptor per device on each side, and then some.
ulimit -n "$(ulimit -Hn)"
if [ -z "${BROKER:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
max_queued_messages 0
CONF
  [ "$(id -u)" -ne 0 ] || echo "user root" >>"$work/mosquitto.conf"
  mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
  mpid=$!
  BROKER="127.0.0.1:$port"
fi
for _ in $(seq 100); do (exec 3<>"/dev/tcp/${BROKER%:*}/${BROKER##*:}") 2>/dev/null && break; sleep 0.05; done
read -r -a cbrokers <<<"${CONTROLLER_BROKERS:-$BROKER}"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
for c in $(seq "$CONTROLLERS"); do
  cb=${cbrokers[$(((c - 1) % ${#cbrokers[@]}))]}
  NIGHTLIGHT__MQTT__HOST=${cb%:*} NIGHTLIGHT__MQTT__PORT=${cb##*:} NIGHTLIGHT__SERVER__SHARED_GROUP=bench \
    RUST_LOG=info,nightlight::server=debug "$bin" --config device.toml server 2>"$work/server$c.log" &
  pids+=($!)
done
for c in $(seq "$CONTROLLERS"); do
  for _ in $(seq 100); do grep -q '"connected"\|connected' "$work/server$c.log" && break; sleep 0.05; done
done
[ -z "$mpid" ] || t0=$(ticks "$mpid")
c0=(); for p in "${pids[@]}"; do c0+=("$(ticks "$p")"); done
update=()
if [ -n "${ROLLOUT_FAIL:-}" ]; then
  "$bin" release keygen "$work/keys" >/dev/null
  head -c 100000 /dev/urandom >"$work/nightlight_9.9.9_all.deb"
  "$bin" release sign --key "$work/keys/release.key" --url "http://127.0.0.1:9/nightlight_9.9.9_all.deb" \
    --version 9.9.9 --arch all "$work/nightlight_9.9.9_all.deb" >"$work/manifest.json"
  update=(--update-keys "$work/keys/release.pub" --fail-installs "$ROLLOUT_FAIL")
fi
"$bin" fleet --devices "$DEVICES" --broker "$BROKER" --duration-s "$DURATION_S" --interval-ms "$INTERVAL_MS" \
  "${update[@]}" 2>"$work/fleet.err" | tee "$work/fleet.out" &
fleet=$!
if [ "${KILL:-0}" = 1 ] && [ "$CONTROLLERS" -ge 2 ]; then
  sleep $((DURATION_S / 2))
  kill -9 "${pids[0]}"
  echo "killed controller 1 (SIGKILL) at $((DURATION_S / 2)) s"
fi
if [ -n "${ROLLOUT_FAIL:-}" ]; then
  for _ in $(seq 600); do grep -q "devices connected after" "$work/fleet.err" && break; sleep 0.1; done
  "$bin" release rollout --broker "$BROKER" --manifest "$work/manifest.json" --devices 'fleet-*' \
    --abort-after 200 --abort-at 5 >"$work/rollout.out" 2>"$work/rollout.err" || true
  echo "rollout ($ROLLOUT_FAIL % bad installs, abort at 5 % after 200): $(grep -c '^rollout: failed' "$work/rollout.out") failed devices listed"
  tail -1 "$work/rollout.out"
fi
wait "$fleet"
tail -3 "$work/fleet.err" >&2
[ -z "$mpid" ] || t1=$(ticks "$mpid")
# The controllers take the fleet's last readings the moment the observer does; a second lets them
# finish before they are asked to stop and count (a benchmark's settle, not a test's wait).
[ "$CONTROLLERS" -eq 0 ] || sleep 1
hz=$(getconf CLK_TCK)
decided=0 cpu=0 each=""
for i in "${!pids[@]}"; do
  c=0
  if [ -e "/proc/${pids[$i]}" ]; then
    c=$(( $(ticks "${pids[$i]}") - ${c0[$i]} ))
    kill -TERM "${pids[$i]}"
  fi
  wait "${pids[$i]}" || true
  n=$(sed -n 's/.*controller stopped.*readings=\([0-9]*\).*/\1/p' "$work/server$((i + 1)).log")
  # A killed controller never says stopped: its last count says what it decided.
  [ -n "$n" ] || n=$(sed -n 's/.*decided so far.*readings=\([0-9]*\).*/\1/p' "$work/server$((i + 1)).log" | tail -1)
  decided=$((decided + ${n:-0})) cpu=$((cpu + c)) each="$each ${n:-0}"
done
pids=()
if [ "${KILL:-0}" = 1 ] && [ "$CONTROLLERS" -ge 2 ]; then
  sent=$(sed -n 's/^fleet: [0-9]* devices, \([0-9]*\) sent.*/\1/p' "$work/fleet.out")
  awk -v s="$sent" -v n="$decided" -v t="$DURATION_S" \
    'BEGIN { u = s - n; printf "after the kill: %d readings decided by neither controller (%.2f s of the fleet'"'"'s readings; the killed one'"'"'s last count is up to 1 s old)\n", u, u / (s / t) }'
fi
if [ "$CONTROLLERS" -gt 0 ]; then
  delivered=$(sed -n 's/^fleet: \([0-9]*\) readings delivered.*/\1/p' "$work/fleet.out")
  awk -v n="$decided" -v d="$delivered" -v each="$each" -v c="$cpu" -v hz="$hz" -v t="$DURATION_S" -v k="$CONTROLLERS" \
    'BEGIN { printf "controllers: %d in a shared group decided %d readings (each:%s) of %d delivered; %.0f readings/s per core, %.1f %% of a core in all\n",
             k, n, each, d, (c > 0 ? n / (c / hz) : 0), c / hz / t * 100 }'
fi
if [ -n "$mpid" ]; then
  mrss=$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")
  awk -v t="$((t1 - t0))" -v hz="$hz" -v d="$DURATION_S" -v rss="$mrss" \
    'BEGIN { printf "mosquitto: cpu %.1f %% (over the run), peak rss %.1f MiB\n", t / hz / d * 100, rss / 1024 }'
fi
tail -1 "$work/fleet.out" | grep -q '^fleet: .* 0 lost'
