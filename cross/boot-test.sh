#!/usr/bin/env bash
# cross/boot-test.sh: proves "starts on boot" on an emulated arm64 Debian (qemu-system-aarch64,
# software emulation): Debian 12 (bookworm) by default, Debian 13 with VM_SUITE=trixie (what
# Raspberry Pi OS is based on today). Builds (or reuses a cached tarball of) a rootfs with systemd and
# mosquitto, installs the real .deb (built with the `virtual` feature added, since the emulated
# board has no Pi hardware), boots it, and reads the checker's verdict from the serial console.
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/vm.sh
vm_tools
vm_rootfs

echo "==> the .deb (arm64, with the virtual feature)"
deb=$(cross/package.sh aarch64-unknown-linux-gnu --features virtual | tail -1)

echo "==> installing it into a copy of the rootfs"
work="$VM_WORK/boot-$VM_SUITE"
mkdir -p "$work"
root="$work/root"
vm_root "$root" "$deb"
$SUDO cp cross/boot-test/device.toml "$root/etc/nightlight/device.toml"
$SUDO install -m 755 cross/boot-test/nightlight-check "$root/usr/local/bin/nightlight-check"
$SUDO cp cross/boot-test/nightlight-check.service "$root/etc/systemd/system/"
$SUDO ln -sf /etc/systemd/system/nightlight-check.service "$root/etc/systemd/system/multi-user.target.wants/"
[ -L "$root/etc/systemd/system/multi-user.target.wants/nightlight.service" ] \
  || { echo "boot-test: the package did not enable nightlight.service" >&2; exit 1; }
vm_disk "$root" "$work"

echo "==> booting (software emulation; the verdict comes from the serial console)"
log="$work/console.log"
rm -f "$log"
vm_qemu "$work" "$log" "user,id=n,restrict=on"
timeout 600 "${VM_QEMU[@]}" || true

checks=(started_at_boot ready_via_sd_notify publishes_telemetry status_says_delivering obeys_a_command watchdog_fed restarted_after_kill queue_kept_across_restart keeps_trying_after_failed_starts metrics_served metrics_textfile)
grep -a "NIGHTLIGHT-BOOT-TEST" "$log" | tr -d '\r' || true
failed=0
for c in "${checks[@]}"; do
  grep -aq "NIGHTLIGHT-BOOT-TEST: $c PASS" "$log" || { echo "boot-test: $c did not pass" >&2; failed=1; }
done
grep -aq "NIGHTLIGHT-BOOT-TEST: DONE" "$log" || { echo "boot-test: the checker never finished" >&2; failed=1; }
if [ "$failed" -ne 0 ]; then
  echo "---- diagnostics from the VM ----" >&2
  grep -a "NIGHTLIGHT-BOOT-DIAG" "$log" | tr -d '\r' >&2 || tail -60 "$log" | tr -d '\r' >&2
  exit 1
fi
echo "boot-test: all ${#checks[@]} checks passed on the emulated arm64 board ($VM_SUITE)"
