#!/usr/bin/env bash
# tests/web/run.sh: the demo's page in a real browser (run by scripts/test.sh). Installs what it
# needs when missing: Debian's chromium, node and npm, and playwright-core (the version pinned in
# tests/web/package-lock.json, into cargo's target directory: nothing is added to the tree).
# Builds the virtual binary, then runs tests/web/page.test.mjs with node's test runner. The
# screenshot of the page lands in <target dir>/web-test/demo-page.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}"
fi
target=$(scripts/target-dir.sh)
dir="$target/web-test"
mkdir -p "$dir"
if ! cmp -s tests/web/package-lock.json "$dir/package-lock.json" || [ ! -d "$dir/node_modules/playwright-core" ]; then
  cp tests/web/package.json tests/web/package-lock.json "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
cargo build --no-default-features --features virtual --bin nightlight
NIGHTLIGHT_BIN="$target/debug/nightlight" WEB_TEST_DIR="$dir" CHROMIUM="$(command -v chromium)" \
  node --test --test-concurrency=1 tests/web/page.test.mjs
