"""What an operator must know of the bus, as plain data: alarms, errors, dead letters, the
requests waiting for an answer and those owed, metrics.

A :class:`Console` runs two readers as asyncio tasks in the loop of the node(s) it watches:
every error topic and every DLQ topic (or one province's, with ``province=``), from the
beginning, without a consumer group. A third task probes the broker every few seconds. It
knows the contract, not medicine and not money, and serves no HTTP: the gateway's ops router
(:mod:`adapters.gateway.api_ops`) serves it, with the province names of the directory and the
panels the adapters contribute (settlement statistics in yuan, overdue claims).

What is unknown is never shown as zero: while the broker is unreachable or a reader has not
reached it, the counts it would give are ``None`` and :meth:`Console.alarms` says why. A
failed reader, an unreachable broker, a dead worker, a stalled partition and a node that is
not running are alarms.

Everything here runs in the event loop (no lock needed) except the metrics exposition, which
:meth:`Console.metrics` renders in a worker thread so the exporter can read consumer lag from
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import structlog

from bus.codec import Codec
from bus.constants import (
    DLQ_TOPIC_PATTERN,
    ERROR_TOPIC_PATTERN,
    FAMILY_DLQ,
    FAMILY_ERROR,
    H_SOURCE,
    topic,
)
from bus.envelope import header_dict, now_ms
from bus.errors import BusError
from bus.exporter import MetricsSource, registry_for, render
from bus.ops import (
    OVERDUE,
    DeadLetter,
    DeadLetterBook,
    ErrorAggregate,
    ErrorEvent,
    PendingRow,
    coords,
    error_event,
    follow_records,
    owed_report,
    pending_report,
    replay,
)
from bus.settings import BusSettings
from bus.store import Store
from bus.transport import Record, unreachable

log = structlog.get_logger(__name__)

REPLAY_TIMEOUT_S: Final = 30.0
"""Longest a replay asked for by an operator may take."""
RETRY_S: Final = 2.0
"""First pause before a reader that lost the broker starts again (doubling up to
:data:`RETRY_MAX_S`)."""
RETRY_MAX_S: Final = 15.0
"""Longest pause between a failed reader's tries."""
PROBE_INTERVAL_S: Final = 5.0
"""How often the broker is probed (a metadata request)."""
PROBE_TIMEOUT_S: Final = 5.0
"""Longest a probe waits for the broker."""
CONNECT_GRACE_S: Final = 10.0
"""A reader or the broker still connecting after this long is an alarm (before: not yet)."""
ROWS_PER_COUNTERPARTY: Final = 50
"""Requests listed per counterparty (the counts cover all)."""

ReaderPhase = Literal["connecting", "reading", "failed"]


@dataclass(slots=True)
class ReaderState:
    """Where one reader stands: connecting, reading (it reached the broker), or failed."""

    name: str
    """``errors`` or ``dead letters``."""
    phase: ReaderPhase = "connecting"
    """Current phase."""
    since_ms: int = field(default_factory=now_ms)
    """When it entered the phase."""
    error: str | None = None
    """Why it failed (the last failure), else None."""
    records: int = 0
    """Records read since the last (re)start."""
    failures: int = 0
    """Failures since the console started."""

    def enter(self, phase: ReaderPhase, error: str | None = None) -> None:
        """Move to ``phase`` (the time is kept when the phase does not change)."""
        if phase != self.phase:
            self.since_ms = now_ms()
        self.phase = phase
        self.error = error
        if phase == "failed":
            self.failures += 1

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "name": self.name,
            "phase": self.phase,
            "since_ms": self.since_ms,
            "error": self.error,
            "records": self.records,
            "failures": self.failures,
        }


@dataclass(slots=True)
class BrokerState:
    """The last probe of the broker."""

    reachable: bool | None = None
    """True: it answered; False: it did not; None: not probed yet."""
    error: str | None = None
    """Why not, in one line."""
    checked_ms: int | None = None
    """When the last probe finished."""
    since_ms: int = field(default_factory=now_ms)
    """Since when it has been in this state."""

    def set(self, error: str | None) -> None:
        """Record a probe's outcome (None: answered)."""
        reachable = error is None
        if reachable is not self.reachable:
            self.since_ms = now_ms()
        self.reachable = reachable
        self.error = error
        self.checked_ms = now_ms()


@dataclass(frozen=True, slots=True)
class Alarm:
    """Something an operator must look at now."""

    kind: str
    """``broker``, ``reader``, ``worker`` (a worker died), ``stalled`` (a partition's record
    in hand too long) or ``node`` (a node not running)."""
    text: str
    """One line, in the operator's terms."""
    province: str | None = None
    """The province it concerns, when one."""
    since_ms: int | None = None
    """Since when, when known."""

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "kind": self.kind,
            "text": self.text,
            "province": self.province,
            "since_ms": self.since_ms,
        }


class UnknownDeadLetters(LookupError):
    """Dead letters the console has not read (``missing``: their coordinates)."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(f"no such dead letter: {', '.join(missing)}")
        self.missing = list(missing)


class NotReplayable(ValueError):
    """Dead letters that hold only a digest or the coordinates of the original record."""

    def __init__(self, letters: Sequence[str]) -> None:
        super().__init__(
            f"not replayable (the letter holds no copy of the record): {', '.join(letters)}"
        )
        self.letters = list(letters)


def sender_of(letter: DeadLetter) -> str | None:
    """The province that sent the dead-lettered record (its ``xs-source``), if it says."""
    return header_dict(letter.original_headers()).get(H_SOURCE)


def by_counterparty(
    rows: Iterable[PendingRow], *, owed: bool, limit: int = ROWS_PER_COUNTERPARTY
) -> list[dict[str, Any]]:
    """Requests grouped by the other province (the one we wait for, or the one we owe),
    each group's requests oldest first; groups with overdue requests first, then by their
    oldest request."""
    groups: dict[str, list[PendingRow]] = {}
    for row in rows:
        other = (row.source or "?") if owed else row.target
        groups.setdefault(other, []).append(row)
    out: list[dict[str, Any]] = []
    for other, items in groups.items():
        items.sort(key=lambda r: (-r.age_s, r.message_id))
        out.append(
            {
                "counterparty": other,
                "total": len(items),
                "overdue": sum(1 for r in items if r.status == OVERDUE),
                "near": sum(1 for r in items if r.status == "near"),
                "oldest_age_s": round(items[0].age_s, 3),
                "requests": [
                    {
                        **r.to_json(),
                        "province": r.target if owed else r.source,
                        "counterparty": other,
                    }
                    for r in items[:limit]
                ],
            }
        )
    out.sort(key=lambda g: (g["overdue"] == 0, -g["oldest_age_s"], g["counterparty"]))
    return out


class Console:
    """The ops view of one process: readers of the error and DLQ topics, a broker probe,
    the nodes' health and stores. Start it in the nodes' loop; it serves no HTTP."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        *,
        nodes: Sequence[MetricsSource] = (),
        stores: Mapping[str, Store] | None = None,
        province: str | None = None,
        newest_n: int = 50,
        codec: Codec | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        """``nodes``: exported in ``/metrics``, their health watched, their stores read;
        ``stores``: more stores to read pending and owed requests from, by province;
        ``province``: read only that province's error and DLQ topics (None: every one)."""
        self.settings = settings
        self.bootstrap = bootstrap
        self.nodes = list(nodes)
        self.stores: dict[str, Store] = dict(stores or {})
        for node in self.nodes:
            store = getattr(node, "store", None)
            if store is not None:
                self.stores.setdefault(node.province, store)
        self.province = province
        self.codec = codec or Codec()
        self.probe_interval_s = probe_interval_s
        self.broker = BrokerState()
        self.error_reader = ReaderState("errors")
        self.dlq_reader = ReaderState("dead letters")
        self._errors = ErrorAggregate(newest_n=newest_n)
        self._book = DeadLetterBook()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry = registry_for(self.nodes)[0]
        self.started_ms = 0

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether the readers were started."""
        return bool(self._tasks)

    def launch(self) -> None:
        """Start the readers and the broker probe as tasks of the running loop and return at
        once (nothing is awaited: a gateway's start is not delayed). Harmless twice."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._registry = registry_for(self.nodes, self._loop)[0]
        self.started_ms = now_ms()
        self.broker = BrokerState()
        self.error_reader = ReaderState("errors")
        self.dlq_reader = ReaderState("dead letters")
        self._tasks = [
            asyncio.create_task(self._watch_broker(), name="console-broker"),
            asyncio.create_task(
                self._read(self.error_reader, FAMILY_ERROR, ERROR_TOPIC_PATTERN, self._on_error),
                name="console-errors",
            ),
            asyncio.create_task(
                self._read(self.dlq_reader, FAMILY_DLQ, DLQ_TOPIC_PATTERN, self._book.add),
                name="console-dlq",
            ),
        ]
        log.info("console_started", province=self.province or "all", bootstrap=self.bootstrap)

    async def start(self) -> Console:
        """:meth:`launch` from a coroutine."""
        self.launch()
        return self

    async def stop(self) -> None:
        """Stop the readers and the probe; harmless twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Console:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the tasks ------------------------------------------------------------------------
    async def _probe(self) -> str | None:
        """None when the broker answered a metadata request in time, else why not."""
        return await unreachable(self.settings, self.bootstrap, timeout_s=PROBE_TIMEOUT_S)

    async def _watch_broker(self) -> None:
        while True:
            why = await self._probe()
            if why is not None and self.broker.reachable is not False:
                log.warning("console_broker_unreachable", bootstrap=self.bootstrap, error=why)
            elif why is None and self.broker.reachable is False:
                log.info("console_broker_reachable", bootstrap=self.bootstrap)
            self.broker.set(why)
            await asyncio.sleep(self.probe_interval_s)

    def _source(self, family: str, pattern: str) -> dict[str, Any]:
        if self.province:
            return {"topics": [topic(family, self.province)]}
        return {"pattern": pattern}

    def _on_error(self, rec: Record) -> None:
        self._errors.add(error_event(rec, self.codec))

    async def _read(
        self,
        state: ReaderState,
        family: str,
        pattern: str,
        take: Callable[[Record], object],
    ) -> None:
        """Follow ``family``'s topics from the beginning into ``take``; on a failure say so
        (an alarm), wait, and read again from the beginning."""
        pause = RETRY_S
        while True:
            try:
                why = await self._probe()
                if why is not None:
                    raise BusError(f"broker unreachable: {why}")
                state.records = 0
                state.enter("reading")
                pause = RETRY_S
                source = follow_records(
                    self.settings,
                    self.bootstrap,
                    since="beginning",
                    name=f"console-{family}",
                    **self._source(family, pattern),
                )
                async with contextlib.aclosing(source) as records:
                    async for rec in records:
                        take(rec)
                        state.records += 1
                raise BusError("the reader stopped")
            except (BusError, OSError) as exc:
                why = _one_line(exc)
                news = state.phase != "failed" or state.error != why
                state.enter("failed", why)
                if news:  # once per cause, not once per retry
                    log.warning("console_reader_failed", reader=state.name, error=why)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)
            if family == FAMILY_ERROR:  # read again from the beginning: count afresh
                self._errors = ErrorAggregate(newest_n=self._errors.newest_n)

    # --- what it knows --------------------------------------------------------------------
    def known(self, reader: ReaderState) -> bool:
        """Whether ``reader``'s counts can be trusted now: the broker answers and the reader
        reaches it. Else they are unknown, never zero."""
        return self.broker.reachable is True and reader.phase == "reading"

    def alarms(self, now: int | None = None) -> list[Alarm]:
        """What an operator must look at now, the broker first."""
        now = now or now_ms()
        out: list[Alarm] = []
        started = self.started_ms or now
        broker = self.broker
        if not self.started:
            out.append(Alarm("reader", "the console's readers are not running"))
        elif broker.reachable is False:
            out.append(
                Alarm(
                    "broker",
                    f"broker {self.bootstrap} unreachable: {broker.error}",
                    since_ms=broker.since_ms,
                )
            )
        elif broker.reachable is None and now - started > CONNECT_GRACE_S * 1000:
            out.append(
                Alarm("broker", f"broker {self.bootstrap} has not answered yet", since_ms=started)
            )
        for reader in (self.error_reader, self.dlq_reader):
            if not self.started or broker.reachable is False:
                break  # the broker's alarm says why
            if reader.phase == "failed":
                out.append(
                    Alarm(
                        "reader",
                        f"the {reader.name} reader cannot read (retrying): {reader.error}",
                        since_ms=reader.since_ms,
                    )
                )
            elif reader.phase == "connecting" and now - reader.since_ms > CONNECT_GRACE_S * 1000:
                out.append(
                    Alarm(
                        "reader",
                        f"the {reader.name} reader has not reached the broker yet",
                        since_ms=reader.since_ms,
                    )
                )
        for health in self.health():
            province = str(health.get("province") or "")
            failure = health.get("failure")
            if failure:
                out.append(
                    Alarm(
                        "worker",
                        f"a worker of {province} died: {failure} (the process must restart)",
                        province=province,
                    )
                )
            for part in health.get("stalled") or ():
                out.append(
                    Alarm(
                        "stalled",
                        f"partition {part} of {province} is stalled: a record in hand for over "
                        "60 s",
                        province=province,
                    )
                )
            if health.get("running") is False and not failure:
                out.append(Alarm("node", f"the node of {province} is not running", province))
        return out

    def health(self) -> list[dict[str, Any]]:
        """``health()`` of every node that has one (stalled partitions, a dead worker)."""
        out: list[dict[str, Any]] = []
        for node in self.nodes:
            check = getattr(node, "health", None)
            if callable(check):
                try:
                    out.append(dict(check()))
                except Exception as exc:  # a health check that fails is itself news
                    out.append({"province": node.province, "ok": False, "failure": _one_line(exc)})
        return out

    def errors_json(self, newest: int | None = None) -> dict[str, Any]:
        """Error reports: counts by code, origin and responsible province, by code ×
        responsible province, and the newest (masked); ``total`` None while unknown."""
        data = self._errors.to_json(newest)
        known = self.known(self.error_reader)
        return {
            **data,
            "known": known,
            "total": data["total"] if known else None,
            "reader": self.error_reader.to_json(),
        }

    def newest_errors(self) -> list[ErrorEvent]:
        """The newest error events, newest first."""
        return list(self._errors.newest)[::-1]

    def letters(self) -> list[DeadLetter]:
        """Every dead letter read, oldest first, with its replay state."""
        return self._book.letters()

    def dlq_json(self, limit: int = 500) -> dict[str, Any]:
        """Dead letters, newest first (at most ``limit``), each with its sender; counts None
        while unknown."""
        letters = self._book.letters()
        known = self.known(self.dlq_reader)
        waiting = sum(1 for d in letters if d.replayed_at_ms is None)
        return {
            "known": known,
            "count": len(letters) if known else None,
            "not_replayed": waiting if known else None,
            "reader": self.dlq_reader.to_json(),
            "letters": [
                {**d.to_json(), "sender": sender_of(d), "replayable": d.replayable}
                for d in reversed(letters[-limit:] if limit else [])
            ],
        }

    def dlq_letter(self, coordinates: str) -> DeadLetter | None:
        """One dead letter by ``topic:partition:offset``, or None."""
        return self._book.get(coordinates)

    def dlq_show(self, coordinates: str) -> dict[str, Any] | None:
        """One dead letter decoded as far as possible (masked), or None."""
        found = self._book.get(coordinates)
        if found is None:
            return None
        return {
            **found.to_json(),
            "sender": sender_of(found),
            "replayable": found.replayable,
            "preview": found.decoded_preview(self.codec),
        }

    async def replay(
        self,
        wanted: Iterable[tuple[str, int, int]],
        *,
        send: Callable[[list[DeadLetter]], Awaitable[int]] | None = None,
    ) -> dict[str, Any]:
        """Replay the dead letters at these (topic, partition, offset): all or none. Raises
        :class:`UnknownDeadLetters` or :class:`NotReplayable` before sending anything."""
        names = list(dict.fromkeys(coords(t, p, o) for t, p, o in wanted))
        found = {n: self._book.get(n) for n in names}
        missing = [n for n, d in found.items() if d is None]
        if missing:
            raise UnknownDeadLetters(missing)
        letters = [d for d in found.values() if d is not None]
        refused = [d.coordinates for d in letters if not d.replayable or not d.original_topic]
        if refused:
            raise NotReplayable(refused)

        async def default(ls: list[DeadLetter]) -> int:
            return await replay(self.settings, self.bootstrap, ls)

        count = await asyncio.wait_for((send or default)(letters), REPLAY_TIMEOUT_S)
        at = now_ms()
        for letter in letters[:count]:
            self._book.mark_replayed(letter.coordinates, at)
        return {"replayed": count, "letters": [d.coordinates for d in letters[:count]]}

    def pending_json(self, now: int | None = None) -> dict[str, Any]:
        """What we wait for from each province (``awaited``) and what we owe each
        (``owed``), by counterparty, oldest first."""
        now = now or now_ms()
        awaited = [row for store in self.stores.values() for row in pending_report(store, now)]
        owed = [row for p, store in self.stores.items() for row in owed_report(store, p, now)]
        return {
            "now_ms": now,
            "awaited": by_counterparty(awaited, owed=False),
            "owed": by_counterparty(owed, owed=True),
            "awaited_total": len(awaited),
            "awaited_overdue": sum(1 for r in awaited if r.status == OVERDUE),
            "owed_total": len(owed),
            "owed_overdue": sum(1 for r in owed if r.status == OVERDUE),
        }

    def overview_json(self) -> dict[str, Any]:
        """Alarms first, then the counts (None where unknown), the broker, the readers and
        the nodes' health."""
        now = now_ms()
        pending = self.pending_json(now)
        errors_known = self.known(self.error_reader)
        dlq_known = self.known(self.dlq_reader)
        letters = self._book.letters()
        alarms = self.alarms(now)
        return {
            "now_ms": now,
            "scope": self.province,
            "ok": not alarms,
            "alarms": [a.to_json() for a in alarms],
            "counts": {
                "errors": self._errors.total if errors_known else None,
                "dead_letters": len(letters) if dlq_known else None,
                "dead_letters_not_replayed": (
                    sum(1 for d in letters if d.replayed_at_ms is None) if dlq_known else None
                ),
                "awaited": pending["awaited_total"],
                "awaited_overdue": pending["awaited_overdue"],
                "owed": pending["owed_total"],
                "owed_overdue": pending["owed_overdue"],
            },
            "broker": {
                "bootstrap": self.bootstrap,
                "reachable": self.broker.reachable,
                "error": self.broker.error,
                "checked_ms": self.broker.checked_ms,
            },
            "readers": [self.error_reader.to_json(), self.dlq_reader.to_json()],
            "nodes": self.health(),
        }

    async def metrics(self) -> bytes:
        """The Prometheus text exposition of the nodes' metrics, rendered in a worker thread
        (so consumer lag can be read from this loop)."""
        return await asyncio.to_thread(render, self._registry)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
