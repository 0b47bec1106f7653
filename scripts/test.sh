#!/usr/bin/env bash
# The test command: installs the tools the end-to-end tests need, builds every binary
# (the tests start `shoald` as a process), and runs all tests of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  echo "test.sh: cargo-nextest not found, using cargo test" >&2
  cargo test --workspace --locked --no-fail-fast
fi
