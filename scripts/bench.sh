#!/usr/bin/env bash
# bench.sh: idem's import throughput against the Postgres limit measured in the same run.
# A release build; the fake vendor serves N (default 200000) ~2.4 KB invoices, seeded with
# --bulk (a million fit in its memory, and a filtered list skips the unchanged invoices
# without reading them). Measures, in order: the raw limits (set-based upsert and COPY of
# the same rows straight into Postgres, one and two connections; examples/raw_limits.rs,
# capped at 200000 rows), idem's first import, the no-change run, a run after 1 % of the
# invoices changed, the full no-op re-walk (WAL bytes, row versions) and a 7-day replay.
# Prints records/s, idem's ratio to each limit, WAL bytes and peak RSS.
#   scripts/bench.sh [N] [--no-limits]     e.g. scripts/bench.sh 1000000 --no-limits
# Environment: IDEM_BENCH_TX_RECORDS, IDEM_BENCH_WRITERS override idem's [import] settings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_BENCH_INNER:-}" ]; then
  exec env IDEM_BENCH_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi
INVOICES="${1:-200000}"
LIMITS=1
[ "${2:-}" = "--no-limits" ] && LIMITS=0
echo "==> release build"
cargo build --release --quiet --workspace --bins --example raw_limits

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

target/release/idem-fake-vendor --addr "127.0.0.1:${port}" --invoices "$INVOICES" --bulk --bearer sk_test_demo >"$work/vendor.log" 2>&1 &
vendor_pid=$!
for _ in $(seq 1 600); do grep -q listening "$work/vendor.log" 2>/dev/null && break; sleep 0.1; done
vendor="http://127.0.0.1:${port}"

# The demo connector without its rate limit, so the figures are idem's and Postgres', not a quota's.
sed -e '/^\[rate_limit\]/,/^burst/d' connectors/demo_billing.toml >"$work/bench.toml"
{
  printf 'connectors = ["%s"]\n[notify]\ntransport = "log"\n[import]\n' "$work/bench.toml"
  [ -n "${IDEM_BENCH_TX_RECORDS:-}" ] && printf 'transaction_records = %s\n' "$IDEM_BENCH_TX_RECORDS"
  [ -n "${IDEM_BENCH_WRITERS:-}" ] && printf 'writer_connections = %s\n' "$IDEM_BENCH_WRITERS"
} >"$work/idem.toml"
export DATABASE_URL="$bench_url" DEMO_BILLING_URL="$vendor" RUST_LOG=warn
sql() { psql "$DATABASE_URL" -qAt -c "$1"; }

echo "==> $INVOICES invoices, $(nproc) cores, $(sql 'show server_version'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$work/limits"
if [ "$LIMITS" = 1 ]; then
  limit_rows=$(( INVOICES < 200000 ? INVOICES : 200000 ))
  echo "==> raw Postgres limits over the same $limit_rows rows (read from the vendor first, untimed)"
  target/release/examples/raw_limits "$DATABASE_URL" "$vendor" sk_test_demo "$limit_rows" >"$work/limits"
  awk '$1 != "busy" {printf "%-28s %9d rows/s\n", $2, $3}' "$work/limits"
fi

# Busy and idle clock ticks (1/100 s) of the whole machine so far.
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; }
wal_lsn() { sql "SELECT pg_current_wal_flush_lsn()"; }
# WAL is cluster-wide and other databases may be busy: pg_walinspect attributes to this
# database the records touching its relations and the commits of their transactions
# ("?" when the range's WAL was already recycled; then only the cluster-wide figure).
sql "CREATE EXTENSION IF NOT EXISTS pg_walinspect" >/dev/null 2>&1 || true
db_oid=$(sql "SELECT oid FROM pg_database WHERE datname = current_database()")
wal_of_this_db() { # FROM_LSN TO_LSN
  # No WAL in between: pg_walinspect refuses an empty range ("future start LSN").
  if [ "$1" = "$2" ]; then echo 0; return; fi
  sql "WITH r AS (SELECT xid, record_length, block_ref FROM pg_get_wal_records_info('$1', '$2')),
            ours AS (SELECT DISTINCT xid FROM r WHERE block_ref LIKE '%rel %/${db_oid}/%' AND xid <> 0)
       SELECT COALESCE(sum(record_length), 0) FROM r
       WHERE block_ref LIKE '%rel %/${db_oid}/%' OR xid IN (SELECT xid FROM ours)" 2>/dev/null || echo "?"
}
# Sums this database's WAL every second while a run goes on, before checkpoints recycle it.
wal_sampler() { # FROM_LSN OUT_FILE
  local from="$1" to total=0 part
  while [ ! -e "$work/stop_sampler" ]; do
    sleep 1
    to=$(wal_lsn)
    part=$(wal_of_this_db "$from" "$to")
    if [ "$part" = "?" ]; then total="?"; fi
    if [ "$total" != "?" ]; then total=$(( total + part )); fi
    from="$to"
    echo "$total" >"$2"
  done
  to=$(wal_lsn)
  part=$(wal_of_this_db "$from" "$to")
  if [ "$part" = "?" ] || [ "$total" = "?" ]; then total="?"; else total=$(( total + part )); fi
  echo "$total" >"$2"
}
# Row versions written to the destination table (insert + update + HOT), from the stats.
row_versions() {
  sql "SELECT pg_stat_force_next_flush()" >/dev/null 2>&1 || true
  sql "SELECT COALESCE((SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relname = 'demo_invoices'), 0)"
}

# measure LABEL RECORDS idem-args...: wall time, records/s over RECORDS, peak RSS, WAL and
# row versions written; then idem's own one-line summary.
measure() {
  local label="$1" records="$2"; shift 2
  local start end lsn_before versions_before
  # Each measurement starts as each raw limit does: after a checkpoint, so none inherits
  # the previous one's (the raw limits write about 2 GB of WAL just before the import).
  sql "CHECKPOINT" >/dev/null
  lsn_before=$(wal_lsn)
  local vendor_cpu_before
  vendor_cpu_before=$(awk '{print $14 + $15}' "/proc/$vendor_pid/stat")
  versions_before=$(row_versions)
  rm -f "$work/stop_sampler"; echo 0 >"$work/wal_db"
  wal_sampler "$lsn_before" "$work/wal_db" &
  local sampler=$!
  local machine_before machine_after
  machine_before=$(machine_ticks)
  start=$(date +%s.%N)
  /usr/bin/time -f "%M %U %S" -o "$work/rss" target/release/idem --config "$work/idem.toml" "$@" --no-notify >"$work/out" 2>"$work/err" || { cat "$work/err"; exit 1; }
  end=$(date +%s.%N)
  machine_after=$(machine_ticks)
  sleep 0.6 # stats reach pg_stat_user_tables within about half a second
  local wal versions wal_db
  wal=$(sql "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '$lsn_before')::bigint")
  touch "$work/stop_sampler"; wait "$sampler"
  wal_db=$(cat "$work/wal_db")
  local vendor_cpu=$(( $(awk '{print $14 + $15}' "/proc/$vendor_pid/stat") - vendor_cpu_before ))
  versions=$(( $(row_versions) - versions_before ))
  python3 - "$label" "$records" "$start" "$end" "$(cat "$work/rss")" "$wal" "$wal_db" "$versions" "$vendor_cpu" "$work/limits" "$(head -n1 "$work/out")" "$machine_before" "$machine_after" <<'PY'
import sys
label, n, start, end, rss_cpu, wal, wal_db, versions, vendor_ticks, limits, summary, m0, m1 = sys.argv[1:]
(busy0, idle0), (busy1, idle1) = (map(int, m.split()) for m in (m0, m1))
rss, user, system = rss_cpu.split()
idem_cpu = float(user) + float(system)
vendor_cpu = int(vendor_ticks) / 100
seconds = float(end) - float(start)
rate = int(n) / seconds if int(n) else 0
line = f"{label:<28} {rate:>9.0f} records/s  {seconds:7.2f} s  peak RSS {int(rss) / 1024:.0f} MiB  WAL {wal_db if not wal_db.isdigit() else f'{int(wal_db) / 1e6:.3f}'} MB (cluster {int(wal) / 1e6:.1f} MB)  row versions {versions}"
print(line)
print(f"  CPU seconds: idem {idem_cpu:.1f}, fake vendor {vendor_cpu:.1f}, the rest of the machine (Postgres, the kernel, any other load)"
      f" {max((busy1 - busy0) / 100 - idem_cpu - vendor_cpu, 0):.1f}, idle {(idle1 - idle0) / 100:.1f} (of {seconds:.1f} s wall on {__import__('os').cpu_count()} cores)")
if label == "first import":
    rows = [row.split() for row in open(limits)]
    for kind, name, value in rows:
        if kind != "busy":
            print(f"  idem / {name:<22} {rate / float(value):6.0%}")
    limit = {name: float(value) for kind, name, value in rows if kind == "limit"}
    busy = {name: float(value) for kind, name, value in rows if kind == "busy"}
    if "upsert_2conn" in limit and busy.get("upsert_2conn", 0) > 0:
        # The raw upsert's rows were min(n, 200000); its CPU scales with them.
        limit_rows = min(int(n), 200000)
        postgres = busy["upsert_2conn"] * int(n) / limit_rows
        cores = __import__("os").cpu_count()
        best = int(n) / ((postgres + idem_cpu + vendor_cpu) / cores)
        print(f"  CPU budget: the 2-conn upsert kept the machine busy {postgres:.1f} core-s for these rows; with idem's and the vendor's"
              f" {idem_cpu + vendor_cpu:.1f} core-s on the same {cores} cores, and nothing else asked of Postgres, no idle core:"
              f" at most {best:,.0f} records/s = {best / limit['upsert_2conn']:.0%} of the 2-conn upsert")
if not summary.startswith("["):
    print(f"  {summary}")
PY
}

measure "first import" "$INVOICES" run
measure "no-change run" 0 run
# 1 % of the invoices change at the vendor (their `updated` moves to the vendor's now).
changed=$(( INVOICES / 100 ))
python3 - "$vendor" "$INVOICES" "$changed" <<'PY'
import http.client, sys, urllib.parse
vendor, n, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(urllib.parse.urlparse(vendor).netloc)
step = max(n // max(changed, 1), 1)
for k in range(changed):
    conn.request("POST", f"/_fake/update_invoice/in_{1 + k * step:06}", body='{"amount_due": 4242}',
                 headers={"content-type": "application/json"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
PY
measure "1 % changed run" "$changed" run --json
python3 - "$work/out" "$changed" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))[0]["counters"]
print(f"  changed at the vendor {sys.argv[2]}: fetched {c['fetched']}, written {c['inserted'] + c['updated']}, unchanged {c['unchanged']}")
PY
sql "SELECT count(*) FROM demo_invoices WHERE amount_due = 4242" | sed 's/^/  rows with the change: /'
target/release/idem --config "$work/idem.toml" checkpoint reset demo_billing.invoices --yes >/dev/null
measure "full no-op re-walk" "$INVOICES" run
measure "7-day replay" "$changed" replay demo_billing.invoices --since 7d
echo "(whole process wall time, including start-up, migrations and the fake vendor's JSON rendering on the same cores;"
echo " rates of the 1 % run and the replay are over the changed records)"
