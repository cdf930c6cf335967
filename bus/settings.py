"""Settings of the bus: frozen, keyword-only, with a constructor from the environment.

Pointing the bus at a Kafka cluster instead of the embedded broker is one setting:
``XSETTLE_BOOTSTRAP=host:9092`` (or ``--bootstrap`` on every command).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

ENV_PREFIX = "XSETTLE_"
"""Every setting can be given as ``XSETTLE_<FIELD NAME IN CAPITALS>``."""


class BusSettings(BaseModel):
    """How a province node reaches Kafka and keeps its state."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
    """Errors name the setting but never echo the input, which may hold ``sasl_password``
    (a model-level error would print every value given, secrets included)."""

    bootstrap: str | None = None
    """``host:port[,host:port]`` of an external Kafka cluster; None starts the embedded broker."""
    client_id: str = "xsettle"
    """Prefix of the Kafka client ids, visible in broker logs."""
    partitions: int = Field(default=3, ge=1)
    """Partitions per contract topic when the bus creates topics."""
    replication_factor: int = Field(default=1, ge=1)
    """Replication of topics the bus creates (1 on the embedded broker, 3 on a real cluster)."""
    idempotence: bool | None = None
    """Idempotent producer. None means: off on the embedded broker (its build cannot do it,
    InitProducerId fails), on against an external cluster."""
    acks: Literal["all", 1, 0] = "all"
    """A record counts as sent once every in-sync replica has it."""
    linger_ms: int = Field(default=2, ge=0)
    """How long the producer waits to fill a batch; small, because answers are awaited."""
    max_batch_size: int = Field(default=256 * 1024, ge=1024)
    """Producer batch size in bytes per partition."""
    compression: Literal["gzip", "lz4", "zstd", "snappy"] | None = None
    """Producer compression; off by default since Avro records are already compact."""
    fetch_max_wait_ms: int = Field(default=25, ge=0)
    """How long the broker may hold a fetch with no data. Instant settlement waits on every
    hop, and an empty fetch is held for the whole wait: 500 ms (the client default) made a
    round trip 250 ms; 25 ms makes it 16 ms at the cost of more idle fetches."""
    fetch_max_records: int = Field(default=500, ge=1)
    """Records taken from the consumer per batch."""
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    """Kafka client request timeout."""
    session_timeout_ms: int = Field(default=6_000, ge=1000)
    """How long the group waits for a silent member before giving its partitions away. It
    bounds how soon a crashed province's restart gets its inbox back: on the embedded broker
    a restarted member got its partitions after 18.1 s with the client's 10 s, 11.1 s with
    6 s. 6 s is the smallest a Kafka broker accepts by default
    (``group.min.session.timeout.ms``)."""
    heartbeat_interval_ms: int = Field(default=1_500, ge=100)
    """Heartbeats to the group coordinator; a quarter of ``session_timeout_ms``, so three
    may be lost before the member is."""
    group_instance_id: str | None = None
    """Static group membership: a name for this process that stays the same across restarts
    (e.g. ``hainan-a``); each consumer joins as ``<name>-<consumer name>``. A restarted member
    with the same name takes its partitions back without waiting for the session timeout
    (6.0 s instead of 11.1 s on the embedded broker), but a static member does not leave on a
    clean stop either, and its first join took 6.0 s instead of 3.0 s. Two processes must
    never share a name (the broker fences one). None: dynamic membership."""

    # --- Kafka security: TLS and SASL (a secured cluster; the embedded broker has neither) --
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How every Kafka client of the bus talks to the brokers. PLAINTEXT: no TLS, no login
    (the embedded broker). SSL: TLS; with ``ssl_certfile`` the client certificate is the
    identity (mTLS). SASL_SSL: TLS and a SASL login (docker-compose.yml: SCRAM-SHA-512, one
    principal per province). SASL_PLAINTEXT: a login without TLS, so records cross the
    network readable (and with PLAIN the password too). Anything but PLAINTEXT needs
    ``bootstrap``."""
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    """SASL mechanism of SASL_SSL / SASL_PLAINTEXT; required with them, refused without."""
    sasl_username: str | None = None
    """SASL user: the province's principal (``p460000`` in docker-compose.yml)."""
    sasl_password: SecretStr | None = None
    """SASL password; never printed (``repr`` and logs show ``**********``)."""
    ssl_cafile: Path | None = None
    """PEM file of the CA(s) that signed the brokers' certificates (SSL / SASL_SSL); None:
    the system's trusted CAs."""
    ssl_certfile: Path | None = None
    """PEM client certificate (chain) for mTLS; needs ``ssl_keyfile``."""
    ssl_keyfile: Path | None = None
    """PEM private key of ``ssl_certfile`` (unencrypted; the same path as ``ssl_certfile``
    when both are in one file)."""
    ssl_check_hostname: bool = True
    """The broker's certificate must name the host dialled (as advertised by the cluster).
    Turning it off keeps the CA check but lets any certificate of that CA pass as any broker:
    only for a broker whose advertised name differs from its certificate's, never in production."""

    state_dir: Path = Path("var")
    """Folder of the durable state (SQLite files, one per province node)."""
    database_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    """A PostgreSQL database for the province's state instead of its SQLite file in
    ``state_dir`` (``postgresql://user@host:5432/xsettle_130000``; the password from the URL,
    ``PGPASSWORD`` or ``~/.pgpass``). Every instance of one province names the same database;
    ``{province}`` in it is replaced by the province code (several provinces on one server)."""
    database_pool_max: int = Field(default=8, ge=2, le=100)
    """Most connections one instance opens to ``database_url`` (besides the one that holds its
    liveness lock)."""
    retry_initial_ms: int = Field(default=100, ge=1)
    """First backoff of a handler's transient failure."""
    retry_max_ms: int = Field(default=5_000, ge=1)
    """Backoff never grows beyond this."""
    retry_attempts: int = Field(default=5, ge=1)
    """Tries of a transiently failing handler before it becomes INTERNAL_ERROR."""
    sweep_interval_ms: int = Field(default=200, ge=10)
    """How often the deadline sweeper looks for overdue requests."""
    ack_window_s: int = Field(default=300, ge=1)
    """A request with neither answer nor acknowledgement this long after its last send is
    sent again (same id, ``xs-attempt`` + 1): a lost record surfaces in minutes, not at a
    7-day deadline. Requests whose deadline comes first are left to the deadline."""
    unacknowledged_sends: int = Field(default=4, ge=1)
    """Sends of a request that is never acknowledged (the first and the re-sends): a province
    that does not acknowledge (an older one) is not re-sent to for ever; its answer still
    closes the request."""
    retention_s: int = Field(default=7 * 24 * 3600, ge=1)
    """Answered requests and processed message ids are pruned after this long."""

    # --- trust: signed records (bus.signing) and the signed message log (bus.audit) ------
    signing_key_file: Path | None = None
    """PEM file of this province's private signing key (Ed25519, PKCS#8). None: the demo
    key derived from the province code, which the default directory publishes and anyone can
    derive: for simulations only, never for real money."""
    signing_key_id: str | None = None
    """Key id of ``signing_key_file`` as the directory publishes it (``xs-key-id``); None:
    the province's newest key in the directory valid now."""
    clock_skew_s: int = Field(default=300, ge=0)
    """A record whose ``xs-sent-at`` is more than this in the future is refused
    (SIGNATURE_INVALID): clocks of two provinces may differ by this much."""
    max_record_age_s: int = Field(default=2 * 24 * 3600, ge=60)
    """A record whose ``xs-sent-at`` is older than this is refused (SIGNATURE_INVALID):
    replays are caught by message id within the retention, and this bounds how old a record
    may be. It must stay below ``retention_s`` and covers how long a province may lag behind
    its inbox (a backlog older than this is dead-lettered, not handled)."""
    audit_retention_days: int = Field(default=5 * 365, ge=1)
    """Entries of the signed message log are kept this long (disputes, audits)."""

    @model_validator(mode="after")
    def _windows_fit(self) -> BusSettings:
        if self.max_record_age_s >= self.retention_s:
            raise ValueError(
                f"max_record_age_s ({self.max_record_age_s}) must be below retention_s "
                f"({self.retention_s}): older records could no longer be recognised as replays"
            )
        if self.audit_retention_days * 86_400 < self.max_record_age_s:
            raise ValueError("audit_retention_days must cover max_record_age_s")
        return self

    @model_validator(mode="after")
    def _security_fits(self) -> BusSettings:
        protocol = self.security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol in ("SSL", "SASL_SSL")
        sasl_values = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username or None,
            "sasl_password": (self.sasl_password.get_secret_value() or None)
            if self.sasl_password is not None
            else None,
        }
        if sasl:
            missing = [_named(name) for name, value in sasl_values.items() if value is None]
            if missing:
                raise ValueError(f"security_protocol {protocol} needs {', '.join(missing)}")
        else:
            for name, value in sasl_values.items():
                if value is not None:
                    raise ValueError(
                        f"{_named(name)} is set, but security_protocol {protocol} has no SASL "
                        "login and would ignore it: use SASL_SSL (or SASL_PLAINTEXT), or unset it"
                    )
        files = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        if not tls:
            given = [name for name, path in files.items() if path is not None]
            if "ssl_check_hostname" in self.model_fields_set:
                given.append("ssl_check_hostname")
            if given:
                raise ValueError(
                    f"{_named(given[0])} is set, but security_protocol {protocol} has no TLS and "
                    "would ignore it: use SSL or SASL_SSL, or unset it"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            has, lacks = (
                ("ssl_certfile", "ssl_keyfile")
                if self.ssl_keyfile is None
                else ("ssl_keyfile", "ssl_certfile")
            )
            raise ValueError(
                f"{_named(has)} needs {_named(lacks)} (the client certificate and its private "
                "key; the same path when both are in one file)"
            )
        for name, path in files.items():
            if path is not None and not path.is_file():
                raise ValueError(f"{_named(name)}: {path} does not exist or is not a file")
        if protocol != "PLAINTEXT" and self.embedded:
            raise ValueError(
                f"security_protocol {protocol} needs an external cluster ({_named('bootstrap')}): "
                "the embedded broker speaks PLAINTEXT only, with no TLS, login or ACLs"
            )
        return self

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> BusSettings:
        """Settings from ``XSETTLE_*`` variables, then ``overrides`` (None values ignored)."""
        source = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = source.get(ENV_PREFIX + name.upper())
            if raw not in (None, ""):
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    @property
    def embedded(self) -> bool:
        """True when the bus runs on the embedded broker."""
        return self.bootstrap is None

    def with_bootstrap(self, bootstrap: str, *, embedded: bool = False) -> BusSettings:
        """A copy pointed at ``bootstrap``; ``embedded`` keeps the embedded broker's limits."""
        update: dict[str, object] = {"bootstrap": bootstrap}
        if embedded and self.idempotence is None:
            update["idempotence"] = False
        return self.model_copy(update=update)

    def kafka_security(self) -> dict[str, Any]:
        """The security keyword arguments of every aiokafka client (producer, consumer,
        admin): ``security_protocol``, with TLS an ``ssl_context``, with SASL
        ``sasl_mechanism``, ``sasl_plain_username`` and ``sasl_plain_password`` (aiokafka
        0.14 takes the SCRAM user and password under these ``plain`` names too).

        The TLS context is what ``aiokafka.helpers.create_ssl_context(cafile=, certfile=,
        keyfile=)`` builds (``ssl.create_default_context`` for server authentication, then
        the client certificate), made here so that ``bus.transport`` stays the only module
        importing aiokafka; it is read from the files on every call, so a renewed certificate
        is used by the next client. Raises ValueError when a file is not a valid PEM.
        """
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            try:
                context = ssl.create_default_context(
                    ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile
                )
                if self.ssl_certfile is not None:
                    context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ValueError(
                    f"cannot load the TLS files (ssl_cafile={self.ssl_cafile}, "
                    f"ssl_certfile={self.ssl_certfile}, ssl_keyfile={self.ssl_keyfile}): {exc}"
                ) from exc
            context.check_hostname = self.ssl_check_hostname
            kwargs["ssl_context"] = context
        if self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            assert self.sasl_password is not None  # the validator requires it with SASL
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    @property
    def producer_idempotence(self) -> bool:
        """Whether the producer asks for idempotence (see ``idempotence``)."""
        return self.idempotence if self.idempotence is not None else not self.embedded


def _named(field: str) -> str:
    """A setting's name with the variable it is read from, for error messages."""
    return f"{field} ({ENV_PREFIX}{field.upper()})"
