#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the tests (and `make migrations-check`) use are answering.
#
# Where: TEST_DATABASE_URL and TEST_REDIS_URL if set, else 127.0.0.1:5432 and 127.0.0.1:6379.
# A service that does not answer is started with this machine's own commands when it is local and they exist;
# if it still does not answer, this script says what is missing and exits 1. It never skips silently.
set -euo pipefail

DEFAULT_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL="redis://127.0.0.1:6379/15"
WAIT_SECONDS="${WAIT_SECONDS:-30}" # how long a service just started may take to answer
PYTHON="${PYTHON:-python3}"

log() { echo "ensure-services: $*"; }

# parse_host_port URL DEFAULT_PORT: sets HOST and PORT from scheme://[user[:pass]@]host[:port][/path][?query].
parse_host_port() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    rest="${rest##*@}"
    if [[ "$rest" == \[* ]]; then # [IPv6]:port
        HOST="${rest%%]*}"
        HOST="${HOST#[}"
        PORT="${rest#*]}"
    else
        HOST="${rest%%:*}"
        PORT="${rest#"$HOST"}"
    fi
    PORT="${PORT#:}"
    HOST="${HOST:-127.0.0.1}"
    PORT="${PORT:-$2}"
}

is_local() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }

# Probes must not hang on a host that drops packets.
with_timeout() {
    if command -v timeout >/dev/null 2>&1; then timeout 5 "$@"; else "$@"; fi
}

postgres_answers() {
    if command -v pg_isready >/dev/null 2>&1; then
        with_timeout pg_isready -q -h "$1" -p "$2" -t 3 </dev/null
    else
        # A PostgreSQL server answers an SSLRequest with a single byte, 'S' or 'N'; anything else is not one.
        with_timeout "$PYTHON" - "$1" "$2" <<'EOF'
import socket, struct, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
    s.sendall(struct.pack("!ii", 8, 80877103))
    sys.exit(0 if s.recv(1) in (b"S", b"N") else 1)
EOF
    fi
}

# A server that wants a password (NOAUTH) is answering: the credentials are the tests' business, via TEST_REDIS_URL.
redis_answers() {
    local reply
    if command -v redis-cli >/dev/null 2>&1; then
        reply="$(with_timeout redis-cli -h "$1" -p "$2" ping </dev/null 2>&1)" || true
    else
        reply="$(with_timeout "$PYTHON" - "$1" "$2" <<'EOF'
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
    s.sendall(b"PING\r\n")
    print(s.recv(64).decode("ascii", "replace").strip())
EOF
        )" || true
    fi
    [[ "$reply" == *PONG* || "$reply" == *NOAUTH* ]]
}

# wait_for CHECK HOST PORT: poll once a second for up to WAIT_SECONDS.
wait_for() {
    local i
    for ((i = 0; i < WAIT_SECONDS; i++)); do
        "$1" "$2" "$3" >/dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}

# --- start commands: this machine's own, used only for a local service on its standard port ------------------

start_postgres() {
    command -v pg_ctlcluster >/dev/null 2>&1 || return 1
    local cluster version started=1
    # Debian's layout: /etc/postgresql/<version>/main; usually exactly one version.
    for cluster in /etc/postgresql/*/main; do
        [[ -d "$cluster" ]] || continue
        version="$(basename "$(dirname "$cluster")")"
        log "starting PostgreSQL $version (pg_ctlcluster)"
        # "already running" (exit 2) is fine: it may only be still starting up.
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        started=0
    done
    return "$started"
}

start_redis() {
    command -v redis-server >/dev/null 2>&1 || return 1
    log "starting Redis (redis-server --daemonize yes)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
}

# --- the check -----------------------------------------------------------------------------------------------

# ensure NAME CHECK START_FN STANDARD_PORT URL_VAR URL HINT: 0 if the service answers (after starting it if
# need be); otherwise prints what is missing, with HINT on how to point the tests elsewhere, and returns 1.
ensure() {
    local name="$1" check="$2" start="$3" standard_port="$4" url_var="$5" url="$6" hint="$7"
    parse_host_port "$url" "$standard_port"
    local host="$HOST" port="$PORT" source="from $url_var"
    [[ -n "${!url_var:-}" ]] || source="the default: $url_var is not set"

    if "$check" "$host" "$port" >/dev/null 2>&1; then
        log "$name answers at $host:$port"
        return 0
    fi

    local tried="not started: $host:$port is not this machine's standard $name address"
    if is_local "$host" && [[ "$port" == "$standard_port" ]]; then
        if "$start"; then
            tried="tried to start it with this machine's commands and waited ${WAIT_SECONDS}s"
            log "waiting up to ${WAIT_SECONDS}s for $name at $host:$port"
            if wait_for "$check" "$host" "$port"; then
                log "$name answers at $host:$port"
                return 0
            fi
        else
            tried="not started: this machine has no $name server installed"
        fi
    fi

    cat >&2 <<EOF
ensure-services: $name does not answer at $host:$port ($source).
  ($tried)
  The tests need a real $name. Provide it in one of these ways:
    - start the project's own: docker compose up -d postgres redis
      (they listen on 127.0.0.1:5432 and 127.0.0.1:6379)
    - point the tests at one that runs elsewhere: $hint
EOF
    return 1
}

failed=0
ensure PostgreSQL postgres_answers start_postgres 5432 TEST_DATABASE_URL "${TEST_DATABASE_URL:-$DEFAULT_DATABASE_URL}" \
    "export TEST_DATABASE_URL=postgresql+psycopg://user:pass@host:5432/postgres
      (with the compose PostgreSQL: postgresql+psycopg://verdict:verdict@127.0.0.1:5432/postgres)" \
    || failed=1
ensure Redis redis_answers start_redis 6379 TEST_REDIS_URL "${TEST_REDIS_URL:-$DEFAULT_REDIS_URL}" \
    "export TEST_REDIS_URL=redis://host:6379/15" \
    || failed=1
exit "$failed"
