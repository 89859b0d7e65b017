#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the catalog tests and prints the variables to use it:
#
#   eval "$(scripts/start-test-postgres.sh)"      # sets GIGAPATH_TEST_POSTGRES_URL, ..._DIR
#   cargo test -p gigapath-store
#   scripts/start-test-postgres.sh --stop "$GIGAPATH_TEST_POSTGRES_DIR"
#
# Needs the Debian `postgresql` package (initdb / pg_ctl under /usr/lib/postgresql/*/bin). The
# cluster lives in a temp dir, listens on 127.0.0.1 on a free port, trusts local connections and
# runs with fsync off: for tests only. As root it runs the server as the `postgres` user.
# Everything but the final `export` lines goes to stderr.
set -euo pipefail

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
        return
    fi
    echo "start-test-postgres: no initdb found; install PostgreSQL (apt-get install postgresql)" >&2
    exit 1
}

bindir=$(find_bindir)

if [ "${1:-}" = "--stop" ]; then
    dir=${2:?usage: $0 --stop DIR}
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast stop >&2 || true
    rm -rf -- "$dir"
    echo "start-test-postgres: stopped and removed $dir" >&2
    exit 0
fi

port_is_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port=""
for candidate in $(seq 55432 55532); do
    if port_is_free "$candidate"; then
        port=$candidate
        break
    fi
done
if [ -z "$port" ]; then
    echo "start-test-postgres: no free port in 55432-55532" >&2
    exit 1
fi

dir=$(mktemp -d /tmp/gigapath-pg.XXXXXX)
chmod 755 "$dir"
if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$dir"
fi

as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    exit 1
}
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 || {
    cat "$dir/server.log" >&2
    exit 1
}
as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres gigapath_test

echo "start-test-postgres: PostgreSQL on 127.0.0.1:$port, data in $dir" >&2
echo "export GIGAPATH_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/gigapath_test"
echo "export GIGAPATH_TEST_POSTGRES_DIR=$dir"
