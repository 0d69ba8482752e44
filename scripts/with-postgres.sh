#!/usr/bin/env bash
# with-postgres.sh: runs CMD with DATABASE_URL pointing at a reachable Postgres, starting a
# disposable local cluster (stopped and removed on exit) when none is available.
#
# Usage: scripts/with-postgres.sh CMD [ARGS...]
#
# Order: (a) DATABASE_URL from the environment (must be reachable); (b) a server already on
# 127.0.0.1:5432 as user postgres; (c) a temporary cluster from initdb/pg_ctl, installing
# Postgres with the OS package manager when they are missing.
# IDEM_FORCE_TEMP_PG=1 skips (b), to exercise (c). IDEM_TEMP_PG_DURABLE=1 keeps
# synchronous_commit on in (c), so that a crash of the server (pg_ctl restart -m immediate)
# loses no committed transaction. In (c), CMD also gets IDEM_PGDATA, IDEM_PGBIN and
# IDEM_PG_OS_USER (empty: ourselves) so that it can restart the cluster.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

log() { echo "with-postgres: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Succeeds when the server behind the URL $1 accepts connections.
url_reachable() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -t 5 -d "$1"
    elif command -v psql >/dev/null 2>&1; then
        psql "$1" -Atqc 'select 1' >/dev/null 2>&1
    else
        log "neither pg_isready nor psql is installed; assuming DATABASE_URL is reachable"
    fi
}

# Succeeds when we can really log in and query (not only reach the port).
url_usable() {
    if command -v psql >/dev/null 2>&1; then
        PGCONNECT_TIMEOUT=5 psql "$1" -Atqc 'select 1' >/dev/null 2>&1
    else
        url_reachable "$1"
    fi
}

# (a) An explicit DATABASE_URL wins.
if [ -n "${DATABASE_URL:-}" ]; then
    url_reachable "$DATABASE_URL" || die "DATABASE_URL is set but that Postgres is not reachable"
    log "using DATABASE_URL from the environment"
    export DATABASE_URL
    exec "$@"
fi

# (b) A server already listening on the default port.
default_url="postgres://postgres@127.0.0.1:5432/postgres"
if [ "${IDEM_FORCE_TEMP_PG:-0}" != "1" ] &&
    command -v pg_isready >/dev/null 2>&1 &&
    pg_isready -q -t 3 -h 127.0.0.1 -p 5432; then
    if url_usable "$default_url"; then
        log "using the Postgres on 127.0.0.1:5432"
        export DATABASE_URL="$default_url"
        exec "$@"
    fi
    log "a Postgres on 127.0.0.1:5432 refused $default_url; starting a temporary one"
fi

# (c) A disposable cluster.
SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
fi

# Prints the directory holding initdb and pg_ctl, or fails.
find_pg_bin() {
    local p d
    if p=$(command -v pg_ctl 2>/dev/null) && command -v initdb >/dev/null 2>&1; then
        # Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb).
        dirname "$(readlink -f "$p" 2>/dev/null || echo "$p")"
        return 0
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin /usr/pgsql-*/bin /opt/homebrew/opt/postgresql*/bin \
        /usr/local/opt/postgresql*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

install_pg() {
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ] && ! command -v brew >/dev/null 2>&1; then
        die "Postgres is not installed and we are not root and have no sudo; install it (e.g. apt-get install postgresql) or set DATABASE_URL"
    fi
    log "initdb/pg_ctl not found; installing Postgres with the OS package manager"
    if command -v apt-get >/dev/null 2>&1; then
        ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    elif command -v dnf >/dev/null 2>&1; then
        ${SUDO[@]+"${SUDO[@]}"} dnf install -y postgresql-server >&2
    elif command -v yum >/dev/null 2>&1; then
        ${SUDO[@]+"${SUDO[@]}"} yum install -y postgresql-server >&2
    elif command -v apk >/dev/null 2>&1; then
        ${SUDO[@]+"${SUDO[@]}"} apk add --no-cache postgresql >&2
    elif command -v brew >/dev/null 2>&1; then
        brew install postgresql@16 >&2
    else
        die "no supported package manager (apt-get, dnf, yum, apk, brew); install Postgres or set DATABASE_URL"
    fi
}

PGBIN=$(find_pg_bin) || {
    install_pg
    PGBIN=$(find_pg_bin) || die "Postgres was installed but initdb/pg_ctl are still not found"
}

# initdb and postgres refuse to run as root: use the postgres user (created if missing).
OS_USER=""
if [ "$(id -u)" -eq 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
        if command -v useradd >/dev/null 2>&1; then
            useradd --system --no-create-home --shell /bin/sh postgres >/dev/null 2>&1 || true
        elif command -v adduser >/dev/null 2>&1; then
            adduser -S -H -s /bin/sh postgres >/dev/null 2>&1 || true
        fi
    fi
    if id postgres >/dev/null 2>&1; then OS_USER=postgres; else OS_USER=nobody; fi
fi

# Runs a command as OS_USER when we are root, else as ourselves.
as_pg() {
    if [ -z "$OS_USER" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$OS_USER" -- "$@"
    else
        su -s /bin/sh "$OS_USER" -c "$(printf '%q ' "$@")"
    fi
}

if [ -n "$OS_USER" ]; then parent=/tmp; else parent=${TMPDIR:-/tmp}; fi
PGTMP=$(mktemp -d "$parent/idem-pg.XXXXXX")
PGDATA_DIR="$PGTMP/data"
started=0

cleanup() {
    local status=$?
    if [ "$started" = 1 ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$PGTMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "$OS_USER" ]; then chown "$OS_USER" "$PGTMP"; fi

as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --no-sync \
    >"$PGTMP/initdb.log" 2>&1 || {
    cat "$PGTMP/initdb.log" >&2
    die "initdb failed"
}

# A free port: random start, a few attempts (pg_ctl fails fast when the port is taken).
port=""
for _ in 1 2 3 4 5 6 7 8; do
    try=$((20000 + RANDOM % 40000))
    sync_opt="-c synchronous_commit=off"
    if [ "${IDEM_TEMP_PG_DURABLE:-0}" = "1" ]; then sync_opt=""; fi
    if (echo >"/dev/tcp/127.0.0.1/$try") >/dev/null 2>&1; then continue; fi
    if as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGTMP/postgres.log" -w -t 30 \
        -o "-p $try -k $PGTMP -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off $sync_opt -c full_page_writes=off" \
        start >/dev/null 2>&1; then
        port=$try
        started=1
        break
    fi
done
if [ -z "$port" ]; then
    cat "$PGTMP/postgres.log" >&2 2>/dev/null || true
    die "could not start a temporary Postgres"
fi

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
export IDEM_PGDATA="$PGDATA_DIR" IDEM_PGBIN="$PGBIN" IDEM_PG_OS_USER="$OS_USER"
version=$("$PGBIN/pg_ctl" --version | awk '{print $3}')
log "started a temporary Postgres $version on 127.0.0.1:$port (removed on exit)"
# In the background (stdin kept) so that INT/TERM reach the traps, and the cleanup, at once.
"$@" <&0 &
child=$!
trap 'kill -INT "$child" 2>/dev/null; exit 130' INT
trap 'kill -TERM "$child" 2>/dev/null; exit 143' TERM
wait "$child"
