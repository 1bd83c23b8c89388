#!/usr/bin/env bash
# cross/boot-test.sh: proves "starts on boot" on an emulated arm64 Debian (qemu-system-aarch64,
# software emulation). Builds (or reuses a cached tarball of) a bookworm rootfs with systemd and
# mosquitto, installs the real .deb (built with the `virtual` feature added, since the emulated
# board has no Pi hardware), boots it, and reads the checker's verdict from the serial console.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}"
fi
# The arm64 maintainer scripts run through qemu-user: binfmt_misc must be mounted and enabled.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
$SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "boot-test: cannot enable binfmt for qemu-aarch64" >&2; exit 1; }

# The rootfs cache lives in cargo's target directory, shared with the other VM tests.
work="$(scripts/target-dir.sh)/boot-test"
mkdir -p "$work"
packages=systemd-sysv,udev,linux-image-arm64,mosquitto,mosquitto-clients,kmod
key=$(cat cross/boot-test/virtio-modules.hook <(echo "$packages") | sha256sum | cut -c1-12)
base="$work/rootfs-$key.tar"
if [ ! -s "$base" ]; then
  echo "==> building the arm64 rootfs (cached as $base)"
  rm -f "$work"/rootfs-*.tar
  $SUDO mmdebstrap --arch=arm64 --variant=apt --include="$packages" \
    --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"' \
    --setup-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/boot-test"' \
    --setup-hook="upload cross/boot-test/virtio-modules.hook /etc/initramfs-tools/hooks/virtio-modules" \
    --setup-hook='chmod 755 "$1/etc/initramfs-tools/hooks/virtio-modules"' \
    bookworm "$work/rootfs-build.tar"
  mv "$work/rootfs-build.tar" "$base"
fi

echo "==> the .deb (arm64, with the virtual feature)"
deb=$(cross/package.sh aarch64-unknown-linux-gnu --features virtual | tail -1)

echo "==> installing it into a copy of the rootfs"
root="$work/root"
$SUDO rm -rf "$root"
mkdir -p "$root"
$SUDO tar -xf "$base" -C "$root"
$SUDO cp "$deb" "$root/tmp/nightlight.deb"
$SUDO chroot "$root" dpkg -i /tmp/nightlight.deb
$SUDO rm "$root/tmp/nightlight.deb"
$SUDO cp cross/boot-test/device.toml "$root/etc/nightlight/device.toml"
# mmdebstrap leaves no /etc/hosts, so "localhost" would not resolve; every real image has one.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm\n' | $SUDO tee "$root/etc/hosts" >/dev/null
echo vm | $SUDO tee "$root/etc/hostname" >/dev/null
$SUDO install -m 755 cross/boot-test/nightlight-check "$root/usr/local/bin/nightlight-check"
$SUDO cp cross/boot-test/nightlight-check.service "$root/etc/systemd/system/"
$SUDO ln -sf /etc/systemd/system/nightlight-check.service "$root/etc/systemd/system/multi-user.target.wants/"
[ -L "$root/etc/systemd/system/multi-user.target.wants/nightlight.service" ] \
  || { echo "boot-test: the package did not enable nightlight.service" >&2; exit 1; }
kernel=$(ls "$root"/boot/vmlinuz-* | head -1)
initrd=$(ls "$root"/boot/initrd.img-* | head -1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
rm -f "$work/disk.img"
truncate -s 2G "$work/disk.img"
$SUDO mkfs.ext4 -q -F -d "$root" "$work/disk.img"

echo "==> booting (software emulation; the verdict comes from the serial console)"
log="$work/console.log"
rm -f "$log"
timeout 600 qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on -smp 2 -m 1024 \
  -display none -monitor none -serial "file:$log" -no-reboot \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "root=/dev/vda rw console=ttyAMA0 systemd.show_status=false" \
  -drive if=none,file="$work/disk.img",format=raw,id=hd -device virtio-blk-device,drive=hd \
  -netdev user,id=n,restrict=on -device virtio-net-device,netdev=n || true

checks=(started_at_boot ready_via_sd_notify publishes_telemetry obeys_a_command watchdog_fed restarted_after_kill queue_kept_across_restart)
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
echo "boot-test: all ${#checks[@]} checks passed on the emulated arm64 board"
