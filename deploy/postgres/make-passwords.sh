#!/bin/sh
# The passwords of the PostgreSQL of docker-compose.yml (service postgres, the province
# gateways' databases): run once on your machine, like deploy/gateway/make-tokens.sh, before
# `docker compose up postgres` or a gateway.
#
#   deploy/postgres/make-passwords.sh             # for every deploy/gateway/<code>.toml
#   deploy/postgres/make-passwords.sh 460000      # only these provinces
#   deploy/postgres/make-passwords.sh --force     # throw them away and make new ones (with
#                                                 # provinces named: only theirs)
#   deploy/postgres/make-passwords.sh --out DIR   # write DIR/secrets/ instead of secrets/ here
#
# Writes, into secrets/ next to this script (git ignores it; only you may read it):
#   secrets/<code>.env     PGPASSWORD=<password of role xsettle_<code>>: the env_file of the
#                          services gateway-<code>-a and -b. Their XSETTLE_DATABASE_URL names
#                          no password; libpq (under psycopg) takes it from PGPASSWORD.
#   secrets/postgres.env   POSTGRES_PASSWORD=<superuser's password> and
#                          XSETTLE_DB_PASSWORD_<code>=<the same as in <code>.env> for every
#                          <code>.env there is: the env_file of the postgres service, whose
#                          init-databases.sh makes each role with its password.
# Passwords are 32 random bytes in URL-safe base64 (43 characters), printed nowhere.
#
# Run again, it keeps every password and makes only the missing ones, then writes
# postgres.env again from the <code>.env files. The database takes passwords only when it is
# created (the volume postgres-data is empty); after a new one (--force, a new province), give
# it to the running database and recreate the containers that read it:
#   docker compose up -d postgres
#   docker compose exec postgres /docker-entrypoint-initdb.d/10-xsettle-databases.sh
#   docker compose up -d gateway-<code>-a gateway-<code>-b
# Needs a POSIX sh and openssl (OpenSSL or LibreSSL).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$HERE
GATEWAYS=$HERE/../gateway # the gateway configurations, <code>.toml
FORCE=false
CODES=""
NAMED=false # provinces named: --force leaves the superuser's password alone

die() {
  echo "make-passwords.sh: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --force) FORCE=true ;;
    --out)
      [ $# -ge 2 ] || die "--out needs a folder"
      OUT=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) CODES="$CODES $1" ;;
  esac
  shift
done

command -v openssl >/dev/null 2>&1 || die "openssl is not installed"

if [ -n "$CODES" ]; then
  NAMED=true
else # every gateway of docker-compose.yml
  for file in "$GATEWAYS"/*.toml; do
    [ -f "$file" ] || continue
    CODES="$CODES $(basename "$file" .toml)"
  done
  [ -n "$CODES" ] || die "no <code>.toml in $GATEWAYS: name the provinces"
fi
for code in $CODES; do
  case $code in
    [0-9][0-9]0000) ;;
    *) die "$code is not a province code" ;;
  esac
done

umask 077
SECRETS=$OUT/secrets
mkdir -p "$SECRETS"
chmod 700 "$SECRETS"
trap 'rm -f "$SECRETS"/*.new' EXIT

new_password() { # 32 random bytes, URL-safe base64 without padding: 43 characters
  password=$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n')
  [ ${#password} -eq 43 ] || die "openssl rand gave an unexpected password"
  printf '%s' "$password"
}

# The value of KEY in an env file, if it is a password this script could have made.
kept() {
  value=$(sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1)
  case $value in
    *[!A-Za-z0-9_-]*) return 0 ;;
  esac
  [ ${#value} -ge 32 ] && printf '%s' "$value"
  return 0
}

publish() { # FILE.new, written under umask 077, becomes FILE (readable by its owner only)
  chmod 600 "$1.new"
  mv "$1.new" "$1"
}

for code in $CODES; do
  env=$SECRETS/$code.env
  password=""
  $FORCE || password=$(kept "$env" PGPASSWORD)
  if [ -n "$password" ]; then
    echo "database xsettle_$code: password kept in $env"
    continue
  fi
  password=$(new_password)
  {
    echo "# Made by deploy/postgres/make-passwords.sh: env_file of gateway-$code-a and -b. Secret."
    echo "# libpq takes the password of role xsettle_$code from PGPASSWORD."
    echo "PGPASSWORD=$password"
  } >"$env.new"
  publish "$env"
  echo "database xsettle_$code: new password in $env"
done

superuser=""
if ! $FORCE || $NAMED; then
  superuser=$(kept "$SECRETS/postgres.env" POSTGRES_PASSWORD)
fi
made=""
if [ -z "$superuser" ]; then
  superuser=$(new_password)
  made=" (a new superuser password)"
fi
{
  echo "# Made by deploy/postgres/make-passwords.sh from <code>.env: env_file of postgres. Secret."
  echo "POSTGRES_PASSWORD=$superuser"
  for env in "$SECRETS"/[0-9][0-9]0000.env; do
    [ -f "$env" ] || continue
    code=$(basename "$env" .env)
    password=$(kept "$env" PGPASSWORD)
    [ -n "$password" ] || die "$env: no PGPASSWORD of 32 or more characters A-Za-z0-9_-"
    echo "XSETTLE_DB_PASSWORD_$code=$password"
  done
} >"$SECRETS/postgres.env.new" # not a pipe: die stops the script, the old file stays
publish "$SECRETS/postgres.env"
echo "postgres: $SECRETS/postgres.env written$made"
echo "database passwords ready in $SECRETS (postgres.env, <code>.env), for you only"
