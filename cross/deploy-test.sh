#!/usr/bin/env bash
# cross/deploy-test.sh: cross/deploy.sh against an emulated Pi, end to end. The boot test's arm64
# Debian (its cached image) with sshd and a user `pi` with passwordless sudo, as Raspberry Pi OS
# sets it up, whose key the test makes; the emulator's user network forwards a loopback port to
# the guest's port 22 and the guest's 10.0.2.100:1883 to a broker on the host, which a
# persistent QoS 1 observer watches. The steps, each through cross/deploy.sh:
#   1. a first install (with --config): the service runs, telemetry reaches the host's broker;
#   2. /etc/nightlight/device.toml edited on the guest; the broker stopped so readings queue;
#      an upgrade to a newer version (the test bumps it, and gives it a new default conffile):
#      the edit is kept, the new version runs, every queued reading arrives once the broker is
#      back;
#   3. an upgrade to a build that cannot start: deploy.sh rolls back to the working version by
#      itself and exits 1; telemetry flows again;
#   4. purge removes what install created.
# Before that, the errors a Pi owner meets first: an unreachable host and a user without sudo.
# Closes with the line in the contract:
#   deploy-test: installed, upgraded (config kept, queue kept), failed upgrade rolled back
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/vm.sh
export PATH="$PATH:/usr/sbin"
target=aarch64-unknown-linux-gnu
vm_tools
vm_rootfs

fail() {
  echo "deploy-test: $*" >&2
  if [ -n "${qemu:-}" ] && kill -0 "$qemu" 2>/dev/null; then
    echo "---- the guest's view ----" >&2
    on_pi 'sudo systemctl status --no-pager nightlight; sudo journalctl -u nightlight --no-pager -n 30' >&2 || true
  fi
  exit 1
}

echo "==> a HOST that is an ssh option is refused, and runs nothing"
canary=$(mktemp -u)
set +e
cross/deploy.sh "$target" "-oProxyCommand=touch $canary" >/dev/null 2>&1
status=$?
set -e
[ "$status" -eq 2 ] && [ ! -e "$canary" ] || fail "a HOST starting with '-' was taken as an ssh option (exit $status)"

echo "==> the .debs: as built, a newer version, and a newer one that cannot start"
deb=$(cross/package.sh "$target" --features virtual | tail -1)
work="$VM_WORK/deploy"
$SUDO rm -rf "$work/debs"
mkdir -p "$work/debs"
base_version=$(dpkg-deb -f "$deb" Version)
new_version="$base_version+deploytest2"
broken_version="$base_version+deploytest3"
# repack OUT VERSION [broken]: the built .deb with another version and a new default conffile
# (what a real upgrade brings, and what makes dpkg ask about an edited one); "broken" replaces
# the binary with one that exits 1 at once.
repack() {
  local out=$1 version=$2 x="$work/debs/tree"
  $SUDO rm -rf "$x"
  $SUDO dpkg-deb -R "$deb" "$x"
  $SUDO sed -i "s/^Version: .*/Version: $version/" "$x/DEBIAN/control"
  echo "# the default of $version" | $SUDO tee -a "$x/etc/nightlight/device.toml" >/dev/null
  if [ "${3:-}" = broken ]; then
    printf '#!/bin/sh\necho "nightlight: a build that cannot start" >&2\nexit 1\n' | $SUDO tee "$x/usr/bin/nightlight" >/dev/null
  fi
  if [ -f "$x/DEBIAN/md5sums" ]; then
    (cd "$x" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | sort | xargs md5sum) | $SUDO tee "$x/DEBIAN/md5sums" >/dev/null
  fi
  $SUDO dpkg-deb -b --root-owner-group "$x" "$out" >/dev/null
}
repack "$work/debs/new.deb" "$new_version"
repack "$work/debs/broken.deb" "$broken_version" broken

echo "==> the guest: sshd, a sudo user pi and a user without sudo, both with the test's key"
root="$work/root"
vm_root "$root"
vm_network "$root"
$SUDO ln -sf /lib/systemd/system/ssh.service "$root/etc/systemd/system/multi-user.target.wants/ssh.service"
rm -f "$work/key" "$work/key.pub"
ssh-keygen -q -t ed25519 -N '' -C deploy-test -f "$work/key"
for user in pi nosudo; do
  $SUDO chroot "$root" useradd -m -s /bin/bash "$user"
  $SUDO install -d -m 700 "$root/home/$user/.ssh"
  $SUDO install -m 600 "$work/key.pub" "$root/home/$user/.ssh/authorized_keys"
  $SUDO chroot "$root" chown -R "$user:$user" "/home/$user/.ssh"
done
$SUDO chroot "$root" usermod -aG sudo pi
# What Raspberry Pi OS's first-boot set-up writes for its first user.
echo 'pi ALL=(ALL) NOPASSWD: ALL' | $SUDO tee "$root/etc/sudoers.d/010_pi-nopasswd" >/dev/null
$SUDO chmod 440 "$root/etc/sudoers.d/010_pi-nopasswd"
vm_disk "$root" "$work"

# The configuration the first deploy installs: the host's broker, through the guestfwd rule.
vm_device_toml 200 >"$work/device.toml"

port=$(vm_free_port)
ssh_port=$(vm_free_port)
vm_broker "$work" "$port"
qemu=""
cleanup() {
  [ -n "$qemu" ] && kill -9 "$qemu" 2>/dev/null || true
  vm_broker_stop
}
trap cleanup EXIT
vm_broker_start
vm_qemu "$work" "$work/console.log" \
  "user,id=n,restrict=on,hostfwd=tcp:127.0.0.1:$ssh_port-:22,$(vm_guestfwd "$port")"
echo "==> booting (ssh on 127.0.0.1:$ssh_port)"
"${VM_QEMU[@]}" &
qemu=$!

# The Pi as a user's ~/.ssh/config would name it; the first install uses the flags instead.
cat >"$work/ssh_config" <<EOF
Host emulated-pi
  HostName 127.0.0.1
  Port $ssh_port
  User pi
  IdentityFile $work/key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
on_pi() { ssh -F "$work/ssh_config" emulated-pi "$@"; }
for _ in $(seq 120); do
  on_pi -o ConnectTimeout=5 true 2>/dev/null && break
  kill -0 "$qemu" 2>/dev/null || fail "the emulator exited; see $work/console.log"
  sleep 2
done
on_pi true || fail "sshd never answered; see $work/console.log"

# deploy EXPECTED_EXIT LOG ARGS...: runs cross/deploy.sh, shows its output, checks its exit code.
deploy() {
  local expected=$1 log=$2 code
  shift 2
  set +e
  cross/deploy.sh "$@" 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  set -e
  [ "$code" = "$expected" ] || fail "cross/deploy.sh $* exited $code, expected $expected"
}
# (ssh takes the first value it is given for an option: the port comes first, on its own.)
opts=(-i "$work/key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR)

echo "==> errors first: an unreachable host, a user without sudo"
deploy 3 "$work/unreachable.log" -p "$(vm_free_port)" "${opts[@]}" -l pi --deb "$deb" "$target" 127.0.0.1
opts=(-p "$ssh_port" "${opts[@]}")
grep -q "cannot reach 127.0.0.1 over ssh" "$work/unreachable.log" || fail "no clear error for an unreachable host"
deploy 3 "$work/nosudo.log" "${opts[@]}" -l nosudo --deb "$deb" "$target" 127.0.0.1
grep -q "cannot run sudo without a password" "$work/nosudo.log" || fail "no clear error for a user without sudo"
on_pi 'test ! -e /usr/bin/nightlight' || fail "a refused deploy changed the Pi"

# Readings per run from the observer's log: "run seq ts" lines.
readings() {
  python3 -c '
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        m = json.loads(line)
        print(m["run"], m["seq"], m["ts"])
    except (ValueError, KeyError):
        pass' "$VM_BROKER_DIR/observed.jsonl"
}
runs() { readings | cut -d' ' -f1 | sort -un; }
# Waits until a run after the ones in $1 has delivered readings; prints it.
new_run() {
  local before=$1 r
  for _ in $(seq 120); do
    r=$(runs | grep -vxF -f <(echo "$before"; echo x) | tail -1 || true)
    [ -n "$r" ] && { echo "$r"; return 0; }
    sleep 1
  done
  return 1
}
# (sudo: the image has no D-Bus, so only root reaches systemd, through its private socket.)
pi_prop() { on_pi sudo systemctl show nightlight -p "$1" --value; }
pi_version() { on_pi dpkg-query -W -f '\${Version}' nightlight; }
# Waits until the Pi's queue has grown N times: readings written to its segments while the
# broker is away (after queue.spill_ms).
pi_queued() {
  on_pi sudo bash -s "$1" <<'EOF'
bytes() { cat /var/lib/nightlight/*.seg 2>/dev/null | wc -c; }
for _ in $(seq "$1"); do
  before=$(bytes)
  for _ in $(seq 300); do [ "$(bytes)" -gt "$before" ] && break; sleep 0.1; done
  [ "$(bytes)" -gt "$before" ] || exit 1
done
EOF
}

echo "==> 1. first install, built by deploy.sh, with its configuration"
deploy 0 "$work/install.log" "${opts[@]}" -l pi --config "$work/device.toml" --require-delivery \
  "$target" 127.0.0.1 --features virtual
[ "$(pi_version)" = "$base_version" ] || fail "installed $(pi_version), expected $base_version"
first=$(new_run "") || fail "no telemetry from the first install"
echo "deploy-test: installed $base_version; run $first delivers"

echo "==> 2. an edit on the Pi, the broker down, an upgrade (through an ~/.ssh/config alias)"
on_pi "sudo sed -i 's/^interval_ms = 200$/interval_ms = 250/' /etc/nightlight/device.toml && echo '# edited on the Pi' | sudo tee -a /etc/nightlight/device.toml >/dev/null && sudo systemctl restart nightlight"
edited=$(new_run "$first") || fail "no telemetry after the edit"
vm_broker_stop
pi_queued 5 || fail "no readings queued on the Pi while the broker was down"
deploy 0 "$work/upgrade.log" -F "$work/ssh_config" --deb "$work/debs/new.deb" "$target" emulated-pi
[ "$(pi_version)" = "$new_version" ] || fail "after the upgrade $(pi_version) is installed, expected $new_version"
on_pi 'sudo grep -q "^# edited on the Pi$" /etc/nightlight/device.toml && sudo grep -q "^interval_ms = 250$" /etc/nightlight/device.toml' \
  || fail "the upgrade lost the edit of /etc/nightlight/device.toml"
on_pi 'sudo grep -q "default of '"$new_version"'" /etc/nightlight/device.toml.dpkg-dist' \
  || fail "the new default conffile is not beside the kept one (.dpkg-dist)"
[ "$(pi_prop ActiveState)" = active ] || fail "the upgraded service is not active"
pi_queued 3 || fail "the upgraded version queued no readings while the broker was down"
vm_broker_start
upgraded=$(new_run "$(printf '%s\n' "$first" "$edited")") || fail "no telemetry from the upgraded version"
# Everything the edited run queued while the broker was down arrives, with no gap, up to its end.
for _ in $(seq 60); do
  readings | awk -v r="$edited" '$1 == r' | sort -k2,2n >"$work/edited.txt"
  readings | awk -v r="$upgraded" '$1 == r' | sort -k2,2n >"$work/upgraded.txt"
  [ "$(wc -l <"$work/upgraded.txt")" -ge 20 ] && break
  sleep 1
done
python3 - "$work/edited.txt" "$work/upgraded.txt" <<'EOF' || fail "readings queued across the upgrade were lost"
import sys
for path in sys.argv[1:]:
    seqs = sorted({int(l.split()[1]) for l in open(path)})
    missing = seqs[-1] - seqs[0] + 1 - len(seqs) if seqs else 0
    print(f"deploy-test: {path.rsplit('/', 1)[-1]}: seq {seqs[0]}..{seqs[-1]}, {missing} missing")
    if not seqs or missing:
        sys.exit(1)
# The edited run went on reading through the outage until the upgrade stopped it: 5 s and
# more at 250 ms, all of it delivered now.
ts = sorted(int(l.split()[2]) for l in open(sys.argv[1]))
if ts[-1] - ts[0] < 5000:
    sys.exit(f"the run before the upgrade covers {ts[-1] - ts[0]} ms, not the outage")
EOF
echo "deploy-test: upgraded to $new_version (config kept, queue kept); run $upgraded delivers"

echo "==> 3. an upgrade to a build that cannot start"
seen=$(runs)
deploy 1 "$work/broken.log" -F "$work/ssh_config" --deb "$work/debs/broken.deb" "$target" emulated-pi
grep -q "rolled back: nightlight $new_version is running" "$work/broken.log" || fail "deploy.sh did not say it rolled back"
grep -q "a build that cannot start" "$work/broken.log" || fail "deploy.sh did not show the failed version's journal"
[ "$(pi_version)" = "$new_version" ] || fail "after the rollback $(pi_version) is installed, expected $new_version"
case $(pi_prop StatusText) in "delivering to 10.0.2.100:1883") ;; *) fail "after the rollback: $(pi_prop StatusText)" ;; esac
new_run "$seen" >/dev/null || fail "no telemetry after the rollback"
on_pi 'test -f /var/cache/nightlight/deploy/current.deb && test -f /var/cache/nightlight/deploy/previous.deb' \
  || fail "the kept .debs are missing"

echo "==> 4. purge removes what install created"
on_pi 'sudo dpkg --purge nightlight >/dev/null'
on_pi 'for p in /usr/bin/nightlight /etc/nightlight /var/lib/nightlight /var/cache/nightlight /lib/systemd/system/nightlight.service /etc/systemd/system/multi-user.target.wants/nightlight.service; do [ ! -e "$p" ] || { echo "left behind: $p"; exit 1; }; done; ! getent passwd nightlight' \
  || fail "purge left something behind"

kill -9 "$qemu"
wait "$qemu" 2>/dev/null || true
qemu=""
echo "deploy-test: installed, upgraded (config kept, queue kept), failed upgrade rolled back"
