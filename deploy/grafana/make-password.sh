#!/bin/sh
# Grafana's admin password for docker-compose.yml (service grafana): run once on your machine,
# like deploy/gateway/make-tokens.sh, before `docker compose up grafana`.
#
#   deploy/grafana/make-password.sh             # make it, or keep the one there is
#   deploy/grafana/make-password.sh --force     # throw it away and make a new one
#   deploy/grafana/make-password.sh --out DIR   # write DIR/secrets/ instead of secrets/ here
#
# Writes secrets/grafana.env next to this script (git ignores it; only you may read it):
#   GF_SECURITY_ADMIN_PASSWORD=<password>, the env_file of the grafana service: 32 random
#   bytes in URL-safe base64 (43 characters). It is not printed: sign in at
#   http://localhost:3000 as admin with the password from that file.
# Grafana takes it only when it first creates its database (in the volume grafana-data).
# After a --force, give Grafana the new one:
#   sed -n 's/^GF_SECURITY_ADMIN_PASSWORD=//p' deploy/grafana/secrets/grafana.env |
#     docker compose exec -T grafana grafana cli admin reset-admin-password --password-from-stdin
# Needs a POSIX sh and openssl (OpenSSL or LibreSSL).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$HERE
FORCE=false

die() {
  echo "make-password.sh: $*" >&2
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
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

command -v openssl >/dev/null 2>&1 || die "openssl is not installed"

umask 077
SECRETS=$OUT/secrets
ENV=$SECRETS/grafana.env
mkdir -p "$SECRETS"
chmod 700 "$SECRETS"

if ! $FORCE && grep -Eq '^GF_SECURITY_ADMIN_PASSWORD=[A-Za-z0-9_-]{32,}$' "$ENV" 2>/dev/null; then
  echo "grafana: admin password kept in $ENV"
  exit 0
fi

trap 'rm -f "$ENV.new"' EXIT
password=$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n')
[ ${#password} -eq 43 ] || die "openssl rand gave an unexpected password"
{
  echo "# Made by deploy/grafana/make-password.sh: env_file of the grafana service. Secret."
  echo "GF_SECURITY_ADMIN_PASSWORD=$password"
} >"$ENV.new"
chmod 600 "$ENV.new"
mv "$ENV.new" "$ENV"
echo "grafana: new admin password in $ENV (user admin)"
