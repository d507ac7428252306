# shellcheck shell=bash
# A throw-away PostgreSQL cluster for the service tests (`stoker serve` on several hosts).
#
# Source it (it exports STOKER_TEST_PG_URL and defines stoker_ci_postgres_stop):
#
#     source scripts/ci-postgres.sh
#     trap stoker_ci_postgres_stop EXIT
#
# or run it (it prints the URL and leaves the cluster running; stop it with
# `scripts/ci-postgres.sh stop`).  The cluster lives in a fresh directory under
# /var/tmp, owned by the postgres user, listens on 127.0.0.1:5433 only and
# trusts loopback connections: never use it for anything but tests.

STOKER_CI_PG_PORT="${STOKER_CI_PG_PORT:-5433}"
STOKER_CI_PG_DIR="${STOKER_CI_PG_DIR:-/var/tmp/stoker-ci-postgres}"

_stoker_pg_as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        # Not root: the cluster belongs to whoever runs the tests.
        "$@"
    fi
}

_stoker_pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$dir" ] && printf '%s\n' "$dir"
}

stoker_ci_postgres_stop() {
    local bindir
    bindir="$(_stoker_pg_bindir)" || return 0
    if [ -f "$STOKER_CI_PG_DIR/data/postmaster.pid" ]; then
        _stoker_pg_as_postgres "$bindir/pg_ctl" -D "$STOKER_CI_PG_DIR/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
    fi
    rm -rf "$STOKER_CI_PG_DIR"
}

stoker_ci_postgres_start() {
    local bindir
    if [ -z "$(_stoker_pg_bindir)" ]; then
        echo "ci-postgres: installing postgresql" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || return 1
    fi
    bindir="$(_stoker_pg_bindir)" || { echo "ci-postgres: no PostgreSQL binaries" >&2; return 1; }
    # A cluster left by an earlier run that was killed: start again from nothing.
    stoker_ci_postgres_stop
    mkdir -p "$STOKER_CI_PG_DIR"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$STOKER_CI_PG_DIR"
    fi
    _stoker_pg_as_postgres "$bindir/initdb" -D "$STOKER_CI_PG_DIR/data" -U postgres \
        --auth=trust --no-sync -E UTF8 >"$STOKER_CI_PG_DIR/initdb.log" 2>&1 \
        || { cat "$STOKER_CI_PG_DIR/initdb.log" >&2; return 1; }
    # Loopback TCP only; the socket goes into our directory (not /run/postgresql).
    # fsync off: a test cluster does not need to survive a power cut.
    _stoker_pg_as_postgres "$bindir/pg_ctl" -D "$STOKER_CI_PG_DIR/data" -w -t 60 \
        -l "$STOKER_CI_PG_DIR/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $STOKER_CI_PG_PORT -c unix_socket_directories=$STOKER_CI_PG_DIR -c fsync=off -c max_connections=200" \
        start >/dev/null || { cat "$STOKER_CI_PG_DIR/server.log" >&2; return 1; }
    _stoker_pg_as_postgres "$bindir/createdb" -h 127.0.0.1 -p "$STOKER_CI_PG_PORT" -U postgres \
        stoker_test || return 1
    export STOKER_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$STOKER_CI_PG_PORT/stoker_test"
    echo "$STOKER_TEST_PG_URL"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed, not sourced.
    set -euo pipefail
    if [ "${1:-start}" = stop ]; then
        stoker_ci_postgres_stop
    else
        stoker_ci_postgres_start
    fi
else
    stoker_ci_postgres_start
fi
