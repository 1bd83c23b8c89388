#!/usr/bin/env bash
# cross/package.sh TARGET [cargo args]: a .deb for the Pi (arm64 or armhf) holding
# /usr/bin/nightlight, /etc/nightlight/device.toml (a conffile) and the systemd unit, enabled on
# install, with the service user and /var/lib/nightlight created. Installs cargo-deb when
# missing; prints the .deb's path last. Extra cargo args (e.g. --features virtual) go to the build.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: cross/package.sh TARGET [cargo args]}"
shift
cross/build.sh "$target" "$@" >/dev/null
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked >&2
fi
# The release profile already strips; --no-build packages the binary cross/build.sh made.
out="$(scripts/target-dir.sh)/$target/debian"
rm -f "$out"/nightlight_*.deb
# NIGHTLIGHT_VERSION (a release's version, seen by the build too) is the package's version.
cargo deb --no-build --no-strip --target "$target" --output "$out/" ${NIGHTLIGHT_VERSION:+--deb-version "$NIGHTLIGHT_VERSION"} >&2
ls "$out"/nightlight_*.deb
