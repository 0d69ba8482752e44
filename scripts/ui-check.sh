#!/usr/bin/env bash
# ui-check.sh: the console in a real browser. Builds idem, runs a demo import against the
# fake billing vendor (with one record the destination refuses and one reminder whose
# outcome is unknown, so the pages have something to show), starts `idem serve`, and has
# headless Chromium load the three console pages. Screenshots land in target/ui/; the
# script fails if a page does not answer 200 or shows an error.
# Installs Chromium from the OS packages when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_UI_INNER:-}" ]; then
  exec env IDEM_UI_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi

browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "==> installing headless Chromium from the OS packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get install -y chromium >/dev/null || { $sudo apt-get update >/dev/null && $sudo apt-get install -y chromium >/dev/null; }
  browser="$(command -v chromium)"
fi

echo "==> building idem"
cargo build --quiet --workspace --bins

out="target/ui"
mkdir -p "$out"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port="$(free_port)"
smtp_port="$(free_port)"
console_port="$(free_port)"

admin_url="$DATABASE_URL"
db="idem_ui_check"
base="${admin_url%%\?*}"
url="${base%/*}/${db}"
PGOPTIONS="-c client_min_messages=warning" psql "$admin_url" -qAt -c "DROP DATABASE IF EXISTS ${db} WITH (FORCE)" -c "CREATE DATABASE ${db}" >/dev/null

target/debug/idem-fake-vendor --addr "127.0.0.1:${http_port}" --invoices 400 \
  --smtp-addr "127.0.0.1:${smtp_port}" --bearer sk_test_demo >"$work/vendor.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/vendor.log" 2>/dev/null && break; sleep 0.1; done

cat >"$work/idem.toml" <<TOML
connectors = ["$PWD/connectors/demo_billing.toml"]

[notify]
transport = "smtp"
from = "billing@demo.example"

[notify.smtp]
host = "127.0.0.1"
port = ${smtp_port}
tls = "none"

[serve]
listen = "127.0.0.1:${console_port}"
admin_token = "\${IDEM_ADMIN_TOKEN}"
schedules = [{ streams = ["demo_billing.invoices"], every = "1h" }]
TOML
export DATABASE_URL="$url" DEMO_BILLING_URL="http://127.0.0.1:${http_port}" RUST_LOG="${RUST_LOG:-warn}"
export IDEM_ADMIN_TOKEN="ui-check-$RANDOM$RANDOM"
idem() { target/debug/idem --config "$work/idem.toml" --log-format json "$@"; }

echo "==> demo: one invoice the destination refuses, a dispatcher killed mid-send"
curl -fsS -X POST "http://127.0.0.1:${http_port}/_fake/update_invoice/in_000005" \
  -H 'content-type: application/json' -d '{"amount_due": "a lot"}' >/dev/null
IDEM_CRASH_AT=notify_after_send:3 idem run >/dev/null 2>&1 && { echo "the crash failpoint did not fire" >&2; exit 1; } || true
# Stand in for waiting out the dead dispatcher's lease (send_timeout + 5s at least).
psql "$url" -qAt -c "UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'" >/dev/null
idem notify >/dev/null 2>&1 || true

echo "==> idem serve on 127.0.0.1:${console_port}"
idem serve >"$work/serve.out" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:${console_port}/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:${console_port}/readyz"
# Let the schedule's first round finish so the first page shows a finished run.
for _ in $(seq 1 100); do
  [ "$(psql "$url" -qAt -c "SELECT count(*) FROM idem_runs WHERE status <> 'running'")" -ge 2 ] && break
  sleep 0.1
done

failed=0
shoot() {
  local name="$1" path="$2" size="$3"
  local page="http://127.0.0.1:${console_port}${path}"
  local code
  code="$(curl -s -o "$work/$name.html" -w '%{http_code}' "$page")"
  if [ "$code" != 200 ]; then
    echo "FAIL: $path answered HTTP $code" >&2; failed=1
  fi
  local flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --hide-scrollbars --user-data-dir="$(mktemp -d -p "$work")")
  "$browser" "${flags[@]}" --dump-dom "$page" >"$work/$name.dom" 2>/dev/null
  "$browser" "${flags[@]}" --screenshot="$PWD/$out/$name.png" --window-size="$size" "$page" >/dev/null 2>&1
  if ! grep -q '<header>' "$work/$name.dom"; then
    echo "FAIL: $path did not render in the browser" >&2; failed=1
  elif grep -q 'role="alert"' "$work/$name.dom"; then
    echo "FAIL: $path shows an error:" >&2; grep -o 'role="alert">[^<]*' "$work/$name.dom" >&2; failed=1
  fi
  if grep -q "$IDEM_ADMIN_TOKEN\|sk_test_demo" "$work/$name.dom"; then
    echo "FAIL: $path shows a credential" >&2; failed=1
  fi
  [ -s "$out/$name.png" ] || { echo "FAIL: no screenshot of $path" >&2; failed=1; }
  echo "    $path -> $out/$name.png (HTTP $code)"
}
echo "==> screenshots"
shoot streams / 1500,520
shoot stream /streams/demo_billing/invoices 1500,1300
shoot ledger "/ledger?status=needs_review" 1500,700
shoot ledger-all /ledger 1500,900

if [ "$failed" != 0 ]; then
  echo "ui-check FAILED; serve log:" >&2; tail -n 20 "$work/serve.log" >&2
  exit 1
fi
echo "==> ui-check passed: 4 pages rendered without errors"
