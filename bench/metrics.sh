#!/usr/bin/env bash
# bench/metrics.sh: what scraping costs the nightlight. Measures command -> LED one way (the
# harness's default phase, 500 commands, bench/harness/measure_peer.py) on the release virtual
# build twice over one private mosquitto: with metrics off, and with metrics.listen on while
# bench/harness/scraper.py scrapes /metrics 1,000 times a second. Prints both and the ratio of
# their p99 (the goal: at most 1.10). REPS=3 by default. Needs what bench/compare.sh needs (it
# makes the same venv in cargo's target directory). Takes ~4 minutes. SMOKE=1 runs one short
# repetition (CI: it checks the script, not the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
commands=500
if [ "${SMOKE:-0}" = 1 ]; then REPS=1; commands=20; fi
export PATH="$PATH:/usr/sbin"
tdir=$(scripts/target-dir.sh)
work="$tdir/bench-metrics"
rm -rf "$work" && mkdir -p "$work"
cp -r bench/harness "$work/harness"
rm -rf "$work/harness/.venv" "$work/harness/run" "$work/harness/results"
mkdir -p "$work/harness/results" "$work/harness/run"
venv="$tdir/bench/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r bench/harness/requirements.txt
ln -sfn "$venv" "$work/harness/.venv"
cargo build --release --no-default-features --features virtual --bin nightlight
BIN="$tdir/release/nightlight"
PY="$venv/bin/python"
OUT="$work/results.json"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
cd "$work/harness"
run() {
  local name=$1; shift
  "$PY" measure_peer.py --name "$name" --reps "$REPS" --port "$port" --out "$OUT" --phases default \
    --idle-window-s 2 --rss-after-s 1 --floor 0 --commands "$commands" \
    --env NIGHTLIGHT__ID={id} --env NIGHTLIGHT__MQTT__HOST={host} --env NIGHTLIGHT__MQTT__PORT={port} \
    --env NIGHTLIGHT__SENSOR__KIND=virtual --env NIGHTLIGHT__LED__KIND=virtual \
    --env NIGHTLIGHT__SENSOR__INTERVAL_MS={interval_ms} --env "NIGHTLIGHT__QUEUE__DIR={bench}/run/queue-{id}" \
    --env NIGHTLIGHT_CONFIG=/dev/null "$@" -- "$BIN" run
}
run metrics-off
# The scraper starts with the device and retries until the endpoint is up; its own figures go
# to scraper.log.
( "$PY" scraper.py 127.0.0.1 "$mport" 1000 > "$work/scraper.log" 2>&1 ) &
scraper=$!
run metrics-1000-scrapes-per-s --env "NIGHTLIGHT__METRICS__LISTEN=127.0.0.1:$mport"
kill -TERM "$scraper"; wait "$scraper" || true
cd - >/dev/null
python3 - "$OUT" "$work/scraper.log" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["peers"]
scr = open(sys.argv[2]).read().strip()
off = d["metrics-off"]["latency_pooled_over_reps"]["oneway_publish_to_switch"]
on = d["metrics-1000-scrapes-per-s"]["latency_pooled_over_reps"]["oneway_publish_to_switch"]
print("| command -> LED one way | metrics off | 1,000 scrapes/s | ratio |")
print("| --- | --- | --- | --- |")
for k in ("p50_us", "p99_us", "max_us"):
    print(f"| {k[:-3]} | {off[k]:.1f} µs | {on[k]:.1f} µs | {on[k] / off[k]:.2f}x |")
print(f"\ncommands: {off['n']} and {on['n']}; scraper: {scr}")
print(f"p99 ratio {on['p99_us'] / off['p99_us']:.2f} (goal <= 1.10)")
PY
