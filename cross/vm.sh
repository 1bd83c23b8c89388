# shellcheck shell=bash
# cross/vm.sh: sourced by the tests that boot the real .deb in an emulated arm64 Debian
# (cross/boot-test.sh, cross/power-cut-test.sh, cross/deploy-test.sh, cross/hardware-test.sh). One
# place for the tools, the cached rootfs and hardware kit (shared by every VM test and every clone
# on the machine, under ~/.cache/nightlight, named by a hash of what goes into them), the disk
# image and the broker on the host that a guest reaches through the emulator's user network.
#
#   vm_tools                 install qemu, mmdebstrap and friends when missing; binfmt for arm64
#   vm_rootfs                build or reuse the cached rootfs tarball of $VM_SUITE (bookworm, the
#                            default, or trixie: Raspberry Pi OS's base today); sets $VM_BASE
#   vm_kit                   build or reuse the emulated Pi's hardware (gpio-sim.ko built from
#                            Debian's kernel source for the image's kernel, the i2c-sim CUSE
#                            server); sets $VM_KIT, a folder holding both
#   vm_root DIR [DEB]        unpack the rootfs into DIR (sshd off, /etc/hosts), create the groups
#                            in $VM_GROUPS, install DEB
#   vm_network DIR           DHCP from the emulator's user network; the guest's own broker off
#   vm_disk DIR OUT          make OUT/disk.img from DIR, and OUT/vmlinuz, OUT/initrd.img
#   vm_qemu OUT LOG NETDEV   sets VM_QEMU, the qemu-system-aarch64 command line for that disk
#   vm_device_toml MS        a device.toml for the guest: id "vm", virtual sensor and LED read
#                            every MS ms, the host's broker at 10.0.2.100:1883 (vm_guestfwd)
#   vm_free_port             a free TCP port on 127.0.0.1
#   vm_guestfwd PORT         the netdev rule that makes the guest's 10.0.2.100:1883 the host's
#                            127.0.0.1:PORT, one relay per connection
#   vm_broker DIR PORT       write DIR/mosquitto.conf: a persistent broker on 127.0.0.1:PORT
#   vm_broker_start / _stop  start it with a persistent QoS 1 observer of $VM_TOPIC appending
#                            to DIR/observed.jsonl; stop both

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
VM_WORK="$(scripts/target-dir.sh)/boot-test"
VM_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/nightlight/vm"
VM_SUITE=${VM_SUITE:-bookworm}
VM_PACKAGES=systemd-sysv,udev,linux-image-arm64,mosquitto,mosquitto-clients,kmod,openssh-server,sudo
# gpiod (gpioinfo, gpioset), libfuse3-3 and i2c-tools are for the hardware test's emulated Pi,
# which runs on bookworm.
[ "$VM_SUITE" = bookworm ] && VM_PACKAGES+=,gpiod,libfuse3-3,i2c-tools

vm_tools() {
  local need=()
  command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
  command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
  command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
  command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto mosquitto-clients)
  command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
  command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
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
  mkdir -p "$VM_WORK" "$VM_CACHE"
  local key
  key=$(cat cross/boot-test/virtio-modules.hook <(echo "$VM_SUITE $VM_PACKAGES") | sha256sum | cut -c1-12)
  VM_BASE="$VM_CACHE/rootfs-$VM_SUITE-$key.tar"
  if [ ! -s "$VM_BASE" ]; then
    echo "==> building the arm64 $VM_SUITE rootfs (cached as $VM_BASE)"
    $SUDO mmdebstrap --arch=arm64 --variant=apt --include="$VM_PACKAGES" \
      --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"' \
      --setup-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/boot-test"' \
      --setup-hook="upload cross/boot-test/virtio-modules.hook /etc/initramfs-tools/hooks/virtio-modules" \
      --setup-hook='chmod 755 "$1/etc/initramfs-tools/hooks/virtio-modules"' \
      "$VM_SUITE" "$VM_CACHE/rootfs-build.$$.tar"
    mv "$VM_CACHE/rootfs-build.$$.tar" "$VM_BASE"
  fi
}

# The emulated Pi's hardware, built once per rootfs and kit source: the kernel's own gpio-sim
# (Debian's arm64 kernels do not enable it) compiled from Debian's linux-source package against
# the image's kernel headers, and the i2c-sim CUSE server. Built in a chroot of the rootfs under
# qemu-user, so the module matches the image's kernel exactly.
vm_kit() {
  local key build kver
  key=$( (basename "$VM_BASE"; cat cross/hardware-test/kit/*) | sha256sum | cut -c1-12)
  VM_KIT="$VM_CACHE/kit-$key"
  [ -s "$VM_KIT/gpio-sim.ko" ] && [ -x "$VM_KIT/i2c-sim" ] && return 0
  echo "==> building the emulated Pi's hardware kit (cached as $VM_KIT)"
  build="$VM_CACHE/kit-build.$$"
  $SUDO rm -rf "$build"
  mkdir -p "$build/root"
  $SUDO tar -xf "$VM_BASE" -C "$build/root"
  kver=$(basename "$(ls -d "$build/root"/lib/modules/*/ | head -1)")
  # gpio-sim.c and the private gpiolib.h beside it, from Debian's kernel source package.
  local src="linux-source-${kver%%.*}.$(echo "$kver" | cut -d. -f2)"
  (cd "$build" && { apt-get download -q "$src" || { $SUDO apt-get update -q && apt-get download -q "$src"; }; } >&2)
  dpkg-deb --fsys-tarfile "$build"/linux-source-*.deb | tar -x -C "$build" --wildcards './usr/src/linux-source-*.tar.xz'
  mkdir -p "$build/src"
  tar -xJf "$build"/usr/src/linux-source-*.tar.xz -C "$build/src" --strip-components=1 --wildcards     '*/drivers/gpio/gpio-sim.c' '*/drivers/gpio/gpiolib.h' '*/kernel/irq/irq_sim.c'
  $SUDO mkdir -p "$build/root/kit"
  $SUDO cp "$build/src/drivers/gpio/gpio-sim.c" "$build/src/drivers/gpio/gpiolib.h" \
    "$build/src/kernel/irq/irq_sim.c" cross/hardware-test/kit/* "$build/root/kit/"
  $SUDO cp /etc/resolv.conf "$build/root/etc/resolv.conf"
  $SUDO chroot "$build/root" /bin/sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-headers-$kver gcc make libc6-dev libfuse3-dev pkgconf" >&2 \
    || { echo "vm_kit: cannot install the kernel headers and compiler in $build/root" >&2; return 1; }
  $SUDO chroot "$build/root" /bin/sh -c "cd /kit && sh ./build.sh $kver" >&2 \
    || { echo "vm_kit: the build failed; the chroot is kept in $build/root" >&2; return 1; }
  rm -rf "$VM_KIT.tmp"
  mkdir -p "$VM_KIT.tmp"
  cp "$build/root/kit/gpio-sim.ko" "$build/root/kit/i2c-sim" "$VM_KIT.tmp/" || return 1
  rm -rf "$VM_KIT"
  mv "$VM_KIT.tmp" "$VM_KIT"
  $SUDO rm -rf "$build"
}

vm_root() {
  local root=$1 deb=${2:-}
  $SUDO rm -rf "$root"
  mkdir -p "$root"
  $SUDO tar -xf "$VM_BASE" -C "$root"
  # VM_GROUPS: system groups to create before the package is installed (as Raspberry Pi OS has).
  local g
  for g in ${VM_GROUPS:-}; do $SUDO chroot "$root" groupadd -r -f "$g"; done
  # sshd is for the deploy test, which turns it back on.
  $SUDO rm -f "$root/etc/systemd/system/multi-user.target.wants/ssh.service" "$root/etc/systemd/system/sshd.service"
  if [ -n "$deb" ]; then
    $SUDO cp "$deb" "$root/tmp/nightlight.deb"
    $SUDO chroot "$root" dpkg -i /tmp/nightlight.deb
    $SUDO rm "$root/tmp/nightlight.deb"
  fi
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

vm_network() {
  local root=$1
  $SUDO mkdir -p "$root/etc/systemd/network"
  printf '[Match]\nName=e*\n[Network]\nDHCP=yes\n' | $SUDO tee "$root/etc/systemd/network/10-vm.network" >/dev/null
  $SUDO ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  $SUDO rm -f "$root/etc/systemd/system/multi-user.target.wants/mosquitto.service"
}

vm_device_toml() {
  printf '%s\n' 'id = "vm"' '[mqtt]' 'host = "10.0.2.100"' 'port = 1883' 'reconnect_min_ms = 200' \
    'reconnect_max_ms = 1000' '[sensor]' 'kind = "virtual"' "interval_ms = $1" '[led]' 'kind = "virtual"' \
    '[homeassistant]' 'enabled = false'
}

vm_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A `tcp:` target would be one chardev, connected once: after the guest's first connection
# closed (a restart, a broker outage) the next would time out. `cmd:` runs nc per connection.
vm_guestfwd() {
  echo "guestfwd=tcp:10.0.2.100:1883-cmd:nc -q 0 127.0.0.1 $1"
}

VM_BROKER_DIR="" VM_BROKER_PORT="" VM_TOPIC=vm/telemetry
vm_broker_pid="" vm_observer_pid=""
vm_broker() {
  VM_BROKER_DIR=$1 VM_BROKER_PORT=$2
  mkdir -p "$VM_BROKER_DIR/mq"
  rm -f "$VM_BROKER_DIR/mq/"*.db "$VM_BROKER_DIR/observed.jsonl"
  touch "$VM_BROKER_DIR/observed.jsonl"
  { [ "$(id -u)" -eq 0 ] && echo "user root"; true; } >"$VM_BROKER_DIR/mosquitto.conf"
  printf '%s\n' "listener $VM_BROKER_PORT 127.0.0.1" "allow_anonymous true" "persistence true" \
    "persistence_location $VM_BROKER_DIR/mq/" "max_queued_messages 0" "set_tcp_nodelay true" \
    >>"$VM_BROKER_DIR/mosquitto.conf"
}

vm_broker_start() {
  mosquitto -c "$VM_BROKER_DIR/mosquitto.conf" >>"$VM_BROKER_DIR/mosquitto.log" 2>&1 &
  vm_broker_pid=$!
  for _ in $(seq 50); do mosquitto_sub -p "$VM_BROKER_PORT" -t x -C 1 -W 1 -E >/dev/null 2>&1 && break; sleep 0.1; done
  # The observer's persistent session: what arrives while it is away is kept for it.
  mosquitto_sub -p "$VM_BROKER_PORT" -c -i vm-observer -q 1 -t "$VM_TOPIC" >>"$VM_BROKER_DIR/observed.jsonl" 2>/dev/null &
  vm_observer_pid=$!
}

vm_broker_stop() {
  # The broker first: it saves the observer's session with whatever it has not acknowledged.
  kill "$vm_broker_pid" 2>/dev/null || true
  wait "$vm_broker_pid" 2>/dev/null || true
  # Then the observer, which is only reconnecting by now: a moment for it to write (it flushes
  # each line) the last messages it took. SIGKILL, because mosquitto_sub 2.0.11 can deadlock in
  # its SIGTERM handler when the signal lands while it handles a message (the handler takes a
  # lock the interrupted code holds): seen once, it hung the power-cut test, and the message it
  # was handling, already acknowledged, was never written, which the test counted as lost.
  sleep 0.5
  kill -9 "$vm_observer_pid" 2>/dev/null || true
  wait "$vm_observer_pid" 2>/dev/null || true
}
