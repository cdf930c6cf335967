"""The gateway's configuration and start-up refusals: TOML, then XSETTLE_* variables, then
flags; one clear line and exit code 2 for what cannot run; secrets never printed."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.gateway.config import (
    ConfigError,
    hash_token,
    load_config,
    new_token,
    token_matches,
)

GOOD = """\
province = "460000"
state_dir = "{state}"

[http]
host = "127.0.0.1"
port = 8461

[tokens]
hospital = ["{hash}"]

[bus]
bootstrap = "127.0.0.1:9"
partitions = 3
"""


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def good(tmp_path: Path) -> Path:
    return write(tmp_path, GOOD.format(state=tmp_path / "state", hash=hash_token("t0k")))


def xsettle(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with only the variables given (plus PATH and HOME)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    return subprocess.run(
        [sys.executable, "-m", "simulators.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestLoad:
    def test_file_values_are_read(self, tmp_path: Path) -> None:
        loaded = load_config(good(tmp_path), env={})
        assert loaded.config.province == "460000"
        assert loaded.config.http.port == 8461
        assert loaded.config.bus.bootstrap == "127.0.0.1:9"
        assert loaded.config.bus_settings().state_dir == tmp_path / "state"

    def test_variables_override_the_file_and_flags_override_both(self, tmp_path: Path) -> None:
        env = {"XSETTLE_HTTP_PORT": "8500", "XSETTLE_BOOTSTRAP": "kafka:9092"}
        loaded = load_config(good(tmp_path), env=env)
        assert loaded.config.http.port == 8500
        assert loaded.config.bus.bootstrap == "kafka:9092"
        flagged = load_config(good(tmp_path), env=env, flags={("http", "port"): ("--port", "8600")})
        assert flagged.config.http.port == 8600

    def test_token_hashes_from_a_variable_are_split_on_commas(self, tmp_path: Path) -> None:
        a, b = hash_token("a"), hash_token("b")
        loaded = load_config(good(tmp_path), env={"XSETTLE_TOKENS_OPS": f"{a}, {b}"})
        assert loaded.config.tokens.ops == (a, b)

    def test_a_bad_value_in_the_file_names_file_line_and_field(self, tmp_path: Path) -> None:
        path = write(tmp_path, good(tmp_path).read_text().replace("8461", '"eighty"'), "b.toml")
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value).startswith(f"{path}: line 6: http.port: ")
        assert "\n" not in str(caught.value)

    def test_an_unknown_setting_is_refused_with_its_line(self, tmp_path: Path) -> None:
        text = good(tmp_path).read_text().replace("partitions = 3", "partitons = 3")
        path = write(tmp_path, text, "typo.toml")
        with pytest.raises(ConfigError, match=r"line 13: bus.partitons: Extra inputs"):
            load_config(path, env={})

    def test_a_bad_variable_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"^XSETTLE_HTTP_PORT: http.port: .*65535"):
            load_config(good(tmp_path), env={"XSETTLE_HTTP_PORT": "70000"})

    def test_a_bad_flag_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"^--province: province: String should match"):
            load_config(good(tmp_path), env={}, flags={("province",): ("--province", "4600")})

    def test_invalid_toml_and_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2"):
            load_config(write(tmp_path, 'province = "460000"\n[http\n'), env={})
        with pytest.raises(ConfigError, match="cannot read the configuration"):
            load_config(tmp_path / "absent.toml", env={})

    def test_a_plain_token_is_not_a_hash(self, tmp_path: Path) -> None:
        path = write(tmp_path, GOOD.format(state=tmp_path, hash="plain-token"))
        with pytest.raises(ConfigError, match=r"line 9: tokens.hospital.0: String should match"):
            load_config(path, env={})

    def test_the_printed_configuration_hides_secrets(self, tmp_path: Path) -> None:
        env = {
            "XSETTLE_SECURITY_PROTOCOL": "SASL_SSL",
            "XSETTLE_SASL_MECHANISM": "SCRAM-SHA-512",
            "XSETTLE_SASL_USERNAME": "p460000",
            "XSETTLE_SASL_PASSWORD": "hunter2-very-secret",
        }
        text = load_config(good(tmp_path), env=env).render()
        assert "hunter2" not in text
        assert hash_token("t0k") not in text
        assert "sasl_password = '**********'  # XSETTLE_SASL_PASSWORD" in text
        assert f"port = 8461  # {tmp_path / 'gateway.toml'}:6" in text
        assert "# hospital: 1 token hash (hidden)" in text


class TestTokens:
    def test_a_token_matches_its_hash_only(self) -> None:
        token = new_token()
        assert token_matches(token, (hash_token("other"), hash_token(token)))
        assert not token_matches(token + "x", (hash_token(token),))
        assert len(token) >= 43


class TestRefusals:
    """``xsettle gateway`` refuses to start with one line on stderr and exit code 2."""

    def test_invalid_configuration(self, tmp_path: Path) -> None:
        path = write(tmp_path, good(tmp_path).read_text().replace("8461", "-1"), "c.toml")
        done = xsettle("gateway", "--config", str(path))
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"xsettle gateway: {path}: line 6: http.port: Input should be greater than or "
            "equal to 0"
        ]

    def test_province_not_in_the_directory(self, tmp_path: Path) -> None:
        done = xsettle("gateway", "--config", str(good(tmp_path)), "--province", "990000")
        assert done.returncode == 2
        assert "province 990000 is not in the directory" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

    def test_state_folder_not_writable(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        done = xsettle("gateway", "--config", str(good(tmp_path)), "--state-dir", str(blocker))
        assert done.returncode == 2
        assert f"state folder {blocker} is not writable" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

    def test_port_taken(self, tmp_path: Path) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            done = xsettle("gateway", "--config", str(good(tmp_path)), "--port", str(port))
        assert done.returncode == 2
        assert done.stderr.strip() == f"xsettle gateway: port {port} on 127.0.0.1 is taken " + (
            "(http.port)"
        )

    def test_unreachable_broker_is_tried_a_bounded_number_of_times(self, tmp_path: Path) -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]  # bound, never listening: connections are refused
            env = {"XSETTLE_START_ATTEMPTS": "3", "XSETTLE_START_BACKOFF_S": "0.1"}
            done = xsettle(
                "gateway",
                "--config",
                str(good(tmp_path)),
                "--port",
                "0",
                "--bootstrap",
                f"127.0.0.1:{port}",
                env=env,
            )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        attempts = [line for line in lines if "broker_unreachable" in line]
        assert [a.split("attempt=")[1].split()[0] for a in attempts] == ["1/3", "2/3", "3/3"]
        assert lines[-1] == f"xsettle gateway: broker 127.0.0.1:{port} unreachable after 3 tries"
        assert len(lines) == 4  # one per try and the refusal: no client noise

    async def test_unreachable_database_is_tried_a_bounded_number_of_times(
        self, tmp_path: Path, broker: str
    ) -> None:
        env = {"XSETTLE_START_ATTEMPTS": "2", "XSETTLE_START_BACKOFF_S": "0.1"}
        url = f"postgresql://xs:s3cret@/xsettle_130000?host={tmp_path}"  # no server there
        done = await asyncio.to_thread(
            xsettle, "gateway", "--config", str(good(tmp_path)), "--port", "0",
            "--bootstrap", broker, "--database-url", url, env=env,
        )  # fmt: skip
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        attempts = [line for line in lines if "database_unreachable" in line]
        assert [a.split("attempt=")[1].split()[0] for a in attempts] == ["1/2", "2/2"]
        assert lines[-1] == (
            f"xsettle gateway: database postgresql://xs:***@/xsettle_130000?host={tmp_path} "
            "unreachable after 2 tries (bus.database_url)"
        )
        assert "s3cret" not in done.stderr

    def test_print_config_shows_the_database_without_its_password(self, tmp_path: Path) -> None:
        done = xsettle(
            "gateway", "--config", str(good(tmp_path)), "--print-config",
            env={"XSETTLE_DATABASE_URL": "postgresql://xs:s3cret@db:5432/xsettle_130000"},
        )  # fmt: skip
        assert done.returncode == 0
        assert 'database_url = "postgresql://xs:***@db:5432/xsettle_130000"' in done.stdout
        assert "s3cret" not in done.stdout

    def test_print_config_exits_zero_without_secrets(self, tmp_path: Path) -> None:
        done = xsettle(
            "gateway",
            "--config",
            str(good(tmp_path)),
            "--print-config",
            env={"XSETTLE_SASL_PASSWORD": "s3cret-pw"},
        )
        # SASL password without SASL protocol is refused, naming the variable, not the value
        assert done.returncode == 2
        assert "s3cret-pw" not in done.stderr + done.stdout
        assert "sasl_password (XSETTLE_SASL_PASSWORD)" in done.stderr
        ok = xsettle("gateway", "--config", str(good(tmp_path)), "--print-config")
        assert ok.returncode == 0
        assert 'province = "460000"' in ok.stdout

    def test_new_token_prints_a_token_and_its_hash(self) -> None:
        done = xsettle("gateway", "--new-token", "reviewer")
        assert done.returncode == 0
        lines = [line.strip() for line in done.stdout.splitlines()]
        token = lines[1]
        assert f'reviewer = ["{hash_token(token)}"]' in lines


class TestPublicTokens:
    """The repository's well-known test tokens only work on a loopback address."""

    def test_off_loopback_they_are_refused(self, tmp_path: Path) -> None:
        from adapters.gateway.service import GatewayRefused, refuse_test_tokens_off_loopback

        local = load_config(Path("deploy/gateway/local/460000.toml"), env={}).config
        refuse_test_tokens_off_loopback(local)  # 127.0.0.1: fine
        exposed = local.model_copy(
            update={"http": local.http.model_copy(update={"host": "10.1.2.3"})}
        )
        with pytest.raises(GatewayRefused, match=r"tokens\.agency holds the public test token"):
            refuse_test_tokens_off_loopback(exposed)

    def test_the_local_configurations_load(self) -> None:
        for code in ("130000", "460000"):
            config = load_config(Path(f"deploy/gateway/local/{code}.toml"), env={}).config
            assert config.province == code
            assert config.http.host == "127.0.0.1"
