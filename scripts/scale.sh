#!/usr/bin/env bash
# scale.sh: R replicas of `idem serve` sharing M streams against the fake vendor, for
# R = 1, 2, 4, 8 (or the R values given). For each R it prints runs per stream per period,
# the vendor's request rate against the connector's declared limit, overlapping runs of a
# stream, reminders delivered per idempotency key, peak RSS and Postgres connections per
# replica, and how long the replicas took to stop on SIGTERM.
#
# Usage: scripts/scale.sh [R...]     env: STREAMS (16), EVERY (3s), SECONDS_PER_R (16),
#        RATE (40 requests/s declared), INVOICES (200), PROFILE (debug|release; debug)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${IDEM_SCALE_INNER:-}" ]; then
  exec env IDEM_SCALE_INNER=1 scripts/with-postgres.sh "$0" "$@"
fi
REPLICAS=("$@")
[ ${#REPLICAS[@]} -eq 0 ] && REPLICAS=(1 2 4 8)
STREAMS="${STREAMS:-16}"
EVERY="${EVERY:-3s}"
DURATION="${SECONDS_PER_R:-16}"
RATE="${RATE:-40}"
BURST="${BURST:-5}"
INVOICES="${INVOICES:-200}"
PROFILE="${PROFILE:-debug}"
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --workspace --bins
else
  cargo build --quiet --workspace --bins
fi
bin="target/$PROFILE"

work="$(mktemp -d)"
pids=()
vendor_pid=""
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "$vendor_pid" ]; then kill "$vendor_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# M streams of one connector file, all reading the vendor's invoices into tables of their
# own, with the demo connector's overdue reminder on every fourth stream.
connector="$work/fleet.toml"
{
  printf 'source_system = "fleet"\nbase_url = "${DEMO_BILLING_URL}"\n\n[auth]\nkind = "bearer"\ntoken = "sk_test_demo"\n\n'
  printf '[rate_limit]\nrequests_per_second = %s\nburst = %s\n' "$RATE" "$BURST"
  for n in $(seq 0 $((STREAMS - 1))); do
    s=$(printf 's%02d' "$n")
    cat <<EOF

[streams.$s]
path = "/v1/invoices"
params = { limit = "100" }
records = "/data"
id = "/id"
table = "fleet_$s"

[streams.$s.pagination]
kind = "last_record"
param = "starting_after"
has_more = "/has_more"
EOF
    for col in number:text customer_email:text status:text amount_due:bigint currency:text; do
      printf '\n[[streams.%s.columns]]\nname = "%s"\npointer = "/%s"\ntype = "%s"\n' "$s" "${col%%:*}" "${col%%:*}" "${col##*:}"
    done
    printf '\n[[streams.%s.columns]]\nname = "due_date"\npointer = "/due_date"\ntype = "timestamptz"\nformat = "unix_seconds"\n' "$s"
    if [ $((n % 4)) -eq 0 ]; then
      cat <<EOF

[[streams.$s.notifications]]
name = "overdue_reminder"
key = "email:reminder:{{ source_id }}:stage1"
to = "customer_email"
subject = "Invoice {{ number }} is overdue"
body = "Invoice {{ number }} is overdue."
when = [
  { column = "status", eq = "open" },
  { column = "due_date", older_than = "3d" },
]
EOF
    fi
  done
} >"$connector"
chmod 600 "$connector"

base="${DATABASE_URL%%\?*}"
echo "== $STREAMS streams every $EVERY, declared $RATE req/s (burst $BURST), $INVOICES invoices, ${DURATION}s per R, $PROFILE build, $(nproc) cores"
printf '%-3s %-26s %-24s %-8s %-22s %-12s %-16s %-10s\n' R "runs/stream/period" "vendor req/s (limit)" overlaps "reminders (max/key)" "peak RSS" "conns/replica" "stop (s)"
for R in "${REPLICAS[@]}"; do
  db="idem_scale_$R"
  PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  url="${base%/*}/$db"
  port="$(free_port)"
  "$bin/idem-fake-vendor" --addr "127.0.0.1:$port" --invoices "$INVOICES" --bearer sk_test_demo >"$work/vendor.log" 2>&1 &
  vendor_pid=$!
  for _ in $(seq 1 100); do grep -q listening "$work/vendor.log" 2>/dev/null && break; sleep 0.1; done
  vendor="http://127.0.0.1:$port"
  cat >"$work/idem.toml" <<EOF
connectors = ["$connector"]
[notify]
transport = "http"
send_timeout = "5s"
lease = "10s"
[notify.http]
url = "$vendor/email/send"
[serve]
listen = "127.0.0.1:0"
notify_every = "1s"
heartbeat_every = "1s"
workers = 4
schedules = [{ streams = ["fleet"], every = "$EVERY" }]
EOF
  DATABASE_URL="$url" "$bin/idem" --config "$work/idem.toml" migrate >/dev/null
  pids=()
  for i in $(seq 1 "$R"); do
    DATABASE_URL="$url" DEMO_BILLING_URL="$vendor" RUST_LOG=warn \
      IDEM__SERVE__INSTANCE="scale-$R-$i" "$bin/idem" --config "$work/idem.toml" --log-format json serve \
      >"$work/out.$i" 2>"$work/err.$i" &
    pids+=($!)
  done
  # Warm-up: the first period runs every stream at once.
  sleep 4
  t0=$(date +%s.%N)
  req0=$(curl -s "$vendor/_fake/state")
  : >"$work/conns"
  end=$(($(date +%s) + DURATION))
  while [ "$(date +%s)" -lt "$end" ]; do
    # Pools are named `idem serve INSTANCE`; a run's lock session `idem SOURCE.STREAM …`.
    psql "$url" -qAt -F' ' -c "SELECT CASE WHEN application_name LIKE 'idem serve %' THEN replace(application_name, ' ', '_') ELSE 'locks' END, count(*)
        FROM pg_stat_activity WHERE datname = current_database() AND (application_name LIKE 'idem fleet.%' OR application_name LIKE 'idem serve %')
        GROUP BY 1" >>"$work/conns"
    sleep 1
  done
  t1=$(date +%s.%N)
  req1=$(curl -s "$vendor/_fake/state")
  rss_max=0
  for pid in "${pids[@]}"; do
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$rss_max" ] && rss_max=$rss
  done
  stop0=$(date +%s.%N)
  for pid in "${pids[@]}"; do kill -TERM "$pid"; done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  stop1=$(date +%s.%N)
  pids=()
  # The queue drains on one more pass, so every reminder is counted.
  DATABASE_URL="$url" "$bin/idem" --config "$work/idem.toml" notify >/dev/null 2>&1 || true
  curl -s "$vendor/_fake/emails" >"$work/emails.json"
  # Runs per period from each stream's cadence: (starts - 1) periods over the time from its
  # first to its last start in the window (counting whole runs in a short window would
  # quantize).
  runs=$(psql "$url" -qAt -F' ' -c "SELECT stream, count(*) - 1, EXTRACT(EPOCH FROM max(started_at) - min(started_at))::float8
      FROM idem_runs WHERE started_at >= to_timestamp($t0) AND started_at < to_timestamp($t1) GROUP BY 1")
  overlaps=$(psql "$url" -qAt -c "SELECT count(*) FROM idem_runs a JOIN idem_runs b
      ON a.source_system = b.source_system AND a.stream = b.stream AND a.id < b.id
     AND a.started_at < COALESCE(b.finished_at, now()) AND b.started_at < COALESCE(a.finished_at, now())")
  ledger=$(psql "$url" -qAt -F' ' -c "SELECT status, count(*) FROM idem_ledger GROUP BY 1 ORDER BY 1" | tr '\n' ',')
  python3 - "$R" "$STREAMS" "$EVERY" "$t0" "$t1" "$RATE" "$req0" "$req1" "$overlaps" "$work/emails.json" "$rss_max" "$work/conns" "$stop0" "$stop1" "$ledger" <<PY
import json, sys, collections
R, M, every, t0, t1, rate, req0, req1, overlaps, emails, rss, conns, s0, s1, ledger = sys.argv[1:]
R, M, rate = int(R), int(M), float(rate)
window = float(t1) - float(t0)
every_s = float(every.rstrip("s"))
periods = window / every_s
cadence = {}
for line in """$runs""".splitlines():
    if line.strip():
        stream, n, span = line.split()
        cadence[stream] = int(n) * every_s / float(span) if float(span) > 0 else 0.0
per = [cadence.get("s%02d" % i, 0.0) for i in range(M)]
a, b = json.loads(req0), json.loads(req1)
vendor = ((b["requests"] - a["requests"]) - (b["emails"] - a["emails"])) / window
mail = json.load(open(emails))
keys = collections.Counter(e.get("idempotency_key") for e in mail)
peak = collections.defaultdict(int)
for line in open(conns):
    if line.strip():
        name, n = line.split()
        peak[name] = max(peak[name], int(n))
locks = peak.pop("locks", 0)
cpr = max(peak.values()) if peak else 0
print(f"{R:<3} {'%.2f / %.2f / %.2f' % (min(per), sum(per)/len(per), max(per)):<26} "
      f"{'%.1f (%g)' % (vendor, rate):<24} {overlaps:<8} "
      f"{'%d (%d)' % (len(mail), max(keys.values()) if keys else 0):<22} "
      f"{'%.0f MB' % (int(rss)/1024):<12} {'%d + %d locks' % (cpr, locks):<16} {float(s1)-float(s0):<10.2f}")
print(f"    ledger: {ledger.rstrip(',')}")
PY
  kill "$vendor_pid" 2>/dev/null || true
  wait "$vendor_pid" 2>/dev/null || true
  vendor_pid=""
  PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
done
echo "(conns/replica: most pool sessions one replica held + most lock sessions held by all replicas together; runs/stream/period: min / mean / max over streams of (starts - 1) x every / (last start - first start); vendor req/s excludes /email/send; reminders: emails delivered (most deliveries of one key))"
