#!/usr/bin/env bash
# demo.sh: the nightly invoice import end to end, twice. It starts the built-in fake
# billing vendor (with a local SMTP mail sink), uses a local Postgres (provisioned by
# with-postgres.sh when none is reachable), imports the invoices, sends the overdue
# reminders, then runs the same job again: nothing is inserted, updated or re-sent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_DEMO_INNER:-}" ]; then
  exec env IDEM_DEMO_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi

INVOICES="${DEMO_INVOICES:-1000}"
LONG_INVOICES="${DEMO_LONG_INVOICES:-20}"
echo "==> building idem (first build takes a few minutes)"
cargo build --quiet --workspace --bins

work="$(mktemp -d)"
vendor_pid=""
cleanup() {
  if [ -n "$vendor_pid" ]; then kill "$vendor_pid" 2>/dev/null || true; wait "$vendor_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
http_port="$(free_port)"
smtp_port="$(free_port)"

# A fresh demo database beside whatever DATABASE_URL points at.
admin_url="$DATABASE_URL"
demo_db="idem_demo"
base="${admin_url%%\?*}"
demo_url="${base%/*}/${demo_db}"
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -qAt -c "DROP DATABASE IF EXISTS ${demo_db} WITH (FORCE)" -c "CREATE DATABASE ${demo_db}" >/dev/null

echo "==> starting the fake billing vendor ($INVOICES invoices, $LONG_INVOICES more with 25 line items each) and a mail sink"
target/debug/idem-fake-vendor --addr "127.0.0.1:${http_port}" --invoices "$INVOICES" \
  --long-invoices "$LONG_INVOICES" \
  --smtp-addr "127.0.0.1:${smtp_port}" --bearer sk_test_demo >"$work/vendor.log" 2>&1 &
vendor_pid=$!
for _ in $(seq 1 100); do
  grep -q "listening" "$work/vendor.log" 2>/dev/null && break
  sleep 0.1
done

cat >"$work/idem.toml" <<TOML
connectors = ["$PWD/connectors/demo_billing_lines.toml"]

[notify]
transport = "smtp"
from = "billing@demo.example"

[notify.smtp]
host = "127.0.0.1"
port = ${smtp_port}
tls = "none"
TOML

export DATABASE_URL="$demo_url" DEMO_BILLING_URL="http://127.0.0.1:${http_port}" RUST_LOG="${RUST_LOG:-warn}"
idem() { target/debug/idem --config "$work/idem.toml" --log-format pretty "$@"; }

echo
echo "==> nightly run #1: import, then send the overdue reminders"
idem run
line_requests() { curl -s "http://127.0.0.1:${http_port}/_fake/state" | python3 -c 'import json,sys; print(json.load(sys.stdin)["line_item_requests"])' 2>/dev/null || echo '?'; }
lines="$(psql "$DATABASE_URL" -qAt -c "SELECT count(*) FROM demo_invoice_lines" 2>/dev/null || echo '?')"
echo "==> line items beyond the 10 an invoice carries inline (child stream line_items): ${lines} rows in demo_invoice_lines, $(line_requests) line item requests"
echo
echo "==> nightly run #2: the same job again (a retry, an overlap, a second cron): nothing to do"
before="$(line_requests)"
idem run
echo "==> run #2 made $(( $(line_requests) - before )) line item requests (no invoice changed, so no child walk)"
echo
echo "==> a third, full re-walk after forgetting the checkpoint: every record compared, none written"
idem checkpoint reset demo_billing.invoices --yes
idem run
echo
mails="$(curl -s "http://127.0.0.1:${http_port}/_fake/mailbox" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo '?')"
echo "==> the mail sink received ${mails} reminder emails (one per overdue invoice, however often the job ran)"
idem status | tail -n 4
