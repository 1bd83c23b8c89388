#!/usr/bin/env bash
# cross/deploy.sh [options] TARGET [user@]HOST [cargo args]
#
# Builds the .deb (cross/package.sh TARGET [cargo args]), or takes one with --deb, and installs it
# on a Pi over ssh, keeping what a Pi owner cares about: an edited /etc/nightlight/device.toml
# stays (dpkg keeps the old conffile, the package's new default goes beside it as .dpkg-dist),
# the queue in /var/lib/nightlight stays, and the .deb that worked is kept on the Pi in
# /var/cache/nightlight/deploy/ (current.deb, and previous.deb before it).
#
# After installing, a health gate on the Pi: the service must reach READY (Type=notify) within
# --wait seconds (default 60), then run 10 s without a restart; and when the version it replaces
# was delivering readings to its broker (its systemd status line said so), the new one must be
# delivering too within the same bound. If the gate fails, the version that was installed before
# is reinstalled from the kept .deb, the gate is run again for it, the script says so and exits 1.
#
# Options (ssh's own flags where ssh has one; HOST may be an alias from ~/.ssh/config):
#   -p PORT          ssh port                      -l USER    remote user (or user@HOST)
#   -i KEY           ssh identity file             -F FILE    ssh config file
#   -o OPTION        any ssh option, repeatable (e.g. -o StrictHostKeyChecking=accept-new)
#   --deb FILE       install FILE instead of building (its architecture must match TARGET's)
#   --config FILE    install FILE as /etc/nightlight/device.toml (the Pi's copy is kept as
#                    /var/cache/nightlight/deploy/device.toml.before, and restored by a rollback)
#   --wait SECONDS   the health gate's bound (default 60)
#   --require-delivery  the new version must deliver readings even if the old one was not
#
# Exit codes: 0 installed and healthy; 1 the new version failed the gate and the previous one is
# running again; 2 usage; 3 nothing was changed on the Pi (unreachable, no sudo, not a Debian
# with systemd, another architecture, the build failed); 4 the new version failed and could not
# be rolled back (nothing kept to go back to, or the old version failed too): see the journal.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
say() { echo "deploy: $*" >&2; }
die() { local code=$1; shift; say "$*"; exit "$code"; }

ssh_opts=(-o ConnectTimeout=15 -o ServerAliveInterval=10 -o ServerAliveCountMax=3)
deb="" config="" wait_s=60 settle_s=10 require_delivery=0
while [ $# -gt 0 ]; do
  case $1 in
    -p) ssh_opts+=(-o "Port=${2:?-p needs a port}"); shift 2 ;;
    -i) ssh_opts+=(-o "IdentityFile=${2:?-i needs a key file}" -o IdentitiesOnly=yes); shift 2 ;;
    -l) ssh_opts+=(-o "User=${2:?-l needs a user}"); shift 2 ;;
    -F) ssh_opts=(-F "${2:?-F needs a file}" "${ssh_opts[@]}"); shift 2 ;;
    -o) ssh_opts+=(-o "${2:?-o needs an option}"); shift 2 ;;
    --deb) deb=${2:?--deb needs a file}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --wait) wait_s=${2:?--wait needs seconds}; shift 2 ;;
    --require-delivery) require_delivery=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) say "unknown option $1"; usage ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || usage
target=$1 host=$2
shift 2
# A HOST starting with '-' would be an ssh option (-oProxyCommand=... runs a local command).
case $host in -*) die 2 "HOST '$host' starts with '-': not a host name" ;; esac
[[ $wait_s =~ ^[0-9]+$ ]] || die 2 "--wait takes whole seconds, not '$wait_s'"
[ -z "$deb" ] || [ -f "$deb" ] || die 2 "--deb $deb: no such file"
[ -z "$config" ] || [ -f "$config" ] || die 2 "--config $config: no such file"
case $target in
  aarch64-unknown-linux-gnu) arch=arm64 ;;
  armv7-unknown-linux-gnueabihf) arch=armhf ;;
  *) die 2 "unknown TARGET $target (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" ;;
esac
if [ -n "$deb" ]; then
  deb_arch=$(dpkg-deb -f "$deb" Architecture) || die 2 "--deb $deb: not a .deb"
  [ "$deb_arch" = "$arch" ] || die 2 "--deb $deb is for $deb_arch, TARGET $target is $arch"
fi

# One ssh connection for every step (and one password prompt, if the Pi asks for one).
control=$(mktemp -d)
ssh_opts+=(-o ControlMaster=auto -o "ControlPath=$control/%C" -o ControlPersist=120)
[ -t 0 ] || ssh_opts+=(-o BatchMode=yes)
cleanup() {
  if [ -n "$config" ]; then
    # The uploaded configuration may hold credentials: never left behind, whatever happened.
    ssh "${ssh_opts[@]}" -- "$host" "sudo -n rm -f /var/cache/nightlight/deploy/incoming.conf" >/dev/null 2>&1 || true
  fi
  ssh "${ssh_opts[@]}" -O exit -- "$host" >/dev/null 2>&1 || true
  rm -rf "$control"
}
trap cleanup EXIT
on_pi() { ssh "${ssh_opts[@]}" -- "$host" "$@"; }

# What runs on the Pi, as root: one phase per call, read from stdin by sh. The health gate is
# the package's own (cross/debian/health-gate), sent with it: one gate for deploys and updates.
REMOTE_PHASES=$(cat <<'PI'
exec </dev/null
set -eu
dir=/var/cache/nightlight/deploy
prop() { systemctl show nightlight -p "$1" --value 2>/dev/null || true; }
phase=$1
shift
case $phase in
probe)
  echo "arch=$(dpkg --print-architecture)"
  echo "installed=$(dpkg-query -W -f '${db:Status-Status} ${Version}' nightlight 2>/dev/null | sed -n 's/^installed //p')"
  kept=""
  [ ! -f "$dir/current.deb" ] || kept=$(dpkg-deb -f "$dir/current.deb" Version)
  echo "kept=$kept"
  echo "status=$(prop StatusText)"
  ;;
install)
  deb=$1 conf=${2:-}
  if [ -n "$conf" ]; then
    [ ! -f /etc/nightlight/device.toml ] || cp -p /etc/nightlight/device.toml "$dir/device.toml.before"
    # Readable by the service only; before the first install its group does not exist yet.
    mkdir -p /etc/nightlight
    if getent group nightlight >/dev/null; then
      install -m 0640 -g nightlight "$conf" /etc/nightlight/device.toml
    else
      install -m 0644 "$conf" /etc/nightlight/device.toml
    fi
  fi
  # For the gate: the run to look past, and since when the journal matters.
  before=$(prop InvocationID)
  echo "${before:--} $(date +%s)"
  systemctl reset-failed nightlight >/dev/null 2>&1 || true
  # An edited conffile is kept; the package's new one, when it has one, goes beside it.
  if ! DEBIAN_FRONTEND=noninteractive dpkg --force-confdef --force-confold -i "$deb" >"$dir/dpkg.log" 2>&1; then
    cat "$dir/dpkg.log" >&2
    exit 1
  fi
  grep -i 'warning\|dpkg-dist' "$dir/dpkg.log" >&2 || true
  if [ -n "$conf" ]; then
    chgrp nightlight /etc/nightlight/device.toml
    chmod 0640 /etc/nightlight/device.toml
  fi
  # The package restarts the service on an upgrade; a reinstall of the same version may not.
  if [ -z "$(prop InvocationID)" ] || [ "$(prop InvocationID)" = "$before" ]; then
    systemctl restart --no-block nightlight
  fi
  ;;
gate)
  # The gate the package's update installer runs too (cross/debian/health-gate, above).
  nightlight_gate "$@"
  ;;
keep)
  # The new .deb worked: it is what a later failed deploy goes back to.
  [ ! -f "$dir/current.deb" ] || mv "$dir/current.deb" "$dir/previous.deb"
  mv "$dir/incoming.deb" "$dir/current.deb"
  rm -f "$dir/incoming.conf" "$dir/dpkg.log"
  ;;
restore-config)
  if [ -f "$dir/device.toml.before" ]; then
    cp -p "$dir/device.toml.before" /etc/nightlight/device.toml
  fi
  ;;
esac
}
PI
)
# One compound command, so sh has read all of it before dpkg or systemctl could read stdin.
REMOTE="{
NIGHTLIGHT_GATE_LIB=1
$(cat cross/debian/health-gate)
$REMOTE_PHASES"
pi_phase() { on_pi sudo -n sh -s -- "$@" <<<"$REMOTE"; }

say "checking $host over ssh"
if ! err=$(on_pi true 2>&1); then
  die 3 "cannot reach $host over ssh: ${err##*$'\n'}"
fi
if ! err=$(on_pi sudo -n true 2>&1); then
  die 3 "$host: the ssh user cannot run sudo without a password (sudo -n true: ${err##*$'\n'}); see docs/raspberry-pi.md, 'Deploying to a Pi over ssh' (/usr/share/doc/nightlight on the Pi)"
fi
on_pi 'command -v dpkg >/dev/null && [ -d /run/systemd/system ]' \
  || die 3 "$host: not a Debian-based system running systemd (Raspberry Pi OS is one); nothing changed"
probe=$(pi_phase probe)
pi_arch=$(sed -n 's/^arch=//p' <<<"$probe")
installed=$(sed -n 's/^installed=//p' <<<"$probe")
kept=$(sed -n 's/^kept=//p' <<<"$probe")
old_status=$(sed -n 's/^status=//p' <<<"$probe")
[ "$pi_arch" = "$arch" ] || {
  other=$([ "$pi_arch" = armhf ] && echo armv7-unknown-linux-gnueabihf || echo aarch64-unknown-linux-gnu)
  die 3 "$host runs $pi_arch, TARGET $target builds $arch: deploy with TARGET $other"
}
rollback=""
if [ -n "$installed" ]; then
  if [ "$kept" = "$installed" ]; then
    rollback=$installed
  else
    say "warning: nightlight $installed on $host was not installed by this script; if the new version fails, there is no .deb to go back to"
  fi
fi
need=$require_delivery
case $old_status in "delivering to "*) need=1 ;; esac

if [ -z "$deb" ]; then
  say "building the .deb for $target"
  deb=$(cross/package.sh "$target" "$@" | tail -1) || die 3 "the build failed; nothing changed on $host"
fi
version=$(dpkg-deb -f "$deb" Version)
say "copying $(basename "$deb") to $host"
on_pi "sudo -n sh -c 'mkdir -p /var/cache/nightlight/deploy && cat >/var/cache/nightlight/deploy/incoming.deb'" <"$deb"
conf_arg=""
if [ -n "$config" ]; then
  on_pi "sudo -n sh -c 'umask 077 && cat >/var/cache/nightlight/deploy/incoming.conf'" <"$config"
  conf_arg=/var/cache/nightlight/deploy/incoming.conf
fi

gate_words() {
  if [ "$need" = 1 ]; then
    echo "READY within ${wait_s} s, 10 s without a restart, and delivering readings to its broker"
  else
    echo "READY within ${wait_s} s and 10 s without a restart (the broker is not part of it: the version before was not delivering either)"
  fi
}
say "installing nightlight $version on $host${installed:+ (replacing $installed)}"
# The install phase prints the service's run before it and when it began: the gate's reference.
if before=$(pi_phase install /var/cache/nightlight/deploy/incoming.deb $conf_arg); then
  read -r old_run since <<<"$before"
  say "health gate: $(gate_words)"
  if status=$(pi_phase gate "$wait_s" "$settle_s" "$need" "$old_run" "$since"); then
    pi_phase keep
    say "nightlight $version is running on $host: $status"
    exit 0
  fi
else
  say "dpkg could not install $version"
fi

say "nightlight $version FAILED on $host"
if [ -z "$rollback" ]; then
  die 4 "no kept .deb to roll back to: $host needs a person (journalctl -u nightlight)"
fi
say "rolling back to $rollback (/var/cache/nightlight/deploy/current.deb)"
[ -z "$config" ] || pi_phase restore-config
if before=$(pi_phase install /var/cache/nightlight/deploy/current.deb) \
  && read -r old_run since <<<"$before" \
  && status=$(pi_phase gate "$wait_s" "$settle_s" "$need" "$old_run" "$since"); then
  say "rolled back: nightlight $rollback is running on $host again: $status"
  exit 1
fi
die 4 "the rollback to $rollback failed too: $host needs a person (journalctl -u nightlight)"
