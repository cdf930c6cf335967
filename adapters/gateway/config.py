"""The gateway's configuration: a TOML file, ``XSETTLE_*`` variables over it, flags over both.

One file per province gateway (``deploy/gateway/460000.toml``)::

    province = "460000"
    state_dir = "var"                 # never a temp folder: the province's whole state

    [http]
    host = "0.0.0.0"
    port = 8460

    [review_desk]
    enabled = true                    # DELAYED claims wait for a reviewer

    [tokens]                          # SHA-256 of each bearer token: `xsettle gateway token`
    agency = ["sha256:…"]
    hospital = ["sha256:…"]
    reviewer = ["sha256:…"]
    ops = ["sha256:…"]

    [bus]                             # any setting of bus.settings.BusSettings
    bootstrap = "kafka:9092"

Variables: a top-level setting ``X`` is ``XSETTLE_X``; a setting of a section is
``XSETTLE_<SECTION>_<NAME>`` (``XSETTLE_HTTP_PORT``, ``XSETTLE_TOKENS_AGENCY`` with hashes
separated by commas); the ``[bus]`` settings keep the names they have everywhere else
(``XSETTLE_BOOTSTRAP``, ``XSETTLE_SASL_PASSWORD``). An invalid value is named by where it came
from: ``gateway.toml: line 7: http.port: …``, ``XSETTLE_HTTP_PORT: …`` or ``--port: …``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from adapters.directory import TomlLocator
from adapters.host import DELAYED_DEADLINE_S, INSTANT_DEADLINE_S
from adapters.review_desk import REVIEW_PERIOD_S
from bus.pg import masked_url
from bus.settings import ENV_PREFIX, BusSettings

ROLES: Final = ("agency", "hospital", "reviewer", "ops")
"""Roles that sign in with a bearer token; ``public`` needs none."""
TOKEN_HASH_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
DEFAULT_PORT: Final = 8400
"""The HTTP port when none is configured."""


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of a bearer token: what the configuration stores. Tokens are 32
    random bytes (:func:`new_token`), so a plain SHA-256 cannot be reversed by guessing."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh bearer token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def token_matches(token: str, hashes: tuple[str, ...]) -> bool:
    """Whether ``token`` is one of ``hashes`` (constant time per comparison)."""
    digest = hash_token(token)
    found = False
    for h in hashes:
        found |= hmac.compare_digest(digest, h)
    return found


TokenHash = Annotated[str, Field(pattern=TOKEN_HASH_RE.pattern)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class HttpConfig(_Section):
    """Where the HTTP API listens."""

    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` in a container)."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Port (0: a free one, for tests)."""


class ReviewDeskConfig(_Section):
    """The home's review desk (delayed settlement)."""

    enabled: bool = True
    """DELAYED claims wait for a reviewer; false: the rules answer at once."""
    auto_approve_clean: bool = False
    """Answer at once a DELAYED claim the rules adjust nothing in."""
    review_period_s: float = Field(default=REVIEW_PERIOD_S, gt=0)
    """The host is told to expect the answer this long after the claim arrived."""


class TokenConfig(_Section):
    """SHA-256 hashes of the bearer tokens of each role (several: rotate without downtime)."""

    agency: tuple[TokenHash, ...] = ()
    hospital: tuple[TokenHash, ...] = ()
    reviewer: tuple[TokenHash, ...] = ()
    ops: tuple[TokenHash, ...] = ()

    @field_validator("agency", "hospital", "reviewer", "ops", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):  # from a variable: hashes separated by commas
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    def of(self, role: str) -> tuple[str, ...]:
        """The hashes of ``role``."""
        hashes: tuple[str, ...] = getattr(self, role)
        return hashes


class GatewayConfig(_Section):
    """Everything one province gateway needs."""

    province: str = Field(pattern=r"^\d{2}0000$")
    """The province this gateway runs (must be in the directory)."""
    state_dir: Path = Path("var")
    """Folder of the province's durable state (``province-<code>.sqlite3``)."""
    directory: Path | None = None
    """Directory TOML (None: the packaged default directory)."""
    start_attempts: int = Field(default=10, ge=1)
    """Tries to reach the broker at start before giving up (exit 2)."""
    start_backoff_s: float = Field(default=3.0, gt=0)
    """Pause between those tries (doubling up to 4× this)."""
    instant_deadline_s: float = Field(default=INSTANT_DEADLINE_S, gt=0)
    """How long an INSTANT claim waits for its review before falling back to DELAYED."""
    delayed_deadline_s: float = Field(default=DELAYED_DEADLINE_S, gt=0)
    """How long a DELAYED claim may wait for its review before it is overdue."""
    drain_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM: longest wait for requests and steps in flight before stopping anyway."""
    http: HttpConfig = HttpConfig()
    review_desk: ReviewDeskConfig = ReviewDeskConfig()
    tokens: TokenConfig = TokenConfig()
    bus: BusSettings = BusSettings()

    def bus_settings(self) -> BusSettings:
        """The bus settings with the gateway's state folder."""
        return self.bus.model_copy(update={"state_dir": self.state_dir})


SECTIONS: Final[dict[str, type[BaseModel]]] = {
    "http": HttpConfig,
    "review_desk": ReviewDeskConfig,
    "tokens": TokenConfig,
}
TOP_LEVEL: Final = tuple(n for n in GatewayConfig.model_fields if n not in (*SECTIONS, "bus"))


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` is one line naming where and what."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a setting's value came from: a file line, a variable or a flag."""

    kind: str
    """``file``, ``env`` or ``flag``."""
    name: str
    """The file, the variable or the flag."""
    line: int | None = None


class LoadedConfig:
    """The effective configuration and where each value came from."""

    def __init__(self, config: GatewayConfig, origins: Mapping[tuple[str, ...], Origin]) -> None:
        self.config = config
        self.origins = dict(origins)

    def render(self) -> str:
        """The effective configuration as TOML, secrets hidden, each value's origin in a
        comment (``xsettle gateway --print-config``)."""
        cfg = self.config
        out: list[str] = []

        def line(path: tuple[str, ...], value: object, *, secret: bool = False) -> None:
            origin = self.origins.get(path)
            where = "default"
            if origin is not None:
                where = origin.name + (f":{origin.line}" if origin.line else "")
            if value is None:
                out.append(f"# {path[-1]} is unset  # {where}")
                return
            shown = "'**********'" if secret else _toml_value(value)
            out.append(f"{path[-1]} = {shown}  # {where}")

        for name in TOP_LEVEL:
            line((name,), getattr(cfg, name))
        for section, model in SECTIONS.items():
            out.append(f"\n[{section}]")
            part = getattr(cfg, section)
            for name in model.model_fields:
                value = getattr(part, name)
                if section == "tokens":
                    out.append(
                        f"# {name}: {len(value)} token hash{'es' if len(value) != 1 else ''} "
                        f"(hidden)  # {self._where((section, name))}"
                    )
                    continue
                line((section, name), value)
        out.append("\n[bus]")
        for name in BusSettings.model_fields:
            value = getattr(cfg.bus, name)
            if name == "state_dir":
                continue  # the gateway's state_dir
            if name == "database_url" and value is not None:
                value = masked_url(value)  # the password hidden, where the database shown
            line(("bus", name), value, secret=isinstance(value, SecretStr))
        return "\n".join(out) + "\n"

    def _where(self, path: tuple[str, ...]) -> str:
        origin = self.origins.get(path)
        if origin is None:
            return "default"
        return origin.name + (f":{origin.line}" if origin.line else "")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def env_name(path: tuple[str, ...]) -> str:
    """The variable of a setting: ``XSETTLE_HTTP_PORT``, ``XSETTLE_BOOTSTRAP``."""
    parts = path[1:] if path[0] == "bus" else path
    return ENV_PREFIX + "_".join(parts).upper()


def _env_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [(n,) for n in TOP_LEVEL]
    for section, model in SECTIONS.items():
        paths += [(section, n) for n in model.model_fields]
    paths += [("bus", n) for n in BusSettings.model_fields if n != "state_dir"]
    return paths


def _set(raw: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    target = raw
    for part in path[:-1]:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[:-1])} must be a table")
        target = node
    target[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[tuple[str, ...], tuple[str, object]] | None = None,
) -> LoadedConfig:
    """The effective configuration: ``path`` (TOML; None: none), then ``XSETTLE_*`` variables
    of ``env`` (default: the process's), then ``flags`` (setting path → (flag, value), None
    values ignored). :class:`ConfigError` with one line naming the file and line, the
    variable or the flag, and the setting."""
    source = os.environ if env is None else env
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], Origin] = {}
    text = ""
    file_name = str(path) if path is not None else ""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{path}: cannot read the configuration: {reason}") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for p in _env_paths():
            value: Any = raw
            for part in p:
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                origins[p] = Origin("file", file_name, _line_of(text, p))
    for p in _env_paths():
        name = env_name(p)
        given = source.get(name)
        if given not in (None, ""):
            _set(raw, p, given)
            origins[p] = Origin("env", name)
    for p, (flag, value) in (flags or {}).items():
        if value is not None:
            _set(raw, p, value)
            origins[p] = Origin("flag", flag)
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc, origins, text, file_name)) from None
    return LoadedConfig(config, origins)


def _line_of(text: str, path: tuple[str, ...]) -> int | None:
    """The line of ``key = …`` of a top-level setting or of one in a ``[section]``."""
    section = path[0] if len(path) > 1 else None
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ").split("#")[0].strip()
            continue
        key = stripped.split("=", 1)[0].strip().strip('"')
        if "=" in stripped and key == path[-1] and current == section:
            return number
    return TomlLocator(text).locate(path)[0]


def _first_problem(
    exc: ValidationError,
    origins: Mapping[tuple[str, ...], Origin],
    text: str,
    file_name: str,
) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(str(p) for p in first["loc"] if isinstance(p, str | int))
    field = ".".join(loc) or "<configuration>"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    origin = origins.get(loc[:2]) or origins.get(loc[:1])
    if origin is not None and origin.kind == "env":
        return f"{origin.name}: {field}: {message}{more}"
    if origin is not None and origin.kind == "flag":
        return f"{origin.name}: {field}: {message}{more}"
    if file_name:
        line = origin.line if origin is not None else _line_of(text, loc)
        where = f"line {line}: " if line else ""
        if first["type"] == "missing":
            where = ""
        return f"{file_name}: {where}{field}: {message}{more}"
    return f"{field}: {message}{more}"
