#!/usr/bin/env bash
# A team tracking server on one machine, without Docker: PostgreSQL (Debian's `postgresql`
# package) for runs and the model registry, a folder for artifacts, served by
# `mlflow server` (which proxies artifact uploads and downloads: clients need no access to
# the folder) with MLflow's basic-auth app: every request needs a user and password. The
# same layout as docker-compose.yaml, which puts artifacts on MinIO (S3).
#
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...                 # the admin's, needed on first start
#   infra/mlflow/local-server.sh DIR [PG_PORT] [PORT]     # foreground; Ctrl-C stops MLflow
#   # on every machine that logs (and on the Ray nodes, whose workers log too):
#   export MLFLOW_TRACKING_URI=http://<this host>:PORT
#   export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...
#   infra/mlflow/local-server.sh --stop DIR               # stops PostgreSQL
#
# Users besides the admin: the MLflow UI's account pages, or `mlflow.server.auth.client`.
#
# DIR keeps the database (DIR/pg) and the artifacts (DIR/artifacts) between starts. Run as
# root, PostgreSQL runs as the `postgres` user (it refuses root), so DIR must be reachable
# by that user. tests/cluster/test_team_tracking.py runs exactly this script.
set -euo pipefail

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pg_bin" ]; then
    echo "local-server.sh: PostgreSQL is not installed: apt-get install postgresql" >&2
    exit 1
fi
as_postgres=()
if [ "$(id -u)" = 0 ]; then as_postgres=(runuser -u postgres --); fi

if [ "${1:-}" = "--stop" ]; then
    "${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$(realpath "$2")/pg" -m fast stop
    exit 0
fi

dir=$(realpath -m "${1:?usage: local-server.sh DIR [PG_PORT] [PORT]}")
pg_port=${2:-5433}
port=${3:-5000}
if [ ! -f "$dir/pg/PG_VERSION" ] && [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
    echo "local-server.sh: set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more): the first" \
        "start creates the admin user ${MLFLOW_AUTH_ADMIN_USERNAME:-admin} with it" >&2
    exit 2
fi
mkdir -p "$dir/pg" "$dir/artifacts"
if [ "$(id -u)" = 0 ]; then chown postgres "$dir/pg"; fi
chmod 700 "$dir/pg"
if [ ! -f "$dir/pg/PG_VERSION" ]; then
    # Trust on the loopback address only (listen_addresses below): a laptop or a test. On a
    # shared host, set a password (initdb --pwfile) and put it in the backend-store URI.
    "${as_postgres[@]}" "$pg_bin/initdb" -D "$dir/pg" -U mlflow -A trust >/dev/null
fi
"${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/pg/server.log" -w start \
    -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1"
"${as_postgres[@]}" "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || "${as_postgres[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
# The basic-auth app's users and permissions, in their own database on the same server.
"${as_postgres[@]}" "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow_auth'" | grep -q 1 \
    || "${as_postgres[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow_auth
cat > "$dir/basic_auth.ini" <<INI
[mlflow]
# New users may read every experiment; writing needs a grant (the admin has all).
default_permission = READ
database_uri = postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow_auth
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Each request's password is checked with PBKDF2 (slow on purpose); a Train run logs every
# epoch. Cache a good check for a minute: a changed password reaches every worker within it.
auth_cache_ttl_seconds = 60
INI
export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini"
# The key that signs the UI's CSRF tokens: made once, kept with the server's data, the same
# for every worker and every restart.
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ ! -f "$dir/flask_secret" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/flask_secret")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask_secret")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

exec mlflow server --app-name basic-auth \
    --backend-store-uri "postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow" \
    --artifacts-destination "$dir/artifacts" --serve-artifacts \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "$port" --workers 2
