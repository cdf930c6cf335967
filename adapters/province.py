"""One province on the bus: its node, both roles, and its back office, started together.

The province's state is one SQLite file, ``province-<code>.sqlite3`` in the state folder: the
bus's tables (processed ids, stored answers, pending requests, the outbox) and the back
office's, so that every step commits both in one transaction.
"""

from __future__ import annotations

from pathlib import Path

from adapters.backoffice import SqliteBackOffice
from adapters.directory import Directory
from adapters.home import HomeRole
from adapters.host import DELAYED_DEADLINE_S, INSTANT_DEADLINE_S, HostRole
from bus.db import Database
from bus.node import Node
from bus.settings import BusSettings
from bus.store import SqliteStore


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
    ) -> None:
        folder = state_dir or settings.state_dir
        self.province = province
        self.directory = directory
        self.db = Database(folder / f"province-{province}.sqlite3")
        self.node = Node(
            province,
            settings.model_copy(update={"state_dir": folder}),
            bootstrap=bootstrap,
            store=SqliteStore(self.db),
        )
        self.backoffice = SqliteBackOffice(self.db)
        self.home = HomeRole(self.node, directory, self.backoffice)
        self.host = HostRole(
            self.node,
            directory,
            self.backoffice,
            instant_deadline_s=instant_deadline_s,
            delayed_deadline_s=delayed_deadline_s,
        )

    async def start(self) -> ProvinceSystem:
        """Start the node (consuming the province's inbox)."""
        await self.node.start()
        return self

    async def stop(self) -> None:
        """Stop the node and close the stores. Idempotent."""
        await self.node.stop()

    def close(self) -> None:
        """Close the durable file (after stop)."""
        self.db.close()
