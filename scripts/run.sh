#!/usr/bin/env bash
# Start the admin panel, the workers and the scheduler under supervisord in the
# foreground; Ctrl-C stops them all (what `make run` runs, after it creates .venv).
#
# Settings come from the environment and from .env in the project folder. A name
# already set in the environment wins over the same name in .env, so
# `WORKER_PROCESSES=4 make run` overrides .env for one run; every value written
# only in .env reaches every program. .env values are taken literally: no $VAR
# expansion, and one pair of surrounding quotes is removed.
#
# Without DATABASE_URL, a project-local PostgreSQL server runs in VAR_DIR/postgres
# (scripts/localdb.sh), and SECRET_KEY and ADMIN_PASSWORD are generated once into
# VAR_DIR/secret_key and VAR_DIR/admin_password.
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$PROJECT_DIR"
PYTHON=$PROJECT_DIR/.venv/bin/python

log() { printf 'run: %s\n' "$*" >&2; }
die() { printf 'run: error: %s\n' "$*" >&2; exit 1; }

[[ -x $PYTHON ]] || die "$PYTHON is missing; start with 'make run', which creates .venv"

# Export NAME=value pairs from a dotenv file unless NAME is already set.
load_dotenv() {
    local file=$1 line name value number=0
    while IFS= read -r line || [[ -n $line ]]; do
        number=$((number + 1))
        line=${line%$'\r'}
        line=${line#"${line%%[![:space:]]*}"}
        [[ -z $line || $line == \#* ]] && continue
        line=${line#export }
        if [[ ! $line =~ ^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
            die "$file line $number is invalid; expected NAME=value"
        fi
        name=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        if [[ $value =~ ^\"(.*)\"[[:space:]]*(#.*)?$ ]]; then
            value=${BASH_REMATCH[1]}
        elif [[ $value =~ ^\'(.*)\'[[:space:]]*(#.*)?$ ]]; then
            value=${BASH_REMATCH[1]}
        else
            # An unquoted value ends at a ' #' comment; trailing blanks are dropped.
            value=${value%%[[:space:]]#*}
            value=${value%"${value##*[![:space:]]}"}
        fi
        if [[ -z ${!name+set} ]]; then
            export "$name=$value"
        fi
    done <"$file"
}

# Print the content of a 0600 file under VAR_DIR, creating it with a new random
# value first when it is missing.
read_or_generate() {
    local file=$1
    if [[ ! -s $file ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' \
            >"$file")
    fi
    cat "$file"
}

if [[ -f .env ]]; then
    load_dotenv .env
fi

if [[ -z ${DATABASE_URL:-} ]]; then
    export LOCAL_DATABASE=true
else
    export LOCAL_DATABASE=false
fi

# Without an API_BASE_URL of your own, jobs call the demo upstream in
# scripts/demo_api.py, which supervisord runs on the default API_BASE_URL.
# DEMO_API=true with a loopback API_BASE_URL runs the demo on that address.
if [[ -z ${API_BASE_URL:-} ]]; then
    export DEMO_API=true
elif [[ ${DEMO_API:-false} != true ]]; then
    export DEMO_API=false
fi

# Validates every setting (exit status 2 with the problems) and exports PROJECT_DIR,
# an absolute VAR_DIR and the other variables conf/supervisord.conf expands.
exports=$("$PYTHON" -m workers.launch env) || die "fix the settings above and retry"
eval "$exports"
mkdir -p "$VAR_DIR/log"

if [[ $LOCAL_DATABASE == true ]]; then
    export LOCAL_DATABASE_PORT=${LOCAL_DATABASE_PORT:-54320}
    exports=$("$PROJECT_DIR/scripts/localdb.sh" prepare)
    eval "$exports"
    log "using the project-local PostgreSQL in $VAR_DIR/postgres" \
        "(127.0.0.1:$LOCAL_DATABASE_PORT)"

    if [[ -z ${SECRET_KEY:-} ]]; then
        SECRET_KEY=$(read_or_generate "$VAR_DIR/secret_key")
        export SECRET_KEY
    fi

    if [[ -n ${ADMIN_PASSWORD:-} ]]; then
        login_hint="with ADMIN_PASSWORD from your environment or .env"
    elif [[ -s $VAR_DIR/admin_password ]]; then
        ADMIN_PASSWORD=$(cat "$VAR_DIR/admin_password")
        login_hint="with the password in $VAR_DIR/admin_password"
    else
        ADMIN_PASSWORD=$(read_or_generate "$VAR_DIR/admin_password")
        login_hint="with the password $ADMIN_PASSWORD (shown once; it is kept in"
        login_hint+=" $VAR_DIR/admin_password)"
    fi
    export ADMIN_PASSWORD
else
    # With a database of your own, nothing is generated: the panel refuses to
    # start without SECRET_KEY, and setup leaves the admin account alone without
    # ADMIN_PASSWORD.
    [[ -n ${SECRET_KEY:-} ]] || log "SECRET_KEY is not set, so the web program" \
        "will not start; set it in .env (at least 32 random characters)"
    if [[ -n ${ADMIN_PASSWORD:-} ]]; then
        login_hint="with ADMIN_PASSWORD from your environment or .env"
    else
        login_hint="with the account's existing password (ADMIN_PASSWORD is not set)"
    fi
fi

"$PYTHON" -m workers.launch check || die "fix the problems above and retry"

panel=$("$PYTHON" -m workers.launch url)
admin_user=$("$PYTHON" -c \
    'from workers.settings import load_settings; print(load_settings().admin_username)')
log "admin panel: $panel"
log "log in as '$admin_user' $login_hint"
ctl=".venv/bin/supervisorctl -c conf/supervisord.conf"
if [[ $SUPERVISOR_SOCKET != "$PROJECT_DIR/var/supervisor.sock" ]]; then
    ctl+=" -s unix://$SUPERVISOR_SOCKET"
fi
log "logs: $VAR_DIR/log; status: $ctl status"
log "starting supervisord; press Ctrl-C to stop every program"

exec "$PROJECT_DIR/.venv/bin/supervisord" -n -c "$PROJECT_DIR/conf/supervisord.conf"
