#!/usr/bin/env bash
# bench-notify.sh: how fast `idem notify` sends due ledger rows, to the in-project SMTP sink
# and to the fake vendor's keyed HTTP mail API (/email/send), with a release build.
#
# It imports enough overdue invoices from the fake vendor (`idem run --no-notify`) to owe
# N reminders (real rows: each is re-checked against its invoice before its send), keeps
# exactly N, times `idem notify` over SMTP, puts the same rows back to pending, and times
# `idem notify` over HTTP. Prints emails/s and idem's peak RSS for each, and checks that
# every row was delivered exactly once.
#
# Usage: scripts/bench-notify.sh            (N=10000, concurrency 8)
#        N=2000 CONCURRENCY=1 PROFILE=debug scripts/bench-notify.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_BENCH_INNER:-}" ]; then
  exec env IDEM_BENCH_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi

N="${N:-10000}"
CONCURRENCY="${CONCURRENCY:-8}"
BATCH="${BATCH:-100}"
# About 40 % of the fake vendor's invoices are open and overdue.
INVOICES="${INVOICES:-$(( N * 3 ))}"

# PROFILE=debug gives a quick, slower, figure while developing.
PROFILE="${PROFILE:-release}"
echo "==> ${PROFILE} build"
if [ "$PROFILE" = release ]; then cargo build --release --quiet --workspace --bins; else cargo build --quiet --workspace --bins; fi
bin="target/${PROFILE}"

work="$(mktemp -d)"
vendor_pid=""
cleanup() {
  if [ -n "$vendor_pid" ]; then kill "$vendor_pid" 2>/dev/null || true; wait "$vendor_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port="$(free_port)"
smtp_port="$(free_port)"

base="${DATABASE_URL%%\?*}"
db="idem_bench_notify"
url="${base%/*}/${db}"
PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -qAt \
  -c "DROP DATABASE IF EXISTS ${db} WITH (FORCE)" -c "CREATE DATABASE ${db}" >/dev/null
sql() { psql "$url" -qAt -c "$1"; }

"$bin/idem-fake-vendor" --addr "127.0.0.1:${http_port}" --invoices "$INVOICES" \
  --smtp-addr "127.0.0.1:${smtp_port}" >"$work/vendor.log" 2>&1 &
vendor_pid=$!
for _ in $(seq 1 100); do
  grep -q "listening" "$work/vendor.log" 2>/dev/null && break
  sleep 0.1
done

config() { # $1 = smtp | http
  cat <<TOML
connectors = ["$PWD/connectors/demo_billing.toml"]

[notify]
transport = "$1"
from = "billing@bench.example"
concurrency = ${CONCURRENCY}
batch_size = ${BATCH}

[notify.smtp]
host = "127.0.0.1"
port = ${smtp_port}
tls = "none"

[notify.http]
url = "http://127.0.0.1:${http_port}/email/send"
TOML
}
config smtp >"$work/smtp.toml"
config http >"$work/http.toml"
export DATABASE_URL="$url" DEMO_BILLING_URL="http://127.0.0.1:${http_port}" RUST_LOG="${RUST_LOG:-warn}"

echo "==> importing ${INVOICES} invoices to owe ${N} reminders"
"$bin/idem" --config "$work/smtp.toml" run --no-notify >/dev/null
owed="$(sql "SELECT count(*) FROM idem_ledger WHERE status = 'pending'")"
if [ "$owed" -lt "$N" ]; then
  echo "only ${owed} reminders owed; raise INVOICES" >&2
  exit 1
fi
sql "DELETE FROM idem_ledger WHERE key NOT IN (SELECT key FROM idem_ledger ORDER BY key LIMIT ${N})"

# Runs `idem notify` with config $1; prints "seconds peak_rss_kib".
timed_notify() {
  local started ended
  started="$(date +%s.%N)"
  /usr/bin/time -f '%M' -o "$work/rss" "$bin/idem" --config "$1" notify >"$work/notify.out" 2>"$work/notify.err" || {
    cat "$work/notify.out" "$work/notify.err" >&2
    exit 1
  }
  ended="$(date +%s.%N)"
  echo "$(echo "$ended - $started" | bc) $(cat "$work/rss")"
}

report() { # $1 = label, $2 = "seconds rss"
  local secs rss sent
  read -r secs rss <<<"$2"
  sent="$(sql "SELECT count(*) FROM idem_ledger WHERE status = 'sent'")"
  printf '%-5s %6d sent in %6.2f s: %7.0f emails/s, peak RSS %5.1f MiB\n' \
    "$1" "$sent" "$secs" "$(echo "$sent / $secs" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
  [ "$sent" -eq "$N" ] || { echo "expected ${N} rows sent" >&2; exit 1; }
}

echo "==> machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); concurrency ${CONCURRENCY}, batch ${BATCH}"
smtp="$(timed_notify "$work/smtp.toml")"
report smtp "$smtp"
received="$(curl -s "http://127.0.0.1:${http_port}/_fake/mailbox" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m), len({x.get("message_id") for x in m}))')"
[ "$received" = "$N $N" ] || { echo "the sink received (total distinct) ${received}, expected ${N} once each" >&2; exit 1; }

sql "UPDATE idem_ledger SET status = 'pending', attempts = 0, sent_at = NULL, first_attempt_at = NULL,
       next_attempt_at = now(), last_outcome = NULL, last_error = NULL, provider_message_id = NULL, transport = NULL"
http="$(timed_notify "$work/http.toml")"
report http "$http"
emails="$(curl -s "http://127.0.0.1:${http_port}/_fake/emails" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m), len({x.get("idempotency_key") for x in m}))')"
[ "$emails" = "$N $N" ] || { echo "the API delivered (total distinct) ${emails}, expected ${N} once each" >&2; exit 1; }
echo "==> load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
