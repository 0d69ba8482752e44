#!/usr/bin/env bash
# bench.sh: how fast idem imports, and how much memory it needs. A release build imports
# N (default 20000) ~2.4 KB invoices from the fake vendor into a fresh database, then
# re-walks them unchanged; prints records/s and peak RSS for both runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_BENCH_INNER:-}" ]; then
  exec env IDEM_BENCH_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi
INVOICES="${1:-20000}"
echo "==> release build"
cargo build --release --quiet --bins

work="$(mktemp -d)"
vendor_pid=""
cleanup() {
  if [ -n "$vendor_pid" ]; then kill "$vendor_pid" 2>/dev/null || true; wait "$vendor_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 28079)"
base="${DATABASE_URL%%\?*}"
bench_url="${base%/*}/idem_bench"
PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -qAt -c "DROP DATABASE IF EXISTS idem_bench WITH (FORCE)" -c "CREATE DATABASE idem_bench" >/dev/null

target/release/idem-fake-vendor --addr "127.0.0.1:${port}" --invoices "$INVOICES" --bearer sk_test_demo >"$work/vendor.log" 2>&1 &
vendor_pid=$!
for _ in $(seq 1 200); do grep -q listening "$work/vendor.log" 2>/dev/null && break; sleep 0.1; done

# The demo connector without its rate limit, so the figures are idem's and Postgres', not a quota's.
sed -e '/^\[rate_limit\]/,/^burst/d' connectors/demo_billing.toml >"$work/bench.toml"
printf 'connectors = ["%s"]\n[notify]\ntransport = "log"\n' "$work/bench.toml" >"$work/idem.toml"
export DATABASE_URL="$bench_url" DEMO_BILLING_URL="http://127.0.0.1:${port}" RUST_LOG=warn

measure() {
  local label="$1"; shift
  local start end
  start=$(date +%s.%N)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%M" -o "$work/rss" target/release/idem --config "$work/idem.toml" "$@" --no-notify >"$work/out" 2>"$work/err"
  else
    target/release/idem --config "$work/idem.toml" "$@" --no-notify >"$work/out" 2>"$work/err"; echo "?" >"$work/rss"
  fi
  end=$(date +%s.%N)
  python3 - "$label" "$INVOICES" "$start" "$end" "$(cat "$work/rss")" "$(head -n1 "$work/out")" <<'PY'
import sys
label, n, start, end, rss, summary = sys.argv[1:]
seconds = float(end) - float(start)
rss_mb = f"{int(rss) / 1024:.0f} MB" if rss.isdigit() else "unknown"
print(f"{label:<28} {int(n) / seconds:>9.0f} records/s  {seconds:6.2f} s  peak RSS {rss_mb}")
print(f"  {summary}")
PY
}
echo "==> $INVOICES invoices, $(nproc) cores, $(psql "$DATABASE_URL" -qAt -c 'show server_version')"
measure "first import" run
target/release/idem --config "$work/idem.toml" checkpoint reset demo_billing.invoices --yes >/dev/null
measure "unchanged full re-walk" run
echo "(whole process wall time, including start-up, the fake vendor's JSON rendering on the same 2 cores, and migrations)"
