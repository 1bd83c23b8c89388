#!/usr/bin/env bash
# scripts/target-dir.sh: prints cargo's target directory, absolute. The scripts ask cargo instead
# of assuming ./target, so CARGO_TARGET_DIR (or build.target-dir in a cargo config) is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
