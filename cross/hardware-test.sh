#!/usr/bin/env bash
# cross/hardware-test.sh: the firmware a user installs, run for real. Boots the .deb built with
# default features (the hardware build: no `virtual`) in the emulated arm64 Debian, with emulated
# Pi hardware behind the kernel's own interfaces: the kernel's gpio-sim chips behind the GPIO
# character device, laid out as on three boards (a Pi 4; a Pi 5 with pinctrl-rp1 at gpiochip0;
# a Pi 5 with only gpiochip11-15), and /dev/i2c-1 served by i2c-sim (CUSE) with a Grove Base Hat,
# an ADS1115 and a BH1750 modelled from their datasheets. The checks run inside the VM
# (cross/hardware-test/check); one boot serves all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/vm.sh
vm_tools
vm_rootfs
vm_kit

echo "==> the .deb (arm64, default features: the hardware build)"
deb=$(cross/package.sh aarch64-unknown-linux-gnu | tail -1)

work="$VM_WORK/hardware"
root="$work/root"
mkdir -p "$work"
# Raspberry Pi OS has the i2c and gpio groups; the package adds the service user to them.
VM_GROUPS="i2c gpio" vm_root "$root" "$deb"
id_groups=$($SUDO chroot "$root" id -nG nightlight)
grep -qw i2c <<<"$id_groups" && grep -qw gpio <<<"$id_groups" \
  || { echo "hardware-test: the package did not add nightlight to the i2c and gpio groups ($id_groups)" >&2; exit 1; }
$SUDO install -d "$root/usr/local/lib/nightlight-hw"
$SUDO install -m 644 "$VM_KIT/gpio-sim.ko" "$root/usr/local/lib/nightlight-hw/"
$SUDO install -m 755 "$VM_KIT/i2c-sim" "$root/usr/local/sbin/i2c-sim"
$SUDO install -m 755 cross/hardware-test/check "$root/usr/local/bin/nightlight-hardware-check"
$SUDO cp cross/hardware-test/nightlight-hardware-check.service "$root/etc/systemd/system/"
$SUDO ln -sf /etc/systemd/system/nightlight-hardware-check.service "$root/etc/systemd/system/multi-user.target.wants/"
# The emulated /dev/i2c-1 is a CUSE device, whose major is not i2c's: the one line the shipped
# unit's device policy needs here. Everything else is the unit as installed.
$SUDO mkdir -p "$root/etc/systemd/system/nightlight.service.d"
printf '[Service]\nDeviceAllow=/dev/i2c-1 rw\n' | $SUDO tee "$root/etc/systemd/system/nightlight.service.d/emulated-i2c.conf" >/dev/null
# The checker starts the nightlight once the emulated hardware is there (at boot it is not yet;
# cross/boot-test.sh proves the start on boot).
$SUDO rm -f "$root/etc/systemd/system/multi-user.target.wants/nightlight.service"
vm_disk "$root" "$work"

echo "==> booting the emulated Pi (software emulation; the checks report on the serial console)"
log="$work/console.log"
rm -f "$log"
vm_qemu "$work" "$log" "user,id=n,restrict=on"
timeout 1500 "${VM_QEMU[@]}" || true

grep -a "HARDWARE-TEST" "$log" | tr -d '\r' || true
# The markers, wherever they sit on a console line (a login prompt can share one), one per line:
# "HARDWARE-TEST: <layout> <check> PASS|FAIL", "HARDWARE-TEST: setup FAIL: ...", "HARDWARE-TEST: DONE".
markers=$(grep -ao "HARDWARE-TEST: [^ ]*\( [^ ]* \(PASS\|FAIL\)\| FAIL:\)\?" "$log" | tr -d '\r' || true)
passed=$(grep -c " PASS$" <<<"$markers" || true)
failed=$(grep -c " FAIL:\?$" <<<"$markers" || true)
layouts=$(grep "^HARDWARE-TEST: pi[^ ]* [^ ]* \(PASS\|FAIL\)$" <<<"$markers" | awk '{ print $2 }' | sort -u | wc -l)
done_=$(grep -c "^HARDWARE-TEST: DONE$" <<<"$markers" || true)
if [ "$failed" -ne 0 ] || [ "$done_" -eq 0 ] || [ "$layouts" -ne 3 ]; then
  echo "---- diagnostics from the VM ----" >&2
  grep -a "HARDWARE-DIAG" "$log" | tr -d '\r' >&2 || true
  [ "$done_" -ne 0 ] || { echo "hardware-test: the checker never finished" >&2; tail -40 "$log" | tr -d '\r' >&2; }
fi
[ "$done_" -ne 0 ] || failed=$((failed + 1))
echo "hardware-test: $layouts layouts, $passed checks passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$layouts" -eq 3 ]
