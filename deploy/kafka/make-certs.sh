#!/usr/bin/env bash
# Certificates and passwords of the secured docker-compose cluster: run once on your machine,
# before `docker compose up`.
#
#   deploy/kafka/make-certs.sh                  # CA, broker keystore, a password per principal
#   deploy/kafka/make-certs.sh --client-certs   # also a client certificate per province (mTLS)
#   deploy/kafka/make-certs.sh --force          # throw everything away and make it again
#
# Writes, next to this script (or under --out DIR), nothing of which is committed (.gitignore):
#   ca/ca.key                  the CA's private key; stays here, no container sees it
#   secrets/ca.crt             the CA certificate: XSETTLE_SSL_CAFILE of every client
#   secrets/broker.p12         the broker's key and certificate (names kafka, localhost,
#                              127.0.0.1), PKCS12, locked with KEYSTORE_PASSWORD
#   secrets/broker.env         KEYSTORE_PASSWORD and SCRAM_PASSWORD_<PRINCIPAL> of every
#                              principal: the kafka service's env_file (broker.sh)
#   secrets/admin.properties   Kafka CLI client settings of User:admin (topics and acls
#                              services, the broker's healthcheck)
#   secrets/<principal>.env    XSETTLE_SASL_USERNAME and XSETTLE_SASL_PASSWORD of admin, ops,
#                              demo and p<code> for each province of provinces.txt
#   secrets/p<code>.crt, .key  with --client-certs: a client certificate CN=p<code> for a
#                              cluster that authenticates provinces by certificate (mTLS)
#
# Run again, it keeps what exists (passwords included) and adds only what is missing, e.g. the
# principal of a province added to provinces.txt; a broker keystore older than the CA is
# made again. Passwords are random (48 hex digits), never defaults.
#
# The containers run as other users than you (uid 1000 in apache/kafka, 10001 in xsettle), so
# secrets/ is readable by everyone on this machine; the CA key is not. On a shared machine,
# give secrets/ to those uids instead. Needs bash (3.2 will do) and openssl (OpenSSL or
# LibreSSL).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE
PROVINCES_FILE=${PROVINCES_FILE:-$HERE/provinces.txt}
CLIENT_CERTS=false
FORCE=false
CA_DAYS=3650
CERT_DAYS=825

die() {
  echo "make-certs.sh: $*" >&2
  exit 1
}

while (($#)); do
  case $1 in
    --client-certs) CLIENT_CERTS=true ;;
    --force) FORCE=true ;;
    --out)
      [[ $# -ge 2 ]] || die "--out needs a folder"
      OUT=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

command -v openssl >/dev/null || die "openssl is not installed"
[[ -r $PROVINCES_FILE ]] || die "no province list at $PROVINCES_FILE"

read -r -a PROVINCES <<<"$(grep -Ev '^[[:space:]]*(#|$)' "$PROVINCES_FILE" | tr '\n' ' ')"
((${#PROVINCES[@]})) || die "no provinces in $PROVINCES_FILE"
for code in "${PROVINCES[@]}"; do
  [[ $code =~ ^[0-9]{2}0000$ ]] || die "$PROVINCES_FILE: $code is not a province code"
done
PRINCIPALS=(admin ops demo)
for code in "${PROVINCES[@]}"; do
  PRINCIPALS+=("p$code")
done

CA_DIR=$OUT/ca
SECRETS=$OUT/secrets
if $FORCE; then
  rm -rf "$CA_DIR" "$SECRETS"
fi
mkdir -p "$CA_DIR" "$SECRETS"
chmod 700 "$CA_DIR"
chmod 755 "$SECRETS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- passwords: kept from an earlier broker.env, new ones for the rest ---------------------------
# (a plain file, no associative array: macOS ships bash 3.2)
KNOWN=$WORK/passwords
touch "$KNOWN"
if [[ -f $SECRETS/broker.env ]]; then
  grep -E '^(KEYSTORE_PASSWORD|SCRAM_PASSWORD_[A-Z0-9]+)=[0-9a-f]+$' "$SECRETS/broker.env" \
    >"$KNOWN" || true
fi

variable() { printf 'SCRAM_PASSWORD_%s' "$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"; }

password() { # the password kept under variable $1, made the first time it is asked for
  local value
  value=$(grep -E "^$1=" "$KNOWN" | head -n 1 | cut -d= -f2)
  if [[ -z $value ]]; then
    value=$(openssl rand -hex 24)
    echo "$1=$value" >>"$KNOWN"
  fi
  printf '%s' "$value"
}

KEYSTORE_PASSWORD=$(password KEYSTORE_PASSWORD)
{
  echo "# Made by deploy/kafka/make-certs.sh: passwords of the compose cluster (kafka service)."
  echo "KEYSTORE_PASSWORD=$KEYSTORE_PASSWORD"
  for principal in "${PRINCIPALS[@]}"; do
    var=$(variable "$principal")
    echo "$var=$(password "$var")"
  done
} >"$WORK/broker.env"
mv "$WORK/broker.env" "$SECRETS/broker.env"

for principal in "${PRINCIPALS[@]}"; do
  {
    echo "# Made by deploy/kafka/make-certs.sh: the SCRAM login of User:$principal."
    echo "XSETTLE_SASL_USERNAME=$principal"
    echo "XSETTLE_SASL_PASSWORD=$(password "$(variable "$principal")")"
  } >"$SECRETS/$principal.env"
done

{
  echo "# Made by deploy/kafka/make-certs.sh: Kafka CLI tools as User:admin, in the compose network."
  echo "security.protocol=SASL_SSL"
  echo "sasl.mechanism=SCRAM-SHA-512"
  printf 'sasl.jaas.config=%s required username="admin" password="%s";\n' \
    org.apache.kafka.common.security.scram.ScramLoginModule "$(password SCRAM_PASSWORD_ADMIN)"
  echo "ssl.truststore.type=PEM"
  echo "ssl.truststore.location=/etc/kafka/secrets/ca.crt"
} >"$SECRETS/admin.properties"

# --- certificates, with options OpenSSL 1.1.1, 3.x and LibreSSL all know --------------------------
new_key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1"; }

cat >"$WORK/openssl.cnf" <<'CONFIG'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[broker]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:kafka,DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
CONFIG

request() { # request <key> <common name> <out csr>
  openssl req -new -key "$1" -subj "/O=xsettle compose/CN=$2" -config "$WORK/openssl.cnf" \
    -out "$3"
}

sign() { # sign <csr> <extensions section of openssl.cnf> <out crt>
  openssl x509 -req -in "$1" -CA "$SECRETS/ca.crt" -CAkey "$CA_DIR/ca.key" -CAcreateserial \
    -CAserial "$CA_DIR/ca.srl" -days "$CERT_DAYS" -sha256 \
    -extfile "$WORK/openssl.cnf" -extensions "$2" -out "$3" 2>/dev/null
}

if [[ ! -f $SECRETS/ca.crt || ! -f $CA_DIR/ca.key ]]; then
  new_key "$CA_DIR/ca.key"
  openssl req -x509 -new -key "$CA_DIR/ca.key" -sha256 -days "$CA_DAYS" \
    -subj "/O=xsettle compose/CN=xsettle compose CA" -config "$WORK/openssl.cnf" \
    -extensions ca -out "$SECRETS/ca.crt"
  rm -f "$SECRETS/broker.p12"
  echo "made the CA: $SECRETS/ca.crt"
fi
chmod 600 "$CA_DIR/ca.key"

if [[ ! -f $SECRETS/broker.p12 || $SECRETS/ca.crt -nt $SECRETS/broker.p12 ]]; then
  new_key "$WORK/broker.key"
  request "$WORK/broker.key" kafka "$WORK/broker.csr"
  sign "$WORK/broker.csr" broker "$WORK/broker.crt"
  KEYSTORE_PASSWORD=$KEYSTORE_PASSWORD openssl pkcs12 -export -name kafka \
    -inkey "$WORK/broker.key" -in "$WORK/broker.crt" -certfile "$SECRETS/ca.crt" \
    -passout env:KEYSTORE_PASSWORD -out "$SECRETS/broker.p12"
  echo "made the broker keystore: $SECRETS/broker.p12"
fi

if $CLIENT_CERTS; then
  for code in "${PROVINCES[@]}"; do
    name=p$code
    if [[ -f $SECRETS/$name.crt && -f $SECRETS/$name.key &&
      ! $SECRETS/ca.crt -nt $SECRETS/$name.crt ]]; then
      continue
    fi
    new_key "$SECRETS/$name.key"
    request "$SECRETS/$name.key" "$name" "$WORK/$name.csr"
    sign "$WORK/$name.csr" client "$SECRETS/$name.crt"
  done
  echo "client certificates: $SECRETS/p<code>.crt and .key"
fi

chmod 644 "$SECRETS"/*
echo "secrets ready in $SECRETS (principals: ${PRINCIPALS[*]})"
