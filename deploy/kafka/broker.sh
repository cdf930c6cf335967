#!/usr/bin/env bash
# Entrypoint of the compose `kafka` service (apache/kafka image). It replaces the image's own
# start script, which cannot do two things this cluster needs:
#   - register the SCRAM logins when the storage is formatted (kafka-storage.sh format
#     --add-scram): the broker's own login (admin, inter-broker) must exist before it starts,
#     and no province may log in before its principal exists;
#   - put the secrets into server.properties: the image turns KAFKA_* variables into
#     properties but silently drops every variable whose value contains '=' (JAAS lines do).
# Otherwise it starts the broker as the image does: each KAFKA_<NAME> variable becomes the
# property <name> ('_' -> '.', '__' -> '_', '___' -> '-', lower case), the storage (a folder
# in the container: no volume) is formatted unless it already is, and kafka-server-start.sh
# runs in the foreground.
#
# JAAS logins per SASL listener of KAFKA_LISTENER_SECURITY_PROTOCOL_MAP:
#   the controller listener   PLAIN, the single user admin (SCRAM cannot authenticate
#                             controllers: its users live in the metadata they serve)
#   the inter-broker listener SCRAM-SHA-512, the broker logs in as admin
#   any other SASL listener   SCRAM-SHA-512 (users from the metadata)
#
# Reads KAFKA_* and CLUSTER_ID (docker-compose.yml), the provinces (PROVINCES_FILE), and from
# secrets/broker.env (make-certs.sh) KEYSTORE_PASSWORD and SCRAM_PASSWORD_<PRINCIPAL> of admin,
# ops, demo and p<code> per province. The passwords are passed to kafka-storage.sh as
# arguments (its only way), visible to `ps` inside the container while it formats.
set -euo pipefail
umask 077 # the rendered properties hold passwords

KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
PROVINCES_FILE=${PROVINCES_FILE:-/opt/xsettle/provinces.txt}
CONFIG=${BROKER_CONFIG:-/tmp/xsettle-server.properties}
SCRAM="SCRAM-SHA-512"
SCRAM_LOGIN=org.apache.kafka.common.security.scram.ScramLoginModule
PLAIN_LOGIN=org.apache.kafka.common.security.plain.PlainLoginModule

die() {
  echo "broker.sh: $*" >&2
  exit 1
}

principals() {
  printf '%s\n' admin ops demo
  local code
  while read -r code; do
    [[ $code =~ ^[0-9]{2}0000$ ]] || die "$PROVINCES_FILE: $code is not a province code"
    printf 'p%s\n' "$code"
  done < <(grep -Ev '^[[:space:]]*(#|$)' "$PROVINCES_FILE")
}

secret() { # the value of variable $1: set, and safe inside a JAAS line and --add-scram
  local value=${!1:-}
  [[ -n $value ]] || die "$1 is not set: run deploy/kafka/make-certs.sh (secrets/broker.env)"
  [[ $value =~ ^[A-Za-z0-9._~+/-]+$ ]] || die "$1 may hold only letters, digits and ._~+/-"
  printf '%s' "$value"
}

property_name() { # KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL -> sasl.mechanism.inter.broker.protocol
  local key=${1#KAFKA_}
  key=${key//___/-}
  key=${key//__/$'\x01'}
  key=${key//_/.}
  key=${key//$'\x01'/_}
  printf '%s' "${key,,}"
}

render() {
  local name listener protocol admin keystore
  admin=$(secret SCRAM_PASSWORD_ADMIN)
  keystore=$(secret KEYSTORE_PASSWORD)
  echo "# Rendered by deploy/kafka/broker.sh from the KAFKA_* variables and secrets/broker.env."
  for name in $(compgen -e | sort); do
    case $name in
      KAFKA_OPTS | KAFKA_HEAP_OPTS | KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_GC_LOG_OPTS | \
        KAFKA_LOG4J_OPTS | KAFKA_JMX_OPTS | KAFKA_HOME | KAFKA_VERSION | KAFKA_DEBUG) ;;
      KAFKA_*) printf '%s=%s\n' "$(property_name "$name")" "${!name}" ;;
    esac
  done
  printf 'ssl.keystore.password=%s\nssl.key.password=%s\n' "$keystore" "$keystore"
  local map=${KAFKA_LISTENER_SECURITY_PROTOCOL_MAP:?KAFKA_LISTENER_SECURITY_PROTOCOL_MAP is not set}
  for entry in ${map//,/ }; do
    listener=${entry%%:*}
    protocol=${entry#*:}
    [[ $protocol == SASL_* ]] || continue
    name=${listener,,}
    if [[ $listener == "${KAFKA_CONTROLLER_LISTENER_NAMES:-}" ]]; then
      printf 'listener.name.%s.plain.sasl.jaas.config=%s required username="admin" password="%s" user_admin="%s";\n' \
        "$name" "$PLAIN_LOGIN" "$admin" "$admin"
    elif [[ $listener == "${KAFKA_INTER_BROKER_LISTENER_NAME:-}" ]]; then
      printf 'listener.name.%s.%s.sasl.jaas.config=%s required username="admin" password="%s";\n' \
        "$name" "${SCRAM,,}" "$SCRAM_LOGIN" "$admin"
    else
      printf 'listener.name.%s.%s.sasl.jaas.config=%s required;\n' "$name" "${SCRAM,,}" "$SCRAM_LOGIN"
    fi
  done
}

format() {
  local principal password
  local -a args=(format --ignore-formatted --cluster-id "${CLUSTER_ID:?CLUSTER_ID is not set}"
    --config "$CONFIG")
  while read -r principal; do
    password=$(secret "SCRAM_PASSWORD_${principal^^}")
    args+=(--add-scram "$SCRAM=[name=$principal,password=$password]")
  done < <(principals)
  "$KAFKA_HOME/bin/kafka-storage.sh" "${args[@]}"
}

principals >/dev/null # a bad province code stops here, not inside a pipe
render >"$CONFIG"
format
echo "broker.sh: SCRAM logins of $(principals | tr '\n' ' ')registered; starting Kafka"
exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$CONFIG"
