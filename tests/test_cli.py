"""The ``xsettle`` command line itself: version, entry points, global options, usage errors,
settings from ``XSETTLE_*`` under the flags, and ports already taken."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.broker import EmbeddedBroker, PortInUse
from simulators.cli import GlobalOptions, build_parser, global_options, main, settings_from

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulators", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def test_version_and_python_dash_m() -> None:
    """``python -m simulators --version`` names the installed version."""
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("xsettle 0.")


@pytest.mark.parametrize(
    ("argv", "rest", "log_json", "level"),
    [
        (["directory", "--log-json"], ["directory"], True, None),
        (["--log-json", "directory", "--json"], ["directory", "--json"], True, None),
        (["ops", "errors", "--log-level", "debug"], ["ops", "errors"], False, "debug"),
        (["ops", "--log-level=warning", "errors"], ["ops", "errors"], False, "warning"),
        (["ops", "--", "--log-json"], ["ops", "--", "--log-json"], False, None),
    ],
)
def test_log_options_anywhere(
    argv: list[str], rest: list[str], log_json: bool, level: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name in ("XSETTLE_LOG_JSON", "XSETTLE_LOG_LEVEL", "XSETTLE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    assert global_options(argv) == GlobalOptions(rest, log_json, level)


def test_log_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSETTLE_LOG_JSON", "1")
    monkeypatch.setenv("XSETTLE_LOG_LEVEL", "error")
    monkeypatch.setenv("XSETTLE_DEBUG", "1")
    assert global_options(["directory"]) == GlobalOptions(["directory"], True, "error", True)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["directory", "--log-level", "foo"], "--log-level foo: use one of debug"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["demo", "--visits", "abc"], "--visits abc"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert says in err
    assert err.endswith("(see xsettle --help)\n")


def test_a_closed_pipe_is_no_traceback() -> None:
    """``xsettle directory | head -1``: the reader leaves early; no BrokenPipeError."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators", "directory", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # like head after its first line
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err
    assert b"BrokenPipeError" not in err


@pytest.mark.parametrize(
    ("argv", "env", "code", "says"),
    [
        (["simulate", "--except", "abc"], {}, 2, "--except abc: not a province of the directory"),
        (["simulate", "--except", "999999"], {}, 2, "--except 999999: not a province"),
        (["province", "120000"], {}, 2, "province 120000: not a province of the directory"),
        (["province", "460000"], {}, 2, "needs --bootstrap"),
        (["directory", "--host", "999999"], {}, 2, "--host 999999: not a province"),
        (["ops", "errors", "--province", "999999"], {}, 2, "999999: not a province code"),
        (["demo", "--scenario", "/nonexistent.toml"], {}, 2, "cannot read the scenario"),
        (["ops", "errors"], {"XSETTLE_PARTITIONS": "abc"}, 2, "XSETTLE_PARTITIONS"),
        (["ops", "errors"], {}, 1, "is a broker running there?"),
        (["ops", "console", "--port", "99999"], {}, 2, "99999 is not a TCP port (0..65535)"),
        (["demo", "--console", "http"], {}, 2, "'http' is not a port number"),
    ],
)
def test_bad_input_is_one_line_and_the_right_exit_code(
    argv: list[str], env: dict[str, str], code: int, says: str
) -> None:
    """Each bad input of the operators' list: one line naming it, exit 2 for usage and
    configuration, 1 for a failure while working (nothing listens on port 1)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    environ |= {"XSETTLE_BOOTSTRAP": "127.0.0.1:1", **env}
    if argv[0] == "province" and "--bootstrap" not in argv and argv[1] == "460000":
        environ.pop("XSETTLE_BOOTSTRAP")
    done = run(*argv, env=environ)
    assert done.returncode == code, done.stderr
    (failure,) = done.stderr.splitlines()  # nothing else: no Kafka client lines either
    assert failure.startswith("xsettle ")
    assert says in failure


def test_scenario_files_that_cannot_work(tmp_path: Path) -> None:
    """A TOML syntax error names the file; a silent home outside the directory is refused."""
    broken = tmp_path / "broken.toml"
    broken.write_text("claims = \n", encoding="utf-8")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[faults]\nsilent_home = "999999"\n', encoding="utf-8")
    for path, says in ((broken, "not valid TOML"), (unknown, "silent_home 999999")):
        done = run("demo", "--scenario", str(path))
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            line for line in done.stderr.strip().splitlines() if line.startswith("xsettle demo")
        ]
        assert f"{path}" in done.stderr
        assert says in done.stderr


def test_debug_shows_the_traceback() -> None:
    done = run("--debug", "demo", "--scenario", "/nonexistent.toml")
    assert done.returncode == 1
    assert "Traceback" in done.stderr


# --- settings from the environment: a flag over XSETTLE_*, XSETTLE_* over the default ------------
def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


STATE_DIR_COMMANDS = (
    ["demo"],
    ["province", "460000"],
    ["simulate", "--except", "460000"],
    ["ops", "pending"],
    ["ops", "claims", "--province", "460000"],
    ["ops", "console"],
)
"""Every command with a state folder (the gateway reads XSETTLE_STATE_DIR in its config)."""


@pytest.mark.parametrize("argv", STATE_DIR_COMMANDS, ids=" ".join)
def test_state_dir_from_the_environment_and_the_flag_over_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XSETTLE_STATE_DIR", "/srv/from-env")
    assert _parse(argv).state_dir == "/srv/from-env"
    assert _parse([*argv, "--state-dir", "/srv/flag"]).state_dir == "/srv/flag"
    assert settings_from(_parse(argv)).state_dir == Path("/srv/from-env")


def test_without_either_a_required_state_dir_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("XSETTLE_STATE_DIR", raising=False)
    assert _parse(["province", "460000"]).state_dir is None  # a new temporary folder
    with pytest.raises(SystemExit) as stopped:
        main(["ops", "pending"])
    assert stopped.value.code == 2
    assert "--state-dir" in capsys.readouterr().err


def test_every_bus_setting_from_the_environment_and_flags_over_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XSETTLE_PARTITIONS", "6")
    monkeypatch.setenv("XSETTLE_BOOTSTRAP", "env:9092")
    monkeypatch.setenv("XSETTLE_STATE_DIR", "/srv/env")
    settings = settings_from(_parse(["province", "460000", "--bootstrap", "flag:9092"]))
    assert settings.partitions == 6
    assert settings.bootstrap == "flag:9092"
    assert settings.state_dir == Path("/srv/env")
    assert settings.model_fields_set >= {"partitions", "bootstrap", "state_dir"}
    monkeypatch.delenv("XSETTLE_STATE_DIR")
    assert "state_dir" not in settings_from(_parse(["province", "460000"])).model_fields_set


def test_the_gateway_takes_its_state_dir_from_the_environment(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    environ["XSETTLE_STATE_DIR"] = str(tmp_path / "env")
    done = run("gateway", "--province", "460000", "--print-config", env=environ)
    assert done.returncode == 0, done.stderr
    assert f'state_dir = "{tmp_path / "env"}"' in done.stdout
    done = run(
        "gateway", "--province", "460000", "--state-dir", str(tmp_path / "flag"),
        "--print-config", env=environ,
    )  # fmt: skip
    assert f'state_dir = "{tmp_path / "flag"}"' in done.stdout


def test_ops_pending_reads_the_folder_of_the_environment(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    environ["XSETTLE_STATE_DIR"] = str(tmp_path)
    done = run("ops", "pending", env=environ)
    assert f"no node store at {tmp_path}/" in done.stderr


def test_the_demo_refuses_a_state_dir_holding_a_previous_day(tmp_path: Path) -> None:
    """A previous day's files would be taken for this day's: one line, exit 2, before any
    broker is started."""
    (tmp_path / "province-130000.sqlite3").write_bytes(b"")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    environ["XSETTLE_STATE_DIR"] = str(tmp_path)
    done = run("demo", "--quiet", env=environ)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"xsettle demo: state folder {tmp_path} holds a previous run")


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_province_keeps_its_state_in_xsettle_state_dir(tmp_path: Path) -> None:
    """``xsettle province`` with XSETTLE_STATE_DIR and no --state-dir writes its database
    and desk journal there (and says so)."""
    folder = tmp_path / "hainan"
    async with EmbeddedBroker() as broker:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
        environ |= {"XSETTLE_STATE_DIR": str(folder), "XSETTLE_BOOTSTRAP": broker.bootstrap,
                    "XSETTLE_IDEMPOTENCE": "false"}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators", "province", "460000", "--filings", "0",
            "--visits", "0", "--wait", "0", "--timeout", "5", cwd=ROOT, env=environ,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"state in {folder}" in out.decode()
    assert (folder / "province-460000.sqlite3").is_file()
    assert (folder / "hospital-desk-460000.jsonl").is_file()


# --- ports -----------------------------------------------------------------------------------
@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other process (this test) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_broker_on_a_taken_port_is_one_line_and_exit_2(taken_port: int) -> None:
    """Instead of starting Tansu, which would fail to listen while the clients talked to
    whatever holds the port."""
    done = run("broker", "--port", str(taken_port), "--no-topics")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"xsettle broker: port 127.0.0.1:{taken_port} is in use: choose another with --port "
        "or stop the process using it"
    ]


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_broker_port_outside_1_65535_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["broker", "--port", port])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --port:" in err


@pytest.mark.broker
async def test_the_embedded_broker_refuses_a_port_another_process_answers_on(
    taken_port: int,
) -> None:
    with pytest.raises(PortInUse, match=f"port 127.0.0.1:{taken_port} is in use"):
        await EmbeddedBroker(port=taken_port).start()


def test_a_gateway_on_a_taken_port_is_one_line_and_exit_2(taken_port: int, tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    done = run(
        "gateway", "--province", "460000", "--port", str(taken_port), "--state-dir",
        str(tmp_path), "--bootstrap", "127.0.0.1:1", env=environ,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"xsettle gateway: port {taken_port} on 127.0.0.1 is taken")
