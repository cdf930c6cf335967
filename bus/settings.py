"""Settings of the bus: frozen, keyword-only, with a constructor from the environment.

Pointing the bus at a Kafka cluster instead of the embedded broker is one setting:
``XSETTLE_BOOTSTRAP=host:9092`` (or ``--bootstrap`` on every command).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "XSETTLE_"
"""Every setting can be given as ``XSETTLE_<FIELD NAME IN CAPITALS>``."""


class BusSettings(BaseModel):
    """How a province node reaches Kafka and keeps its state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    state_dir: Path = Path("var")
    """Folder of the durable state (SQLite files, one per province node)."""
    retry_initial_ms: int = Field(default=100, ge=1)
    """First backoff of a handler's transient failure."""
    retry_max_ms: int = Field(default=5_000, ge=1)
    """Backoff never grows beyond this."""
    retry_attempts: int = Field(default=5, ge=1)
    """Tries of a transiently failing handler before it becomes INTERNAL_ERROR."""
    sweep_interval_ms: int = Field(default=200, ge=10)
    """How often the deadline sweeper looks for overdue requests."""
    retention_s: int = Field(default=7 * 24 * 3600, ge=1)
    """Answered requests and processed message ids are pruned after this long."""

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

    @property
    def producer_idempotence(self) -> bool:
        """Whether the producer asks for idempotence (see ``idempotence``)."""
        return self.idempotence if self.idempotence is not None else not self.embedded
