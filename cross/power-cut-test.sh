#!/usr/bin/env bash
# cross/power-cut-test.sh: real power cuts. The real .deb (with the `virtual` feature added, the
# emulated board has no Pi hardware) in the boot test's arm64 Debian, its broker and a
# persistent QoS 1 observer *outside* the VM (reached through the emulator's user network). The
# emulator is killed with SIGKILL, nothing flushed: whatever the guest had not written to its
# disk is gone, as at a power cut. Cuts come while online, while the broker is down (readings
# spilling to disk) and while a backlog drains. After each: boot, the service starts, the queue
# opens, readings drain. Closes with the line in the contract:
#   power-cut: N cuts, L lost beyond the window, R seq reused, queue opened K/N
# L counts readings missing inside a run, or at its end before the stated window (1 s,
# `queue.spill_ms`, plus 1 s for the guest's clock against the host's); R counts seqs seen with
# two different readings; K counts the cuts after which a new run delivered readings.
# CUTS=N sets the number of cuts (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/vm.sh
CUTS=${CUTS:-10}
INTERVAL_MS=200
export PATH="$PATH:/usr/sbin"
vm_tools
vm_rootfs

echo "==> the .deb (arm64, with the virtual feature)"
deb=$(cross/package.sh aarch64-unknown-linux-gnu --features virtual | tail -1)

work="$VM_WORK/power-cut"
root="$work/root"
mkdir -p "$work"
vm_root "$root" "$deb"
# The device reaches the host's broker at 10.0.2.100:1883 (a guestfwd rule below).
vm_device_toml "$INTERVAL_MS" | $SUDO tee "$root/etc/nightlight/device.toml" >/dev/null
# DHCP from the emulator's user network; the in-VM broker is not used here.
vm_network "$root"
vm_disk "$root" "$work"

port=$(vm_free_port)
vm_broker "$work" "$port"
rm -f "$work/cuts.txt"
start_broker() { vm_broker_start; }
stop_broker() { vm_broker_stop; }
qemu=""
cleanup() {
  [ -n "$qemu" ] && kill -9 "$qemu" 2>/dev/null || true
  stop_broker
}
trap cleanup EXIT
boot() {
  vm_qemu "$work" "$work/console-$1.log" "user,id=n,restrict=on,$(vm_guestfwd "$port")"
  "${VM_QEMU[@]}" &
  qemu=$!
}
runs_seen() { python3 -c '
import json, sys
runs = set()
for line in open(sys.argv[1], errors="replace"):
    try:
        runs.add(json.loads(line)["run"])
    except Exception:
        pass
print(len(runs))' "$work/observed.jsonl"; }
# Waits until a run not seen before has delivered a reading; false after a time-out.
wait_new_run() {
  local before=$1
  for _ in $(seq 240); do
    [ "$(runs_seen)" -gt "$before" ] && return 0
    sleep 0.5
  done
  return 1
}
# Readings the newest run has delivered so far.
newest_run_readings() { python3 -c '
import json, sys
runs = {}
for line in open(sys.argv[1], errors="replace"):
    try:
        r = json.loads(line)["run"]
    except Exception:
        continue
    runs[r] = runs.get(r, 0) + 1
print(runs[max(runs)] if runs else 0)' "$work/observed.jsonl"; }
now_ms() { date +%s%3N; }
pause() { python3 -c "import random, time; time.sleep(random.uniform($1, $2))"; }

start_broker
# Boots after a cut whose queue opened and whose new run delivered readings.
opened=0
# Boots and waits for a new run; counts it when it follows a cut. False when none came.
boot_and_wait() {
  local before
  before=$(runs_seen)
  boot "$1"
  if wait_new_run "$before"; then
    [ "$1" = 1 ] || opened=$((opened + 1))
    return 0
  fi
  echo "power-cut: boot $1: no telemetry from a new run" >&2
  tail -30 "$work/console-$1.log" | tr -d '\r' >&2 || true
  kill -9 "$qemu"; wait "$qemu" 2>/dev/null || true; qemu=""
  return 1
}
for i in $(seq "$CUTS"); do
  boot_and_wait "$i" || continue
  case $((i % 3)) in
    1) what="online"; pause 1 3; at=$(now_ms); kill -9 "$qemu" ;;
    2) what="broker down"; stop_broker; pause 2 4; at=$(now_ms); kill -9 "$qemu"; start_broker ;;
    0) what="draining"; stop_broker; pause 4 6; start_broker; pause 0.2 1.2; at=$(now_ms); kill -9 "$qemu" ;;
  esac
  wait "$qemu" 2>/dev/null || true
  qemu=""
  echo "$at" >>"$work/cuts.txt"
  echo "power-cut: cut $i ($what)"
done
# A last boot, after the last cut, drains what it left: oldest first, so once its own readings
# arrive (ten of them), what the cuts left has arrived before them.
if boot_and_wait final; then
  for _ in $(seq 240); do [ "$(newest_run_readings)" -ge 10 ] && break; sleep 0.5; done
  kill -9 "$qemu"; wait "$qemu" 2>/dev/null || true; qemu=""
fi
stop_broker

python3 - "$work/observed.jsonl" "$work/cuts.txt" "$CUTS" "$opened" "$INTERVAL_MS" <<'EOF'
import json, sys
observed, cuts_file, n, opened, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
WINDOW_MS = 1000 + 1000  # queue.spill_ms, and the guest's clock against the host's
by_seq, runs = {}, {}
for line in open(observed, errors="replace"):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    key = (m["run"], m["ts"], m["light"])
    by_seq.setdefault(m["seq"], set()).add(key)
    runs.setdefault(m["run"], {})[m["seq"]] = m["ts"]
reused = sum(1 for v in by_seq.values() if len(v) > 1)
cuts = [int(x) for x in open(cuts_file).read().split()]
lost = 0
ordered = sorted(runs)
for i, run in enumerate(ordered):
    seqs = sorted(runs[run])
    inside = seqs[-1] - seqs[0] + 1 - len(seqs)
    tail = 0
    if i < len(cuts):
        # Readings taken after the last one delivered and before the window: lost too.
        last_ts = runs[run][seqs[-1]]
        tail = max(0, (cuts[i] - WINDOW_MS - last_ts) // interval)
    if inside or tail:
        print(f"power-cut: run {run}: {inside} missing inside, {tail} at the end before the window", file=sys.stderr)
    lost += inside + tail
print(f"power-cut: {len(cuts)} cuts, {lost} lost beyond the window, {reused} seq reused, queue opened {opened}/{n}")
sys.exit(0 if lost == 0 and reused == 0 and opened == n and len(cuts) == n else 1)
EOF
