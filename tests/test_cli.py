"""The ``xsettle`` command line itself: version, entry points, global options, usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.cli import GlobalOptions, global_options, main

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
    failure = [line for line in done.stderr.splitlines() if line.startswith("xsettle ")]
    assert len(failure) == 1, done.stderr
    assert says in failure[0]
    assert "Traceback" not in done.stderr


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
