#!/usr/bin/env bash
# test.sh: runs the whole test suite (all targets) against a Postgres from with-postgres.sh,
# then the short mode of the crash/restart torture (scripts/torture.sh: release binary, a
# Postgres cluster of its own). Extra arguments go to `cargo test` and skip the torture,
# e.g. scripts/test.sh partitions. IDEM_SKIP_TORTURE=1 skips it too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/with-postgres.sh cargo test --workspace --all-targets "$@"
if [ $# -eq 0 ] && [ "${IDEM_SKIP_TORTURE:-0}" != "1" ]; then
    scripts/torture.sh
fi
