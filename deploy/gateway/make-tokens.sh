#!/bin/sh
# Bearer tokens of the province gateways of docker-compose.yml: run once on your machine, like
# deploy/kafka/make-certs.sh, before `docker compose up gateway-<code>-a gateway-<code>-b`.
#
#   deploy/gateway/make-tokens.sh             # a token per role for every <code>.toml here
#   deploy/gateway/make-tokens.sh 460000      # only these provinces
#   deploy/gateway/make-tokens.sh --force     # throw the tokens away and make new ones
#   deploy/gateway/make-tokens.sh --out DIR   # write DIR/secrets/ instead of secrets/ here
#
# Writes, into secrets/ next to this script (git ignores it; only you may read it):
#   secrets/<code>.tokens   the plain tokens, <role>=<token> one a line, for roles agency,
#                           hospital, reviewer and ops: give each to the systems of that role.
#                           They are kept nowhere else: not printed, not in compose.
#   secrets/<code>.env      XSETTLE_TOKENS_<ROLE>=sha256:<hex> one a line: the env_file of
#                           the services gateway-<code>-a and -b. The gateways keep only
#                           these hashes.
#
# Run again, it keeps every token and makes only the missing ones (a new province, a role
# without a token) and writes the .env files again from the .tokens files. To replace one
# token, delete its line from <code>.tokens, run again, then `docker compose up -d
# gateway-<code>-a gateway-<code>-b` (compose recreates the containers with the new hashes).
# Tokens are 32 random bytes in URL-safe base64 (43 characters), as `xsettle gateway
# --new-token ROLE` makes them.
# Needs a POSIX sh and openssl (OpenSSL or LibreSSL).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$HERE
FORCE=false
ROLES="agency hospital reviewer ops" # adapters/gateway/config.py ROLES
CODES=""

die() {
  echo "make-tokens.sh: $*" >&2
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

if [ -z "$CODES" ]; then # every gateway configuration next to this script
  for file in "$HERE"/*.toml; do
    [ -f "$file" ] || continue
    CODES="$CODES $(basename "$file" .toml)"
  done
  [ -n "$CODES" ] || die "no <code>.toml in $HERE: name the provinces"
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

new_token() { # 32 random bytes, URL-safe base64 without padding: 43 characters
  openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n'
}

hash_of() { # sha256:<hex> of a token, as adapters.gateway.config.hash_token makes it
  digest=$(printf '%s' "$1" | openssl dgst -sha256 | awk '{print $NF}')
  case $digest in
    *[!0-9a-f]*) die "openssl dgst gave an unexpected digest" ;;
  esac
  [ ${#digest} -eq 64 ] || die "openssl dgst gave an unexpected digest"
  printf 'sha256:%s' "$digest"
}

upper() { printf '%s' "$1" | tr '[:lower:]' '[:upper:]'; }

for code in $CODES; do
  tokens=$SECRETS/$code.tokens
  env=$SECRETS/$code.env
  if $FORCE; then
    rm -f "$tokens" "$env"
  fi
  made=""
  {
    echo "# Made by deploy/gateway/make-tokens.sh: bearer tokens of gateway $code. Secret."
    for role in $ROLES; do
      token=""
      if [ -f "$tokens" ]; then
        token=$(grep -E "^$role=" "$tokens" | head -n 1 | cut -d= -f2-) || true
      fi
      if [ -z "$token" ]; then
        token=$(new_token)
        made="$made $role"
      fi
      case $token in
        *[!A-Za-z0-9_-]*) die "$tokens: the $role token has other characters than A-Za-z0-9_-" ;;
      esac
      [ ${#token} -ge 32 ] || die "$tokens: the $role token is shorter than 32 characters"
      echo "$role=$token"
    done
  } >"$tokens.new"
  {
    echo "# Made by deploy/gateway/make-tokens.sh from $code.tokens: env_file of gateway-$code."
    grep -E '^[a-z]+=' "$tokens.new" | while IFS='=' read -r role token; do
      echo "XSETTLE_TOKENS_$(upper "$role")=$(hash_of "$token")"
    done
  } >"$env.new"
  chmod 600 "$tokens.new" "$env.new"
  mv "$tokens.new" "$tokens"
  mv "$env.new" "$env"
  if [ -n "$made" ]; then
    echo "gateway $code: new tokens for$made in $tokens"
  else
    echo "gateway $code: tokens kept in $tokens"
  fi
done
echo "token hashes ready in $SECRETS (<code>.env); the tokens are in <code>.tokens, for you only"
