#!/usr/bin/env bash
# torture.sh: crash, restart and race torture of the release `idem` binary against the
# in-project fake vendor, SMTP sink and keyed HTTP mail API, on a disposable Postgres cluster
# of its own (it restarts that cluster with `pg_ctl restart -m immediate`).
#
# Usage: scripts/torture.sh [--seed N] [--kills N] [--soak] [--only FILTER] [-- TEST ARGS]
#   --seed N     seed of every random choice (default: from the clock; printed)
#   --kills N    random SIGKILLs per stream shape (default 50; 1000 with --soak)
#   --soak       the long run: 1000 kills per shape, more restarts and racing rounds
#   --only F     run only the modes whose test name contains F (e.g. postgres_restart)
#   -- ARGS      more arguments for the test harness, e.g. -- --skip random_kills
# The driver is tests/torture/main.rs; its tests do nothing unless IDEM_TORTURE is set,
# which this script does. On a violation it prints the seed and the command to reproduce,
# and exits non-zero. Known-bug switches: see docs/TESTING.md. IDEM_BIN=PATH uses a binary
# already built instead of building the release one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seed=""
kills=""
mode=short
only=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --seed) seed=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --soak) mode=soak; shift ;;
    --only) only=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "torture.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$seed" ]; then seed=$(date +%s); fi
if [ -z "$kills" ]; then
    if [ "$mode" = soak ]; then kills=1000; else kills=50; fi
fi

echo "torture: mode=$mode seed=$seed kills=$kills per shape"
if [ -z "${IDEM_BIN:-}" ]; then
    cargo build --release --quiet --bin idem
    export IDEM_BIN="$PWD/target/release/idem"
fi
export IDEM_TORTURE="$mode" IDEM_TORTURE_SEED="$seed" IDEM_TORTURE_KILLS="$kills"
export IDEM_TORTURE_REPRODUCE="scripts/torture.sh --seed $seed --kills $kills$([ "$mode" = soak ] && echo ' --soak')"
# A cluster of our own (never the shared one on 5432): we crash and restart it.
unset DATABASE_URL
export IDEM_FORCE_TEMP_PG=1 IDEM_TEMP_PG_DURABLE=1
status=0
scripts/with-postgres.sh cargo test --quiet --test torture -- --test-threads=1 --nocapture $only ${extra[@]+"${extra[@]}"} || status=$?
if [ "$status" -ne 0 ]; then
    echo "torture: FAILED (seed $seed). Reproduce: $IDEM_TORTURE_REPRODUCE${only:+ --only $only}" >&2
fi
exit "$status"
