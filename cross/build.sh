#!/usr/bin/env bash
# cross/build.sh TARGET [cargo args]: a release build of nightlight for a Raspberry Pi, without
# Docker. Installs the rustup target and Debian's cross linker when missing; prints the binary's
# path last (in cargo's target directory, which honours CARGO_TARGET_DIR). TARGET: aarch64-unknown-linux-gnu (64-bit Pi OS) or armv7-unknown-linux-gnueabihf.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: cross/build.sh TARGET [cargo args]}"
shift
case "$target" in
  aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu-gcc; pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  armv7-unknown-linux-gnueabihf) gcc=arm-linux-gnueabihf-gcc; pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
  *) echo "cross/build.sh: unsupported target $target (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2; exit 2 ;;
esac
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v "$gcc" >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${pkgs[@]}"
fi
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${upper}_LINKER=$gcc"
cargo build --release --target "$target" "$@" >&2
echo "$(scripts/target-dir.sh)/$target/release/nightlight"
