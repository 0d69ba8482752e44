#!/usr/bin/env bash
# test.sh: runs the whole test suite (all targets) against a Postgres from with-postgres.sh.
# Extra arguments go to `cargo test`, e.g. scripts/test.sh fake_vendor.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec scripts/with-postgres.sh cargo test --all-targets "$@"
