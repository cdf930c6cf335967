"""Structure checks of docker-compose.yml, Dockerfile and .dockerignore (no Docker engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not an exact version"


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
