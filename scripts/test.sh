#!/usr/bin/env bash
# The one test command (README "Tests", docs/tests.md). On a fresh Debian/Ubuntu machine it installs what the
# tests need (mosquitto, the Pi cross linkers and rustup targets, cargo-deb, qemu, mmdebstrap),
# proves the Pi builds cross-compile, package and run (cross/check.sh), boots the .deb in an
# emulated arm64 Debian (cross/boot-test.sh), runs the hardware build on emulated Pi GPIO and I2C
# chips in three board layouts (cross/hardware-test.sh), cuts its power ten times (cross/power-cut-test.sh),
# deploys, upgrades and rolls it back over ssh (cross/deploy-test.sh), updates it over MQTT through
# drops and power cuts (cross/update-test.sh), smoke-tests the benchmark
# script, drives the demo's page in headless chromium (tests/web/run.sh), then runs every test: unit, driver (mock I2C), the queue's
# simulation, and end to end against real mosquitto brokers it starts on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
missing=()
have_mosquitto || missing+=(mosquitto mosquitto-clients)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || missing+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi
# promtool checks the metrics (tests/e2e_metrics.rs); it comes with Debian's Prometheus server,
# which is not wanted running.
if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing prometheus (for promtool)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 prometheus
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

echo "==> the laptop build (virtual, no rppal) builds and does not pull in rppal"
cargo build --no-default-features --features virtual
tree=$(cargo tree -e normal --no-default-features --features virtual)
if grep -q rppal <<<"$tree"; then
  echo "rppal is in the virtual build's dependency tree" >&2
  exit 1
fi

echo "==> the Pi builds: cross-compile, package, verify the unit, run arm64 under qemu"
cross/check.sh

echo "==> the hardware build runs: the default .deb on an emulated Pi (gpio-sim GPIO, CUSE I2C), three board layouts"
cross/hardware-test.sh

echo "==> starts on boot: the .deb in an emulated arm64 Debian (qemu-system-aarch64)"
cross/boot-test.sh
echo "==> starts on boot on Debian 13 (trixie: Raspberry Pi OS's base today, kernel 6.12, 64-bit time_t)"
VM_SUITE=trixie cross/boot-test.sh

echo "==> real power cuts: the .deb in the emulated arm64 Debian, killed with SIGKILL ten times"
cross/power-cut-test.sh

echo "==> a proven deploy: cross/deploy.sh over ssh to the emulated arm64 Debian (install, upgrade, rollback)"
cross/deploy-test.sh

echo "==> updates over MQTT: signed, resumed through drops and power cuts, gated, rolled back by the Pi (emulated arm64 Debian)"
cross/update-test.sh

echo "==> benchmark script smoke (one short repetition beside the lesson's device; no figures asserted)"
SMOKE=1 bench/compare.sh >/dev/null
SMOKE=1 bench/metrics.sh >/dev/null
SMOKE=1 bench/fleet.sh >/dev/null

log=$(mktemp)
echo "==> the demo's page in a real browser (headless chromium)"
set +e
tests/web/run.sh 2>&1 | tee "$log"
web_status=${PIPESTATUS[0]}

echo "==> tests"
# --lib --bins --tests: every unit, driver, property and end-to-end test (no doc-tests: there are none).
cargo test --features virtual --no-fail-fast --lib --bins --tests 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "==> the end-to-end tests again, every client on MQTT 3.1.1 (tests/e2e_mqtt5.rs covers both itself)"
NIGHTLIGHT__MQTT__PROTOCOL=3.1.1 cargo test --features virtual --no-fail-fast --test cli --test e2e_mosquitto \
  --test e2e_queue --test e2e_server --test e2e_security --test e2e_homeassistant 2>&1 | tee -a "$log"
status311=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$status311
set -e
# cargo's "test result:" lines and node's "# pass N" / "# fail N", together.
awk '/^test result:/ { p += $4; f += $6 } /^# pass / { p += $3 } /^# fail / { f += $3 }
  END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[ "$web_status" -eq 0 ] || exit "$web_status"
exit "$status"
