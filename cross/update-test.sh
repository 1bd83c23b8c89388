#!/usr/bin/env bash
# cross/update-test.sh: updates over MQTT in the emulated Pi, end to end. The boot test's arm64
# Debian (its cached image) runs the real .deb (with the `virtual` feature: the emulated board has
# no Pi hardware) trusting two release keys; outside the VM, the broker (with a persistent QoS 1
# observer of the telemetry, as in the power-cut test) and a file server of the test's own
# (cross/update-test/server.py: `Range`, cuts and a rate on demand, a log of every request),
# reached through the emulator's user network. Releases are signed here with `nightlight
# release` and published on vm/update. Scenarios, on as few boots as they allow:
#   1. refused, each with its reason and nothing installed: a bad signature, an untrusted key, a
#      wrong hash, a truncated file, another architecture, an older version;
#   2. a good update through 10 connection drops (the server cuts them): done, the new version
#      delivering, device.toml and the queue kept;
#   3. a build that starts but never delivers: rolled back by the Pi itself, the old version
#      delivering;
#   4. 5 power cuts during a download: each boot resumes it, re-fetching at most 64 KiB;
#   5. 5 power cuts during that update's install (in dpkg's work) and health gate: each boot
#      finishes or undoes it, and it ends done, delivering;
#   6. no reading lost inside a run and no seq reused across all of it (the observer's log).
# The installer's gate waits 30 s here (a drop-in), not the package's 60 s, to keep it short.
# Closes with the line in the contract:
#   update-test: N scenarios passed, F failed; K power cuts; max re-fetch B bytes
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/vm.sh
export PATH="$PATH:/usr/sbin"
target=aarch64-unknown-linux-gnu
vm_tools
vm_rootfs
work="$VM_WORK/update"
www="$work/www"
rm -rf "$www" "$work/keys" && mkdir -p "$www" "$work/keys"

echo "==> the .debs: as built, two newer releases, and a newer one that starts but never delivers"
cp "$(cross/package.sh "$target" --features virtual | tail -1)" "$www/base.deb"
base=$(dpkg-deb -f "$www/base.deb" Version)
v2="$base+update2" v3="$base+update3" v4="$base+update4"
NIGHTLIGHT_VERSION=$v2 cross/package.sh "$target" --features virtual | tail -1 | xargs -I{} cp {} "$www/v2.deb"
NIGHTLIGHT_VERSION=$v3 cross/package.sh "$target" --features virtual | tail -1 | xargs -I{} cp {} "$www/v3.deb"
# v4: v3's package, its binary behind a wrapper that points it at a port with no broker. It
# starts and says READY; it never delivers.
x="$work/v4-tree"
$SUDO rm -rf "$x"
$SUDO dpkg-deb -R "$www/v3.deb" "$x"
$SUDO sed -i "s/^Version: .*/Version: $v4/" "$x/DEBIAN/control"
$SUDO mv "$x/usr/bin/nightlight" "$x/usr/lib/nightlight/nightlight.real"
printf '#!/bin/sh\nNIGHTLIGHT__MQTT__PORT=1 exec /usr/lib/nightlight/nightlight.real "$@"\n' | $SUDO tee "$x/usr/bin/nightlight" >/dev/null
$SUDO chmod 755 "$x/usr/bin/nightlight"
if [ -f "$x/DEBIAN/md5sums" ]; then
  (cd "$x" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | sort | xargs md5sum) | $SUDO tee "$x/DEBIAN/md5sums" >/dev/null
fi
$SUDO dpkg-deb -b --root-owner-group "$x" "$www/v4.deb" >/dev/null

echo "==> release keys and signed manifests (nightlight release, on this machine)"
cargo build -q --features virtual --bin nightlight
nl="$(scripts/target-dir.sh)/debug/nightlight"
for k in one two stranger; do "$nl" release keygen "$work/keys/$k" >/dev/null; done
url=http://10.0.2.100:8000
sign() { # sign KEY NAME FILE [args]: the manifest of FILE, to be fetched from $url/NAME
  local key=$1 name=$2 file=$3
  shift 3
  "$nl" release sign --key "$work/keys/$key/release.key" --url "$url/$name" "$@" "$file"
}
sign one v2.deb "$www/v2.deb" >"$work/v2.json"
sign one v3.deb "$www/v3.deb" >"$work/v3.json"
sign two v4.deb "$www/v4.deb" >"$work/v4.json" # the second key: rotation works
python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); m["url"]+="?evil"; print(json.dumps(m))' "$work/v2.json" >"$work/bad-sig.json"
sign stranger v2.deb "$www/v2.deb" >"$work/untrusted.json"
cp "$www/v2.deb" "$work/altered.deb"
printf 'X' | dd of="$work/altered.deb" bs=1 seek=5000 conv=notrunc status=none
sign one v2.deb "$work/altered.deb" --version "$base+update9" >"$work/wrong-hash.json"
head -c 300000 "$www/v2.deb" >"$www/trunc.deb"
sign one trunc.deb "$www/v2.deb" --version "$base+update8" >"$work/truncated.json"
sign one v2.deb "$www/v2.deb" --arch armhf --version "$base+update7" >"$work/arch.json"
sign one base.deb "$www/base.deb" --version 0.0.1 >"$work/older.json"

echo "==> the guest: $base installed, trusting keys one and two"
root="$work/root"
vm_root "$root" "$www/base.deb"
{
  vm_device_toml 200
  printf '[update]\nkeys = ["%s", "%s"]\nstall_s = 10\n' "$(cat "$work/keys/one/release.pub")" "$(cat "$work/keys/two/release.pub")"
  echo "# edited on the Pi"
} | $SUDO tee "$root/etc/nightlight/device.toml" >/dev/null
$SUDO mkdir -p "$root/etc/systemd/system/nightlight-update.service.d"
printf '[Service]\nExecStart=\nExecStart=/usr/bin/nightlight update apply --config /etc/nightlight/device.toml --gate-wait-s 30\n' \
  | $SUDO tee "$root/etc/systemd/system/nightlight-update.service.d/test.conf" >/dev/null
[ -L "$root/etc/systemd/system/paths.target.wants/nightlight-update.path" ] || { echo "update-test: the package did not enable nightlight-update.path" >&2; exit 1; }
vm_network "$root"
vm_disk "$root" "$work"

port=$(vm_free_port)
http_port=$(vm_free_port)
vm_broker "$work" "$port"
: >"$work/states.log" >"$work/http.log" >"$work/cuts.txt"
echo '{}' >"$work/control.json"
qemu="" states_pid="" http_pid=""
cleanup() {
  [ -n "$qemu" ] && kill -9 "$qemu" 2>/dev/null || true
  [ -n "$states_pid" ] && kill "$states_pid" 2>/dev/null || true
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null || true
  vm_broker_stop
}
trap cleanup EXIT
vm_broker_start
mosquitto_sub -p "$port" -t vm/update/state >>"$work/states.log" 2>/dev/null &
states_pid=$!
python3 cross/update-test/server.py "$www" "$http_port" "$work/control.json" "$work/http.log" &
http_pid=$!
for _ in $(seq 50); do nc -z 127.0.0.1 "$http_port" && break; sleep 0.1; done

passed=0 failed=0 cuts=0 boots=0
ok() { echo "update-test: ok: $*"; passed=$((passed + 1)); }
bad() { echo "update-test: FAILED: $*" >&2; failed=$((failed + 1)); }
control() { echo "$1" >"$work/control.json.new" && mv "$work/control.json.new" "$work/control.json"; }
publish() { mosquitto_pub -p "$port" -q 1 -t vm/update -f "$1" ${2:+-r}; }
boot() {
  boots=$((boots + 1))
  vm_qemu "$work" "$work/console-$boots.log" \
    "user,id=n,restrict=on,$(vm_guestfwd "$port"),guestfwd=tcp:10.0.2.100:8000-cmd:nc -q 0 127.0.0.1 $http_port"
  boot_states=$(wc -l <"$work/states.log")
  "${VM_QEMU[@]}" &
  qemu=$!
}
power_cut() {
  date +%s%3N >>"$work/cuts.txt"
  kill -9 "$qemu"
  wait "$qemu" 2>/dev/null || true
  qemu=""
  cuts=$((cuts + 1))
}
# The last state published (one JSON line), and one field of it.
last_state() { tail -n 1 "$work/states.log"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null || true; }
# wait_state SECONDS STATE...: until a state published after the mark (a line count) is one of
# STATE; prints it. The mark: $mark, set by mark_states.
mark_states() { mark=$(wc -l <"$work/states.log"); }
wait_state() {
  local secs=$1 line s want
  shift
  for _ in $(seq $((secs * 4))); do
    while IFS= read -r line; do
      s=$(field "$line" state)
      for want in "$@"; do [ "$s" = "$want" ] && { echo "$line"; return 0; }; done
    done < <(tail -n +"$((mark + 1))" "$work/states.log")
    [ -n "$qemu" ] && ! kill -0 "$qemu" 2>/dev/null && { echo "update-test: the emulator exited" >&2; return 1; }
    sleep 0.25
  done
  echo "update-test: no state $* within $secs s (last: $(last_state))" >&2
  return 1
}
# Readings per run from the observer's log.
readings() {
  python3 -c '
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        m = json.loads(line)
        print(m["run"], m["seq"])
    except (ValueError, KeyError):
        pass' "$VM_BROKER_DIR/observed.jsonl"
}
last_run() { readings | cut -d' ' -f1 | sort -n | tail -1; }
# delivering_after RUN: waits until a run after RUN (any, when empty) delivers a reading.
delivering_after() {
  local r
  for _ in $(seq 480); do
    r=$(last_run)
    [ -n "$r" ] && { [ -z "$1" ] || [ "$r" -gt "$1" ]; } && return 0
    sleep 0.25
  done
  return 1
}

echo "==> booting"
mark_states
boot
wait_state 240 idle >/dev/null || { tail -30 "$work/console-1.log" >&2; exit 1; }
delivering_after "" || { echo "update-test: no telemetry" >&2; exit 1; }

echo "==> 1. refused: bad signature, untrusted key, wrong hash, truncated file, another architecture, older version"
scenario_ok=1
for case in "bad-sig:signature does not match" "untrusted:does not trust" "wrong-hash:SHA-256" \
  "truncated:truncated" "arch:the package is for armhf" "older:older than the running"; do
  name=${case%%:*} reason=${case#*:}
  mark_states
  publish "$work/$name.json"
  if line=$(wait_state 120 failed installing done); then
    got=$(field "$line" reason)
    if [ "$(field "$line" state)" = failed ] && [[ $got == *"$reason"* ]] && [ "$(field "$line" version)" = "$base" ]; then
      echo "update-test:   $name: refused: $got"
    else
      bad "$name: $line"
      scenario_ok=0
    fi
  else
    bad "$name: no answer"
    scenario_ok=0
  fi
done
[ "$scenario_ok" = 0 ] || ok "1. six bad manifests refused with their reasons, $base still running"

echo "==> 2. a good update ($v2) through 10 connection drops"
control '{"cut_after": 131072, "cuts": 10}'
runs_before=$(last_run)
mark_states
publish "$work/v2.json" retain
if line=$(wait_state 400 done rolled_back failed) && [ "$(field "$line" state)" = done ] \
  && [ "$(field "$line" version)" = "$v2" ] && delivering_after "$runs_before"; then
  drops=$(grep -c '"cut": true' "$work/http.log" || true)
  runs_after=$(last_run)
  # The queue kept: the run number goes on from where it was (a new queue would start at 1).
  if [ "$drops" -ge 10 ] && [ "$runs_after" -gt "$runs_before" ]; then
    ok "2. $v2 installed through $drops dropped connections, gated, done; delivering as run $runs_after (was $runs_before): device.toml and the queue kept"
  else
    bad "2. drops $drops, runs $runs_before -> $runs_after"
  fi
else
  bad "2. the update to $v2 did not end done and delivering: $(last_state)"
fi

echo "==> 3. a build that starts but never delivers ($v4)"
v2_run=$(last_run)
mark_states
publish "$work/v4.json" retain
if line=$(wait_state 400 rolled_back done failed) && [ "$(field "$line" state)" = rolled_back ] \
  && [[ $(field "$line" reason) == *"did not deliver"* ]]; then
  echo "update-test:   reason: $(field "$line" reason)"
  if delivering_after "$v2_run" && [ "$(field "$line" version)" = "$v2" ]; then
    ok "3. $v4 rolled back by the Pi itself; $v2 delivering again"
  else
    bad "3. after the rollback: $(last_state)"
  fi
else
  bad "3. $v4 was not rolled back: $(last_state)"
fi

echo "==> 4. 5 power cuts during the download of $v3"
control '{"rate": 98304}'
before_cuts=$(last_run)
mark_states
publish "$work/v3.json" retain
scenario_ok=1
for i in 1 2 3 4 5; do
  if ! wait_state 240 downloading >/dev/null; then
    bad "4. no download under way before cut $i"
    scenario_ok=0
    break
  fi
  python3 -c 'import random, time; time.sleep(random.uniform(1, 3))'
  power_cut
  echo "update-test:   cut $i during the download"
  mark_states
  boot
done
echo "==> 5. 5 power cuts during its install and health gate"
control '{}'
for i in 1 2 3 4 5; do
  # Odd cuts land in dpkg's work, even ones in the health gate.
  phases=(installing gating done)
  [ $((i % 2)) = 1 ] || phases=(gating done)
  if ! line=$(wait_state 300 "${phases[@]}"); then
    bad "5. no install under way before cut $i"
    scenario_ok=0
    break
  fi
  if [ "$(field "$line" state)" = done ]; then
    echo "update-test:   done before cut $i"
    break
  fi
  python3 -c 'import random, time; time.sleep(random.uniform(0.5, 5))'
  power_cut
  echo "update-test:   cut $i while $(field "$line" state)"
  mark_states
  boot
done
if line=$(wait_state 400 done rolled_back failed) && [ "$(field "$line" state)" = done ] \
  && [ "$(field "$line" version)" = "$v3" ] && delivering_after "$before_cuts"; then
  [ "$scenario_ok" = 0 ] || { ok "4. the download resumed after each power cut"; ok "5. the install finished after each power cut: $v3 done, delivering"; }
else
  bad "4/5. after the power cuts: $(last_state)"
fi

kill -9 "$qemu"
wait "$qemu" 2>/dev/null || true
qemu=""

echo "==> 6. readings across all of it, and what was fetched again"
refetch=$(python3 - "$work/http.log" <<'PY'
import json, sys
last, worst = {}, 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    p = r["path"].split("?")[0]
    if p in last and r["start"] > 0:
        worst = max(worst, last[p] - r["start"])
    last[p] = r["start"] + r["sent"]
print(worst)
PY
)
if python3 - "$VM_BROKER_DIR/observed.jsonl" <<'PY'; then
import json, sys
by_seq, runs = {}, {}
for line in open(sys.argv[1], errors="replace"):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    by_seq.setdefault(m["seq"], set()).add((m["run"], m["ts"], m["light"]))
    runs.setdefault(m["run"], set()).add(m["seq"])
reused = sum(1 for v in by_seq.values() if len(v) > 1)
missing = sum(max(s) - min(s) + 1 - len(s) for s in runs.values())
print(f"update-test:   {len(runs)} runs, {sum(len(s) for s in runs.values())} readings, {missing} missing inside a run, {reused} seq reused")
sys.exit(1 if missing or reused else 0)
PY
  ok "6. no reading lost inside a run, no seq reused"
else
  bad "6. readings lost or reused"
fi
[ "$refetch" -le 65536 ] || bad "a resumed download fetched $refetch bytes again (more than 64 KiB)"

echo "update-test: $passed scenarios passed, $failed failed; $cuts power cuts; max re-fetch $refetch bytes"
[ "$failed" -eq 0 ] && [ "$passed" -eq 6 ]
