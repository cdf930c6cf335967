"""The ``xsettle`` command line itself: version, entry points, global options, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulators.cli import global_options, main

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
    monkeypatch.delenv("XSETTLE_LOG_JSON", raising=False)
    monkeypatch.delenv("XSETTLE_LOG_LEVEL", raising=False)
    assert global_options(argv) == (rest, log_json, level)


def test_log_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSETTLE_LOG_JSON", "1")
    monkeypatch.setenv("XSETTLE_LOG_LEVEL", "error")
    assert global_options(["directory"]) == (["directory"], True, "error")


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
