"""One province on the bus: its node, both roles, and its back office, started together.

The province's state is one database: the bus's tables (processed ids, stored answers, pending
requests, the outbox) and the back office's, so that every step commits both in one
transaction. By default a SQLite file, ``province-<code>.sqlite3`` in the state folder, for one
instance; with ``database_url``, a PostgreSQL database that two or more instances of the
province share (:mod:`bus.pg`).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog

from adapters.backoffice import SqlBackOffice
from adapters.clearing import Clearing
from adapters.directory import Directory
from adapters.home import HomeRole
from adapters.host import DELAYED_DEADLINE_S, INSTANT_DEADLINE_S, HostRole
from adapters.reconciliation import Reconciler
from adapters.review_desk import ReviewDeskSettings
from bus.db import Database, SqliteDatabase, open_database
from bus.envelope import now_ms
from bus.node import Node
from bus.settings import BusSettings
from bus.signing import Signer, Trust, Verifier
from bus.store import SqlStore

log = structlog.get_logger(__name__)

ESCALATE_INTERVAL_S = 60.0
"""How often fallen-back claims are checked for escalation."""


def trust_for(province: str, settings: BusSettings, directory: Directory) -> Trust:
    """How ``province`` signs and checks: its key from ``settings.signing_key_file`` (or its
    demo key from the directory), every province's public keys from the directory, and the
    sent-at window from the settings. ``ValueError`` with one clear line when the key does not
    fit the directory."""
    keyring = directory.keyring()
    key_id = settings.signing_key_id
    if key_id is None:
        current = keyring.current(province, now_ms())
        if current is None:
            raise ValueError(f"the directory publishes no key of {province} valid now")
        key_id = current.key_id
    published = keyring.get(key_id)
    if published is None or published.province != province:
        raise ValueError(f"key {key_id} is not a key of {province} in the directory")
    if settings.signing_key_file is not None:
        signer = Signer.from_pem(settings.signing_key_file, province, key_id)
    else:
        entry = next((k for k in directory.keys_of(province) if k.key_id == key_id), None)
        if entry is None or not entry.demo:
            raise ValueError(
                f"{province} signs with {key_id}, which is not a demo key: set "
                "signing_key_file (XSETTLE_SIGNING_KEY_FILE) to its private key"
            )
        signer = Signer.demo(province, key_id)
        if not settings.embedded:
            log.warning(
                "signing_with_demo_key",
                province=province,
                key_id=key_id,
                note="anyone can derive this key: generate one with `xsettle keys generate`",
            )
    if signer.public != published.public:
        raise ValueError(f"the private key does not match {key_id} as the directory publishes it")
    verifier = Verifier(
        keyring,
        clock_skew_ms=settings.clock_skew_s * 1000,
        max_age_ms=settings.max_record_age_s * 1000,
    )
    return Trust(signer, verifier)


def province_database(province: str, settings: BusSettings, folder: Path) -> Database:
    """The province's database: ``database_url`` (PostgreSQL, ``{province}`` replaced by the
    code) when set, else ``province-<code>.sqlite3`` in ``folder``."""
    if settings.database_url:
        return open_database(
            settings.database_url.replace("{province}", province),
            pool_max=settings.database_pool_max,
            application=f"xsettle-{province}",
        )
    return SqliteDatabase(folder / f"province-{province}.sqlite3")


class ProvinceSystem:
    """A province platform: home and host roles over one node and one back office."""

    def __init__(
        self,
        province: str,
        settings: BusSettings,
        *,
        bootstrap: str,
        directory: Directory,
        state_dir: Path | None = None,
        instant_deadline_s: float = INSTANT_DEADLINE_S,
        delayed_deadline_s: float = DELAYED_DEADLINE_S,
        review_desk: ReviewDeskSettings | None = None,
    ) -> None:
        """``review_desk``: the home holds DELAYED claims for a reviewer
        (``self.home.desk``); None: every claim is reviewed at once."""
        folder = state_dir or settings.state_dir
        self._escalator: asyncio.Task[None] | None = None
        self.province = province
        self.directory = directory
        self.db = province_database(province, settings, folder)
        self.node = Node(
            province,
            settings.model_copy(update={"state_dir": folder}),
            bootstrap=bootstrap,
            trust=trust_for(province, settings, directory),
            store=SqlStore(self.db),
        )
        self.backoffice = SqlBackOffice(self.db)
        self.home = HomeRole(
            self.node, directory, self.backoffice, review_desk=review_desk, db=self.db
        )
        self.host = HostRole(
            self.node,
            directory,
            self.backoffice,
            instant_deadline_s=instant_deadline_s,
            delayed_deadline_s=delayed_deadline_s,
        )
        self.reconciler = Reconciler(self.node, self.backoffice, self.db)
        """Daily reconciliation (对账): states this host's days, answers its hosts'."""
        self.clearing = Clearing(self.node, self.backoffice, self.db)
        """Monthly clearing (清算): states this host's months, answers its hosts'."""

    async def start(self) -> ProvinceSystem:
        """Start the node (consuming the province's inbox) and the escalation of fallen-back
        claims whose late review never comes."""
        await self.node.start()
        if self._escalator is None or self._escalator.done():
            self._escalator = asyncio.create_task(self._escalate(), name="escalate-fallbacks")
        return self

    async def _escalate(self) -> None:
        """Every :data:`ESCALATE_INTERVAL_S`: fallen-back claims past the delayed deadline
        become OVERDUE (``HostRole.escalate_fallbacks``), so no claim waits unseen."""
        while True:
            await asyncio.sleep(ESCALATE_INTERVAL_S)
            try:
                await self.host.escalate_fallbacks()
            except Exception:  # a failed round is logged; the next one tries again
                log.exception("escalation_failed", province=self.province)

    async def stop(self) -> None:
        """Stop the escalation and the node. Idempotent."""
        task, self._escalator = self._escalator, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.node.stop()

    def close(self) -> None:
        """Close the durable file (after stop)."""
        self.db.close()
