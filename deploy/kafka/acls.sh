#!/usr/bin/env bash
# The ACLs of the compose cluster, added by the one-shot `acls` service as User:admin once the
# broker is healthy. Adding an ACL that exists changes nothing, so it may run again.
#
#   acls.sh           add them (kafka-acls.sh, one call per principal, operation and pattern)
#   acls.sh --print   print them, one a line, and contact nobody:
#                     <principal> <operation> <resource type> <pattern type> <name>
#
# The broker refuses whatever is not granted here (allow.everyone.if.no.acl.found=false);
# User:admin is a super user and needs no ACL. For each province P of provinces.txt, User:pP:
#   Write     xsettle.{filing,claim,settlement,reply,error}.Q of every other province Q: its
#             requests, replies and error reports to them
#   Write     xsettle.error.P (the copy of a report for its own ops) and xsettle.dlq.P
#   Read      its own xsettle.{filing,claim,settlement,reply,error,dlq}.P, nobody else's
#   Read      consumer groups whose name starts with xsettle-P (bus/node.py: xsettle-<P>)
#   Describe  every topic starting with xsettle.: topic names and partitions only, no records.
#             A node lists the contract topics before it creates missing ones
#             (bus/broker.py create_contract_topics); listing only what it may read or write,
#             it would miss the other provinces' xsettle.dlq.Q and be refused creating them.
# and nothing else: no Create (the `topics` service creates the topics as admin), no Delete,
# Alter or cluster operation, no write to its own inbox, no read of another province's topic.
# User:ops   Read every xsettle.error.* and xsettle.dlq.* topic (`xsettle ops errors`, `dlq`).
# User:demo  Read and Write every xsettle.* topic, Read every xsettle-* group: the demo and
#            `xsettle simulate` run many provinces in one process, with one login.
set -euo pipefail

PROVINCES_FILE=${PROVINCES_FILE:-/opt/xsettle/provinces.txt}
BOOTSTRAP=${BOOTSTRAP:-kafka:9092}
COMMAND_CONFIG=${COMMAND_CONFIG:-/etc/kafka/secrets/admin.properties}
KAFKA_ACLS=${KAFKA_ACLS:-/opt/kafka/bin/kafka-acls.sh}
INBOX_FAMILIES=(filing claim settlement reply error)
FAMILIES=(filing claim settlement reply error dlq)

die() {
  echo "acls.sh: $*" >&2
  exit 1
}

provinces() {
  local code
  while read -r code; do
    [[ $code =~ ^[0-9]{2}0000$ ]] || die "$PROVINCES_FILE: $code is not a province code"
    printf '%s\n' "$code"
  done < <(grep -Ev '^[[:space:]]*(#|$)' "$PROVINCES_FILE")
}

rows() {
  local p q f
  local -a all
  provinces >/dev/null # a bad code stops the script here, not in the process substitution
  mapfile -t all < <(provinces)
  ((${#all[@]})) || die "no provinces in $PROVINCES_FILE"
  for p in "${all[@]}"; do
    for q in "${all[@]}"; do
      [[ $q == "$p" ]] && continue
      for f in "${INBOX_FAMILIES[@]}"; do
        echo "User:p$p Write topic literal xsettle.$f.$q"
      done
    done
    echo "User:p$p Write topic literal xsettle.error.$p"
    echo "User:p$p Write topic literal xsettle.dlq.$p"
    for f in "${FAMILIES[@]}"; do
      echo "User:p$p Read topic literal xsettle.$f.$p"
    done
    echo "User:p$p Read group prefixed xsettle-$p"
    echo "User:p$p Describe topic prefixed xsettle."
  done
  echo "User:ops Read topic prefixed xsettle.error."
  echo "User:ops Read topic prefixed xsettle.dlq."
  echo "User:demo Read topic prefixed xsettle."
  echo "User:demo Write topic prefixed xsettle."
  echo "User:demo Read group prefixed xsettle-"
}

apply() {
  local principal operation type pattern name key
  local -A names=()
  local -a order=() args
  while read -r principal operation type pattern name; do
    key="$principal $operation $type $pattern"
    [[ -v "names[$key]" ]] || order+=("$key")
    names[$key]+=" $name"
  done < <(rows)
  for key in "${order[@]}"; do
    read -r principal operation type pattern <<<"$key"
    args=(--bootstrap-server "$BOOTSTRAP" --command-config "$COMMAND_CONFIG" --add
      --allow-principal "$principal" --operation "$operation" --resource-pattern-type "$pattern")
    for name in ${names[$key]}; do
      args+=("--$type" "$name")
    done
    "$KAFKA_ACLS" "${args[@]}" >/dev/null
    echo "acls.sh: $principal may $operation $(wc -w <<<"${names[$key]}") ${type} ${pattern} pattern(s)"
  done
  echo "acls.sh: done"
}

case ${1:-} in
  --print) rows ;;
  "")
    rows >/dev/null # a bad province list stops here, before anything is added
    apply
    ;;
  *) die "unknown option $1 (--print, or nothing)" ;;
esac
