#!/usr/bin/env bash
# cross/check.sh: proves the Pi deliverables (run by scripts/test.sh):
#  1. both .debs: architecture, files, the conffile, the maintainer scripts;
#  2. the systemd unit: `systemd-analyze verify` and an exposure score of at most 1.4 (the audit's bar);
#  3. the aarch64 build (with the virtual feature) runs under qemu-aarch64-static against a
#     local mosquitto and publishes telemetry.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export PATH="$PATH:/usr/sbin"
fail() { echo "cross/check.sh: FAIL: $*" >&2; exit 1; }
need=()
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}"
fi

# 1. The packages.
for pair in aarch64-unknown-linux-gnu:arm64 armv7-unknown-linux-gnueabihf:armhf; do
  target=${pair%%:*} arch=${pair##*:}
  deb=$(cross/package.sh "$target" | tail -1)
  [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || fail "$deb is not $arch"
  files=$(dpkg-deb -c "$deb")
  for f in ./usr/bin/nightlight ./etc/nightlight/device.toml ./usr/lib/systemd/system/nightlight.service \
    ./usr/lib/systemd/system/nightlight-update.path ./usr/lib/systemd/system/nightlight-update.service \
    ./usr/lib/nightlight/health-gate ./usr/share/doc/nightlight/hardware.md; do
    grep -q " $f\$" <<<"$files" || fail "$deb lacks $f"
  done
  ctl=$(mktemp -d)
  dpkg-deb -e "$deb" "$ctl"
  grep -qx /etc/nightlight/device.toml "$ctl/conffiles" || fail "device.toml is not a conffile"
  grep -q "adduser --system" "$ctl/postinst" || fail "postinst does not create the service user"
  grep -q "deb-systemd-helper enable nightlight.service" "$ctl/postinst" || fail "postinst does not enable the unit"
  grep -q "install -d -o nightlight" "$ctl/postinst" || fail "postinst does not create /var/lib/nightlight"
  grep -q "deb-systemd-helper enable nightlight-update.path" "$ctl/postinst" || fail "postinst does not enable the update installer's path unit"
  # The update installer runs dpkg: a restart or stop of its units from the new package's
  # scripts kills it mid-install (cargo-deb's default try-restart did).
  ! grep -q "deb-systemd-invoke.*nightlight-update" "$ctl/postinst" || fail "postinst restarts the update installer's units"
  ! grep -B3 "deb-systemd-invoke.*nightlight-update" "$ctl/prerm" | grep -q "upgrade\|deconfigure" \
    || fail "prerm stops the update installer's units on upgrade"
  echo "ok: $deb ($arch; binary, conffile, unit, user, enabled)"
done

# 2. The unit, pointed at the aarch64 binary that step 1 built (wherever cargo put it).
bin=$(cross/build.sh aarch64-unknown-linux-gnu | tail -1)
[ -x "$bin" ] || fail "cross/build.sh printed $bin, which is not an executable"
unit_dir=$(mktemp -d)
for u in nightlight.service nightlight-update.service nightlight-update.path; do
  sed "s|/usr/bin/nightlight|$bin|" "systemd/$u" >"$unit_dir/$u"
done
systemd-analyze verify "$unit_dir/nightlight.service" "$unit_dir/nightlight-update.service" \
  "$unit_dir/nightlight-update.path" || fail "systemd-analyze verify"
score=$(systemd-analyze security --offline=true systemd/nightlight.service 2>/dev/null \
  | sed -n 's/.*Overall exposure level for nightlight.service: \([0-9.]*\).*/\1/p')
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.4) }' || fail "exposure $score > 1.4"
echo "ok: unit verifies, exposure $score"

# 3. The aarch64 binary, emulated, against a local broker.
bin=$(cross/build.sh aarch64-unknown-linux-gnu --features virtual | tail -1)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$work/m.conf"
mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
broker=$!
trap 'kill $broker $dev 2>/dev/null || true' EXIT
sleep 0.5
NIGHTLIGHT_CONFIG=/dev/null NIGHTLIGHT__ID=qemu NIGHTLIGHT__MQTT__HOST=127.0.0.1 NIGHTLIGHT__MQTT__PORT=$port \
  NIGHTLIGHT__SENSOR__KIND=virtual NIGHTLIGHT__LED__KIND=virtual NIGHTLIGHT__SENSOR__INTERVAL_MS=200 \
  NIGHTLIGHT__QUEUE__DIR="$work/q" qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" run 2>"$work/dev.log" &
dev=$!
msg=$(mosquitto_sub -p "$port" -t qemu/telemetry -C 3 -W 30) || { cat "$work/dev.log" >&2; fail "no telemetry from the emulated aarch64 build"; }
seqs=$(sed -n 's/.*"seq":\([0-9]*\),"run":\([0-9]*\).*/\2 \1/p' <<<"$msg")
# Three readings of one run, seq rising by one.
awk 'NR == 1 { r = $1; s = $2 } END { exit !(NR == 3 && $1 == r && $2 == s + 2) }' <<<"$seqs" \
  || fail "unexpected telemetry: $msg"
echo "ok: aarch64 build under qemu published: $(tail -1 <<<"$msg")"
# Leave the release binary as the hardware build for whoever packages next.
cross/build.sh aarch64-unknown-linux-gnu >/dev/null
