# cross/vm.sh: sourced by the tests that boot the real .deb in an emulated arm64 Debian
# (cross/boot-test.sh, cross/power-cut-test.sh). One place for the tools, the cached rootfs
# (shared by every VM test, in cargo's target directory) and the disk image.
#
#   vm_tools                 install qemu, mmdebstrap and friends when missing; binfmt for arm64
#   vm_rootfs                build or reuse the cached bookworm rootfs tarball; sets $VM_BASE
#   vm_root DIR DEB          unpack the rootfs into DIR and install DEB (and /etc/hosts)
#   vm_disk DIR OUT          make OUT/disk.img from DIR, and OUT/vmlinuz, OUT/initrd.img
#   vm_qemu OUT LOG NETDEV   sets VM_QEMU, the qemu-system-aarch64 command line for that disk

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
VM_WORK="$(scripts/target-dir.sh)/boot-test"
VM_PACKAGES=systemd-sysv,udev,linux-image-arm64,mosquitto,mosquitto-clients,kmod

vm_tools() {
  local need=()
  command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
  command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
  command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
  command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto mosquitto-clients)
  if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}"
  fi
  # The arm64 maintainer scripts run through qemu-user: binfmt_misc must be mounted and enabled.
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  $SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "vm: cannot enable binfmt for qemu-aarch64" >&2; return 1; }
}

vm_rootfs() {
  mkdir -p "$VM_WORK"
  local key
  key=$(cat cross/boot-test/virtio-modules.hook <(echo "$VM_PACKAGES") | sha256sum | cut -c1-12)
  VM_BASE="$VM_WORK/rootfs-$key.tar"
  if [ ! -s "$VM_BASE" ]; then
    echo "==> building the arm64 rootfs (cached as $VM_BASE)"
    rm -f "$VM_WORK"/rootfs-*.tar
    $SUDO mmdebstrap --arch=arm64 --variant=apt --include="$VM_PACKAGES" \
      --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"' \
      --setup-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/boot-test"' \
      --setup-hook="upload cross/boot-test/virtio-modules.hook /etc/initramfs-tools/hooks/virtio-modules" \
      --setup-hook='chmod 755 "$1/etc/initramfs-tools/hooks/virtio-modules"' \
      bookworm "$VM_WORK/rootfs-build.tar"
    mv "$VM_WORK/rootfs-build.tar" "$VM_BASE"
  fi
}

vm_root() {
  local root=$1 deb=$2
  $SUDO rm -rf "$root"
  mkdir -p "$root"
  $SUDO tar -xf "$VM_BASE" -C "$root"
  $SUDO cp "$deb" "$root/tmp/nightlight.deb"
  $SUDO chroot "$root" dpkg -i /tmp/nightlight.deb
  $SUDO rm "$root/tmp/nightlight.deb"
  # mmdebstrap leaves no /etc/hosts, so "localhost" would not resolve; every real image has one.
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm\n' | $SUDO tee "$root/etc/hosts" >/dev/null
  echo vm | $SUDO tee "$root/etc/hostname" >/dev/null
}

vm_disk() {
  local root=$1 out=$2
  cp "$(ls "$root"/boot/vmlinuz-* | head -1)" "$out/vmlinuz"
  cp "$(ls "$root"/boot/initrd.img-* | head -1)" "$out/initrd.img"
  rm -f "$out/disk.img"
  truncate -s 2G "$out/disk.img"
  $SUDO mkfs.ext4 -q -F -d "$root" "$out/disk.img"
}

vm_qemu() {
  local out=$1 log=$2 netdev=$3
  VM_QEMU=(qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on -smp 2 -m 1024
    -display none -monitor none -serial "file:$log" -no-reboot
    -kernel "$out/vmlinuz" -initrd "$out/initrd.img"
    -append "root=/dev/vda rw console=ttyAMA0 systemd.show_status=false"
    -drive "if=none,file=$out/disk.img,format=raw,id=hd" -device virtio-blk-device,drive=hd
    -netdev "$netdev" -device virtio-net-device,netdev=n)
}
