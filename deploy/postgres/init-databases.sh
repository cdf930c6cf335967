#!/bin/sh
# A database and a login role for each province gateway, in the postgres service of
# docker-compose.yml. The image runs this script (mounted as
# /docker-entrypoint-initdb.d/10-xsettle-databases.sh) once: when it creates the cluster in the
# empty volume postgres-data, before the server listens on the network (so before the service
# is healthy and a gateway starts). After make-passwords.sh made a new password, or for a
# province added to XSETTLE_PROVINCES, run it again by hand:
#   docker compose up -d postgres     # recreates the container with the new env file
#   docker compose exec postgres /docker-entrypoint-initdb.d/10-xsettle-databases.sh
#
# For each code of XSETTLE_PROVINCES (docker-compose.yml), with the password
# XSETTLE_DB_PASSWORD_<code> (deploy/postgres/secrets/postgres.env, from make-passwords.sh):
#   role xsettle_<code>      LOGIN with that password (stored as SCRAM-SHA-256), no other
#                            right: not superuser, cannot create roles or databases
#   database xsettle_<code>  owned by that role, which creates its tables itself (the
#                            gateway's migrations at start); PUBLIC may not connect to it, so
#                            no other province's role can
# and the superuser's password again from POSTGRES_PASSWORD (the image sets it only when it
# creates the cluster; make-passwords.sh --force makes a new one).
# Run again, it changes nothing but the passwords: a role and a database that exist are kept,
# with their data. The passwords reach psql through \getenv, never on a command line (which
# `ps` shows to every user of the container).
# Needs a POSIX sh and psql 15 or later (\getenv); connects as POSTGRES_USER over the local
# socket (PGHOST and PGPORT, when set, say where).
set -eu

die() {
  echo "init-databases.sh: $*" >&2
  exit 1
}

SUPERUSER=${POSTGRES_USER:-postgres}
[ -n "${XSETTLE_PROVINCES:-}" ] ||
  die "XSETTLE_PROVINCES is not set (docker-compose.yml, service postgres)"
# Every code and password is checked before anything is created: all provinces or none.
for code in $XSETTLE_PROVINCES; do
  case $code in
    [0-9][0-9]0000) ;;
    *) die "$code is not a province code" ;;
  esac
  [ -n "$(printenv "XSETTLE_DB_PASSWORD_$code" || true)" ] ||
    die "XSETTLE_DB_PASSWORD_$code is not set: run deploy/postgres/make-passwords.sh"
done

run_psql() {
  psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --quiet \
    --username "$SUPERUSER" --dbname postgres "$@"
}

if [ -n "${POSTGRES_PASSWORD:-}" ]; then
  run_psql --set=superuser="$SUPERUSER" <<'SQL'
\getenv password POSTGRES_PASSWORD
ALTER ROLE :"superuser" WITH PASSWORD :'password';
SQL
fi

for code in $XSETTLE_PROVINCES; do
  # The heredoc is quoted: the shell expands nothing in it; the names come in as variables.
  # CREATE DATABASE cannot run in a transaction block: \gexec runs each statement alone.
  run_psql --set=name="xsettle_$code" --set=secret="XSETTLE_DB_PASSWORD_$code" <<'SQL'
\getenv password :secret
SELECT format('CREATE ROLE %I', :'name')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
ALTER ROLE :"name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
  echo "init-databases.sh: database and role xsettle_$code ready"
done
