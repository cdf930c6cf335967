"""Conformance kit: ``xsettle conformance`` plays the counterpart provinces of a province P
(written by anyone, in any language, connected to the same broker) and reports, check by
check, whether P honours the wire contract (docs/contract.md).

The kit speaks only Kafka, Avro and Ed25519, as P's partners do. It signs as counterpart
provinces that P's directory knows, with their private keys (the demo keys of a directory with
``demo_keys = true``, or ``--keys DIR``): as a **home** whose region has an agreement with P it
files persons with P (P is the host), and as a **host** with which P's regions have an
agreement it sends claims to P (P is the home), and then, for claims P reviewed, settlement
notices, reversals and the day's and the month's statements. It reads the replies and error
reports P sends to those provinces, P's own error topic and P's dead-letter topic.

A home only reviews a claim of a person it filed itself, and nothing on the wire makes a home
file someone, so the claim checks use persons P has filed with the kit's host provinces: the
kit reads the ``FilingUpload`` records P sent to those hosts' filing topics (newest first),
answers the ones still open with a ``FilingReceipt`` as a host would, and takes their persons.
Without such filings the claim checks are skipped and say so. Those filings are P's own
requests: ``headers.requests`` checks their headers, ids and signatures.

A settlement notice has no answer, so the kit cannot see P record it; it sends, under the same
key (the same partition, read in order), a notice of a claim P never reviewed right after it:
when P's INVALID_MESSAGE about that one arrives, P is past the first. Only then does a check
state a day or a month that needs the notice. P compares a day's statement with every notice
from that host settled that day, so each reconciliation check settles on a past day of its
own (within the person's filing; from ``--seed``), first stating it empty to see that P has
no settlement on it from an earlier run.

Every check is independent: fresh person, filing and claim ids from ``--seed``, its own
records, its own time limit (``--check-timeout``). A check that expects a refusal waits
:data:`GRACE_S` after the refusal for an answer that must not come (a refused record is
never handled).

Output: one line per check ``PASS|FAIL|SKIP <id> — <what it checks>; <why>``, then
``N checks: P passed, F failed, S skipped``. Exit code 0 when nothing failed, 1 when a check
failed, 2 for a usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from adapters import clearing, reconciliation
from adapters.directory import Agreement, Directory, province_of
from adapters.rules import item_amount_fen, max_advance_fen
from bus.codec import Codec, SchemaStore
from bus.constants import (
    DLQ_HEADER_PREFIX,
    ERROR_TEXT_MAX,
    FAMILY_CLAIM,
    FAMILY_DLQ,
    FAMILY_ERROR,
    FAMILY_FILING,
    FAMILY_REPLY,
    FAMILY_SETTLEMENT,
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DEADLINE,
    H_DLQ_CONTENT,
    H_DLQ_DETECTED_AT,
    H_DLQ_ERROR,
    H_DLQ_ERROR_KIND,
    H_DLQ_GROUP,
    H_DLQ_ORIGINAL_SHA256,
    H_DLQ_ORIGINAL_SIZE,
    H_DLQ_TIMESTAMP,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_REPLY_TO,
    H_SENT_AT,
    H_SIGNATURE,
    H_SOURCE,
    H_TARGET,
    HEADER_LEN,
    MAX_RECORD_BYTES,
    SINGLE_OBJECT_MARKER,
    topic,
)
from bus.deadletter import parse_dead_letter
from bus.envelope import Envelope, new_id, now_ms
from bus.errors import BusError
from bus.models import (
    AckState,
    CatalogueClass,
    ClaimItem,
    ClaimPackage,
    ClearingDecision,
    ClearingLine,
    ClearingResponse,
    ClearingStatement,
    DifferenceKind,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingReason,
    FilingReceipt,
    FilingStatus,
    FilingUpload,
    Message,
    ReconciliationLine,
    ReconciliationOutcome,
    ReconciliationResult,
    ReconciliationStatement,
    RequestAcknowledgement,
    ReversalDecision,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ReviewDecision,
    ReviewResult,
    SettlementMode,
    SettlementNotice,
    Severity,
    VisitType,
)
from bus.settings import BusSettings
from bus.signing import Signer, Verifier
from bus.transport import Admin, Consumer, Headers, Partition, Producer, Record
from simulators import samples

log = structlog.get_logger(__name__)

PASS: Final = "PASS"  # noqa: S105
FAIL: Final = "FAIL"
SKIP: Final = "SKIP"

CHECK_TIMEOUT_S: Final = 20.0
"""How long one check may wait for what it expects (``--check-timeout``)."""
GRACE_S: Final = 1.0
"""After a refusal arrived, how long the kit waits to see that no answer follows it."""
CHECK_MARGIN_S: Final = 5.0
"""Beyond its time, how long a check may take before it is cut off (the grace waits after a
refusal, the sends)."""
PARALLEL: Final = 8
"""Checks run at once (they share nothing but the broker; each waits mostly on P)."""
CLAIM_DEADLINE_S: Final = 3600
"""``xs-deadline`` of the kit's requests: an hour, far beyond any check."""
STALE_S: Final = 8 * 86_400
"""Age of the ``xs-sent-at`` of the stale record: beyond any receiver's maximum age, which
the contract keeps below the 7 days a receiver remembers processed ids."""
CST: Final = dt.timezone(dt.timedelta(hours=8), "CST")
"""China Standard Time: the day of a filing's validity."""
ITEM_FEN: Final = 300_000
"""About what each line of a claim bills (3,000 yuan): a bill over any deductible, so that the
funds pay a share the identities are checked on."""
UNKNOWN_ITEM: Final = "XS-CONFORMANCE-UNKNOWN"
"""An item code no host catalogue holds."""
DLQ_KINDS_UNDECODABLE: Final = ("truncated", "malformed")
"""Kinds a receiver may give a value cut in the middle of its Avro body."""
PADDING_HEADER: Final = "xs-conformance-padding"
"""An unsigned header of no meaning under the contract: it makes the oversized record big
while its value still decodes."""
PADDING_OVER: Final = 64
"""How many bytes the oversized record is over the contract's limit."""
REQUESTS_CHECKED: Final = 50
"""At most this many of P's own FilingUploads (the newest) are checked by ``headers.requests``."""
DAYS_BACK: Final = 180
"""The reconciliation checks settle on a past day at most this many days ago (and after the
person's filing began): a day of its own for each, so no other check's notice is on it."""
DAY_SLOTS: Final = 2
"""Reconciliation checks in a run; each takes every ``DAY_SLOTS``-th day from its own offset,
so no two take the same day."""
DAY_TRIES: Final = 3
"""Days a reconciliation check tries before it gives up: a day on which P already has
settlements from the kit's host (an earlier run's) is not used."""


class CheckFailed(Exception):
    """A check found P breaking the contract; the text says how."""


class CheckSkipped(Exception):
    """A check cannot run against this P (no counterpart, no filed person); the text says
    why and what would make it run."""


def fail(why: str) -> CheckFailed:
    """The failure to raise."""
    return CheckFailed(why)


def require(condition: bool, why: str) -> None:
    """Fail with ``why`` unless ``condition``."""
    if not condition:
        raise CheckFailed(why)


# --- keys and counterparts -----------------------------------------------------------------
class Keys:
    """The private keys the kit signs with, by province: PKCS#8 PEM files ``<code>.pem`` in
    ``--keys DIR`` (the key id is the directory's key of that province with the same public
    key), else the demo key the directory gives the province."""

    def __init__(self, directory: Directory, folder: Path | None = None) -> None:
        self.directory = directory
        self._signers: dict[str, Signer] = {}
        if folder is not None:
            if not folder.is_dir():
                raise ValueError(f"--keys {folder}: not a folder")
            for path in sorted(folder.glob("*.pem")):
                self._signers[path.stem] = self._from_pem(path)
        for province in directory.provinces():
            if province in self._signers:
                continue
            at = now_ms()
            demo = [k for k in directory.keys_of(province) if k.demo and k.public().valid_at(at)]
            if demo:
                self._signers[province] = Signer.demo(province, demo[-1].key_id)

    def _from_pem(self, path: Path) -> Signer:
        province = path.stem
        if province not in self.directory.provinces():
            raise ValueError(f"--keys {path}: {province} is not a province of the directory")
        probe = Signer.from_pem(path, province, "?")
        for entry in self.directory.keys_of(province):
            if entry.public().public == probe.public and entry.public().valid_at(now_ms()):
                return replace(probe, key_id=entry.key_id)
        raise ValueError(
            f"--keys {path}: the directory publishes no key of {province} valid now with this "
            "public key"
        )

    def provinces(self) -> tuple[str, ...]:
        """Provinces the kit can sign as."""
        return tuple(sorted(self._signers))

    def signer(self, province: str) -> Signer:
        """The signer of ``province`` (KeyError when the kit has none)."""
        return self._signers[province]


@dataclass(frozen=True, slots=True)
class HostSide:
    """A host province the kit plays for claims to P: the agreement of one of P's regions."""

    host: str
    """The kit's province (sends ``ClaimPackage`` to P)."""
    agreement: Agreement
    """Home region (P's) → host, mode, hospitals."""


@dataclass(frozen=True, slots=True)
class Counterparts:
    """Which provinces the kit plays against P, chosen from P's directory."""

    province: str
    """P, the province under test."""
    home: str | None
    """The kit's home province: files persons with P (None: P hosts nobody the kit can
    sign as)."""
    home_region: str
    """Its region with an agreement with P."""
    host_region: str
    """P's region the filings name."""
    instant: HostSide | None
    """A host whose agreement is answered at once (INSTANT, else POINT_TO_POINT)."""
    delayed: HostSide | None
    """A host of a DELAYED agreement (acknowledgements)."""
    spare: str | None
    """Another province the kit can sign as (a key of the wrong owner)."""

    @classmethod
    def choose(cls, directory: Directory, province: str, signable: Sequence[str]) -> Counterparts:
        """Counterparts of ``province`` the kit has keys for."""
        usable = set(signable) - {province}
        as_host = [
            a for a in directory.agreements_as_host(province) if province_of(a.home) in usable
        ]
        regions = [r.code for r in directory.regions() if province_of(r.code) == province]
        sides = [
            HostSide(a.host, a)
            for a in directory.agreements_as_home(province)
            if a.host in usable
            and directory.policy(a.home) is not None
            and directory.catalogue(a.host)
            and directory.allowed_hospitals(a.home, a.host)
        ]
        instant = [s for s in sides if s.agreement.mode is SettlementMode.INSTANT]
        instant += [s for s in sides if s.agreement.mode is SettlementMode.POINT_TO_POINT]
        delayed = [s for s in sides if s.agreement.mode is SettlementMode.DELAYED]
        home = province_of(as_host[0].home) if as_host else None
        used = {home, *(s.host for s in instant[:1] + delayed[:1])}
        spare = next((p for p in sorted(usable) if p not in used), None)
        return cls(
            province=province,
            home=home,
            home_region=as_host[0].home if as_host else "",
            host_region=regions[0] if regions else province,
            instant=instant[0] if instant else None,
            delayed=delayed[0] if delayed else None,
            spare=spare,
        )

    def kit_provinces(self) -> list[str]:
        """Every province the kit plays."""
        hosts = [s.host for s in (self.instant, self.delayed) if s is not None]
        return sorted({p for p in (self.home, *hosts) if p is not None})

    def describe(self) -> str:
        """One line: who plays what."""
        parts = []
        if self.home is not None:
            parts.append(f"home {self.home} (region {self.home_region})")
        for label, side in (("instant host", self.instant), ("delayed host", self.delayed)):
            if side is not None:
                parts.append(f"{label} {side.host} (for {side.agreement.home})")
        return ", ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class FiledPerson:
    """A person P filed with one of the kit's hosts, as its FilingUpload said."""

    person_id: str
    filing_id: str
    home_region: str
    host_region: str
    valid_from: dt.date
    sent_at_ms: int
    reason: FilingReason
    """An EMERGENCY filing covers visits outside its validity (no FILING_EXPIRED)."""


# --- watching P's output -------------------------------------------------------------------
T = TypeVar("T")
M = TypeVar("M", bound=Message)
_DEADLINE: ContextVar[float] = ContextVar("conformance_check_deadline", default=0.0)
"""When the running check's time is up (event-loop time); set per check by
:func:`run_check`, each check running in a task of its own."""


class Observer:
    """Reads, from the moment it starts, every topic P writes to for the kit: the kit
    provinces' reply and error topics, P's own error topic and P's dead-letter topic."""

    def __init__(self, settings: BusSettings, bootstrap: str, topics: Sequence[str]) -> None:
        self.topics = list(topics)
        self.consumer = Consumer(
            settings, bootstrap, group=None, name="conformance-watch", from_beginning=False
        )
        self.by_correlation: dict[str, list[Record]] = defaultdict(list)
        """Replies and error reports by ``xs-correlation-id``, in the order read."""
        self.dead_letters: dict[tuple[str, int, int], Record] = {}
        """Dead letters by the original's topic, partition and offset."""
        self.by_key: dict[bytes, list[Record]] = defaultdict(list)
        """Replies and error reports by record key: what P sent about a person, to explain
        an answer that cannot be matched by its ``xs-correlation-id``."""
        self.reports: list[Record] = []
        """Every record on an error topic (a report may name its request only by
        ``ref_message_id``)."""
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign the topics at their end, then read in the background."""
        await self.consumer.start()
        parts: list[Partition] = []
        for name in self.topics:
            parts += await self.consumer.partitions_for(name)
        self.consumer.assign(parts)
        await self.consumer.seek_to_end()
        self._task = asyncio.create_task(self._run(), name="conformance-watch")

    async def _run(self) -> None:
        while True:
            try:
                batch = await self.consumer.fetch(200)
            except BusError as exc:
                log.warning("conformance_watch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if not batch:
                continue
            for rec in batch:
                self._take(rec)
            async with self._changed:
                self._changed.notify_all()

    def _take(self, rec: Record) -> None:
        if rec.poison is not None:
            return
        headers = dict(rec.headers)
        if rec.topic.split(".")[1] == FAMILY_DLQ:
            info = parse_dead_letter(rec.headers)
            topic_, partition, offset = (
                info.original_topic,
                info.original_partition,
                info.original_offset,
            )
            if topic_ is not None and partition is not None and offset is not None:
                self.dead_letters.setdefault((topic_, partition, offset), rec)
            return
        if rec.topic.split(".")[1] == FAMILY_ERROR:
            self.reports.append(rec)
        correlation = headers.get(H_CORRELATION_ID)
        if correlation is not None:
            self.by_correlation[correlation.decode("utf-8", "replace")].append(rec)
        if rec.key is not None:
            self.by_key[rec.key].append(rec)

    async def wait_for(self, find: Callable[[], T | None], timeout_s: float) -> T | None:
        """The first non-None ``find()`` within ``timeout_s`` (None: none came)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._changed:
            while True:
                found = find()
                if found is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def stop(self) -> None:
        """Stop reading; harmless twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.consumer.stop()


async def read_filings(
    settings: BusSettings, bootstrap: str, topics: Sequence[str], timeout_s: float
) -> list[Record]:
    """Every record on ``topics`` written before now (the filings P sent to the kit's hosts)."""
    if not topics:
        return []
    consumer = Consumer(settings, bootstrap, group=None, name="conformance-filings")
    await consumer.start()
    try:
        parts: list[Partition] = []
        for name in topics:
            parts += await consumer.partitions_for(name)
        ends = await consumer.end_offsets(parts)
        consumer.assign([p for p, o in ends.items() if o > 0])
        if not consumer.assignment():
            return []
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = [r for r in await consumer.fetch(200) if r.poison is None]
            out += batch
            if not batch and not any((await consumer.lag()).values()):
                break
        return out
    finally:
        await consumer.stop()


# --- the run -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KitOptions:
    """What a conformance run does."""

    province: str
    """P, the province under test."""
    bootstrap: str
    """The broker P is connected to."""
    seed: int
    """Seed of the fresh ids (person, filing, claim)."""
    check_timeout_s: float = CHECK_TIMEOUT_S
    """Bound of each check."""
    only: tuple[str, ...] = ()
    """Run only the checks whose id starts with one of these (all when empty)."""


@dataclass(frozen=True, slots=True)
class Sent:
    """A record the kit wrote."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers
    message_id: str


class Kit:
    """The counterpart provinces of one run and what they send and read."""

    def __init__(
        self,
        options: KitOptions,
        settings: BusSettings,
        directory: Directory,
        keys: Keys,
        counterparts: Counterparts,
    ) -> None:
        self.options = options
        self.settings = settings
        self.directory = directory
        self.keys = keys
        self.cp = counterparts
        self.p = options.province
        self.timeout_s = options.check_timeout_s
        self.codec = Codec()
        self.schemas = SchemaStore.default()
        self.verifier = Verifier(directory.keyring())
        self.rng = random.Random(options.seed)
        self._n = itertools.count(1)
        self.producer = Producer(settings, options.bootstrap, name="conformance")
        watched = [
            topic(f, k) for k in counterparts.kit_provinces() for f in (FAMILY_REPLY, FAMILY_ERROR)
        ]
        watched += [topic(FAMILY_ERROR, self.p), topic(FAMILY_DLQ, self.p)]
        self.observer = Observer(settings, options.bootstrap, watched)
        self.persons: dict[str, list[FiledPerson]] = {}
        """Persons P filed with each kit host, newest first."""
        self.own_requests: list[Record] = []
        """The FilingUploads P sent to the kit's hosts (``xs-source`` P), as read."""
        self._decoded: dict[tuple[str, int, int], Message | None] = {}
        """P's error reports decoded, by coordinates (None: they do not decode)."""
        self._person_turn: dict[str, int] = defaultdict(int)
        self._keys: dict[str, bytes | None] = {}
        """The record key of each message id the kit sent."""

    def left(self) -> float:
        """Seconds left of the running check's time (each check has ``check_timeout_s`` in
        all, whatever it waits for)."""
        return max(0.0, _DEADLINE.get() - asyncio.get_running_loop().time())

    # ids
    def n(self) -> int:
        """A fresh number for this run's ids."""
        return next(self._n)

    def fresh_person(self, region: str) -> str:
        """A person id nobody filed: the region's 6 digits and 12 from the seed."""
        return f"{region}{self.rng.randrange(10**12):012d}"

    def unique(self) -> str:
        """The ``<unique>`` part of an id issued by the kit."""
        return f"CK{self.options.seed}-{self.n()}"

    # records
    def envelope(self, message: Message, source: str, *, reply_to: str | None = None) -> Envelope:
        """The headers of a request from ``source`` to P (answers to ``xs-reply-to``, by
        default the sender's reply topic)."""
        sent = now_ms()
        return Envelope(
            message_id=new_id(),
            message_type=message.avro_name,
            source=source,
            target=self.p,
            sent_at_ms=sent,
            reply_to=reply_to or topic(FAMILY_REPLY, source),
            deadline_ms=sent + CLAIM_DEADLINE_S * 1000,
        )

    def notice_envelope(self, message: Message, source: str) -> Envelope:
        """The headers of a message from ``source`` to P that is no request (a notice)."""
        return Envelope(
            message_id=new_id(),
            message_type=message.avro_name,
            source=source,
            target=self.p,
            sent_at_ms=now_ms(),
        )

    def signed(self, source: str, headers: Headers, key: bytes | None, value: bytes) -> Headers:
        """``headers`` signed with ``source``'s key."""
        return self.keys.signer(source).sign(headers, key, value)

    async def send(self, family: str, key: bytes | None, value: bytes, headers: Headers) -> Sent:
        """Write one record to P's ``family`` inbox, exactly as given."""
        name = topic(family, self.p)
        part, offset = await self.producer.send_and_wait(name, key, value, headers)
        mid = dict(headers).get(H_MESSAGE_ID, b"").decode("utf-8", "replace")
        self._keys[mid] = key
        return Sent(name, part, offset, key, value, headers, mid)

    async def send_message(
        self,
        family: str,
        message: Message,
        source: str,
        env: Envelope | None = None,
        *,
        key: bytes | None = None,
    ) -> Sent:
        """Encode, sign as ``source`` and send ``message`` to P, keyed ``key`` (by default
        its person id)."""
        env = env or self.envelope(message, source)
        if key is None and hasattr(message, "person_id"):
            key = message.person_id.encode()
        value = self.codec.encode(message)
        return await self.send(
            family, key, value, self.signed(source, env.to_headers(), key, value)
        )

    # reading P's answers
    def is_kit_topic(self, rec: Record) -> bool:
        """Whether ``rec`` is on a topic of the kit's provinces (not P's own error topic)."""
        return rec.topic != topic(FAMILY_ERROR, self.p)

    async def answer(self, message_id: str, *, index: int = 0) -> Record:
        """The ``index``-th record P sent to the kit about ``message_id`` (a reply or an
        error report with that ``xs-correlation-id``); fails when none comes in time."""

        def find() -> Record | None:
            found = [
                r for r in self.observer.by_correlation.get(message_id, []) if self.is_kit_topic(r)
            ]
            return found[index] if len(found) > index else None

        rec = await self.observer.wait_for(find, self.left())
        if rec is None:
            what = "answer" if index == 0 else f"answer #{index + 1}"
            raise fail(
                f"no {what} to {message_id} within the check's {self.timeout_s:.0f} s"
                f"{self._unmatched(message_id)}"
            )
        return rec

    def _unmatched(self, message_id: str) -> str:
        """What P sent about the request's person that names another (or no) request: the
        answer the kit could not match, when there is one."""
        key = self._keys.get(message_id)
        if key is None:
            return ""
        for rec in self.observer.by_key.get(key, []):
            got = dict(rec.headers).get(H_CORRELATION_ID)
            if self.is_kit_topic(rec) and got != message_id.encode():
                said = "no xs-correlation-id" if got is None else f"xs-correlation-id {got!r}"
                return f" (P sent a {self.type_of(rec)} about this person with {said})"
        return ""

    async def no_reply(self, message_id: str) -> None:
        """Fails when a reply to ``message_id`` arrives within :data:`GRACE_S`: the request
        was refused, so it must not have been handled."""
        await asyncio.sleep(GRACE_S)
        replies = [
            r
            for r in self.observer.by_correlation.get(message_id, [])
            if r.topic.split(".")[1] == FAMILY_REPLY
        ]
        require(
            not replies,
            f"handled anyway: answered with {self.type_of(replies[0]) if replies else ''}",
        )

    def type_of(self, rec: Record) -> str:
        """The ``xs-message-type`` of a record (``?`` if absent)."""
        return dict(rec.headers).get(H_MESSAGE_TYPE, b"?").decode("utf-8", "replace")

    def decode(self, rec: Record, model: type[M]) -> M:
        """``rec``'s value as ``model``; fails naming what came instead."""
        try:
            message = self.codec.decode(rec.value or b"")
        except BusError as exc:
            raise fail(f"the {self.type_of(rec)} on {rec.topic} does not decode: {exc}") from None
        if not isinstance(message, model):
            raise fail(
                f"answered with {message.avro_name} on {rec.topic}, expected {model.avro_name}"
            )
        return message

    def report(self, rec: Record, code: ErrorCode, *, kind: str | None = None) -> ErrorReport:
        """``rec`` as an ErrorReport of ``code`` (and ``details.kind``); fails otherwise."""
        if rec.topic.split(".")[1] != FAMILY_ERROR:
            raise fail(
                f"answered with {self.type_of(rec)} on {rec.topic}, "
                f"expected ErrorReport {code.value}"
            )
        report = self.decode(rec, ErrorReport)
        require(
            report.code is code,
            f"ErrorReport code {report.code.value}, expected {code.value} ({report.message[:120]})",
        )
        if kind is not None:
            got = report.details.get("kind")
            require(got == kind, f"ErrorReport details.kind {got!r}, expected {kind!r}")
        return report

    async def refused(self, sent: Sent, code: ErrorCode, kind: str) -> ErrorReport:
        """Checks a refused record: an ErrorReport ``code``/``kind`` to the sender about it,
        the record dead-lettered with ``kind``, and no reply."""
        rec = await self.answer(sent.message_id)
        report = self.report(rec, code, kind=kind)
        require(report.retriable is False, "a refusal report must have retriable false")
        require(
            report.severity is Severity.ERROR, f"severity {report.severity.value}, expected ERROR"
        )
        dlq = topic(FAMILY_DLQ, self.p)
        got_dlq = report.details.get("dlq_topic")
        require(got_dlq == dlq, f"details.dlq_topic {got_dlq!r}, expected {dlq}")
        letter = await self.dead_letter(sent)
        got = parse_dead_letter(letter.headers).error_kind or ""
        require(got == kind, f"dead letter xs-dlq-error-kind {got!r}, expected {kind!r}")
        await self.no_reply(sent.message_id)
        return report

    async def dead_letter(self, sent: Sent) -> Record:
        """The dead letter of ``sent`` in P's DLQ; fails when none comes in time."""
        where = (sent.topic, sent.partition, sent.offset)
        rec = await self.observer.wait_for(
            lambda: self.observer.dead_letters.get(where), self.left()
        )
        if rec is None:
            raise fail(
                f"no dead letter of {sent.topic}:{sent.partition}:{sent.offset} "
                f"in {topic(FAMILY_DLQ, self.p)}"
            )
        return rec

    async def report_about(
        self, ref_message_id: str, code: ErrorCode, to: str
    ) -> tuple[Record, ErrorReport]:
        """The ErrorReport ``code`` P sent to ``to``'s error topic about the message
        ``ref_message_id`` (its ``ref_message_id``): a report that is no answer, so it has no
        ``xs-correlation-id`` to find it by; fails when none comes in time."""
        where = topic(FAMILY_ERROR, to)

        def find() -> tuple[Record, ErrorReport] | None:
            for rec in self.observer.reports:
                if rec.topic != where:
                    continue
                at = (rec.topic, rec.partition, rec.offset)
                if at not in self._decoded:
                    try:
                        self._decoded[at] = self.codec.decode(rec.value or b"")
                    except BusError:
                        self._decoded[at] = None
                report = self._decoded[at]
                if (
                    isinstance(report, ErrorReport)
                    and report.code is code
                    and report.ref_message_id == ref_message_id
                ):
                    return rec, report
            return None

        found = await self.observer.wait_for(find, self.left())
        if found is None:
            raise fail(f"no ErrorReport {code.value} about {ref_message_id} on {where}")
        return found

    # the messages
    def filing(self) -> FilingUpload:
        """A fresh CREATE filing from the kit's home to P."""
        if self.cp.home is None:
            raise CheckSkipped(
                f"no province the kit can sign as has an agreement hosted by {self.p}"
            )
        person = self.fresh_person(self.cp.home_region)
        message = samples.filing(home=self.cp.home_region, host=self.cp.host_region, person=person)
        return message.model_copy(
            update={
                "filing_id": f"F-{self.cp.home_region}-{self.unique()}",
                "filed_at": dt.datetime.now(dt.UTC),
            }
        )

    async def filing_exchange(self) -> tuple[FilingUpload, Sent, Record]:
        """Send a fresh filing to P; its first answer."""
        message = self.filing()
        assert self.cp.home is not None
        sent = await self.send_message(FAMILY_FILING, message, self.cp.home)
        return message, sent, await self.answer(sent.message_id)

    def side(self, delayed: bool = False) -> HostSide:
        """The host the kit plays for a claim (skips when P has none)."""
        side = self.cp.delayed if delayed else self.cp.instant
        if side is None:
            mode = "DELAYED" if delayed else "INSTANT or POINT_TO_POINT"
            raise CheckSkipped(
                f"no region of {self.p} has a {mode} agreement with a province the kit can sign as"
            )
        return side

    def person(self, side: HostSide) -> FiledPerson:
        """A person P filed with ``side``'s host, in turn (skips when there is none)."""
        people = self.persons.get(side.host, [])
        if not people:
            raise CheckSkipped(
                f"{self.p} has filed nobody with {side.host} (file a person of "
                f"{side.agreement.home} with {side.host} before running the kit)"
            )
        turn = self._person_turn[side.host]
        self._person_turn[side.host] += 1
        return people[turn % len(people)]

    def claim(
        self,
        side: HostSide,
        person: FiledPerson | None = None,
        *,
        admitted_at: dt.datetime | None = None,
    ) -> ClaimPackage:
        """A valid claim from ``side``'s host to P for ``person`` (None: a fresh, unfiled
        person of the agreement's region), admitted at ``admitted_at`` (by default within the
        last two days, after the filing began) and discharged an hour later."""
        agreement = side.agreement
        hospitals = self.directory.allowed_hospitals(agreement.home, side.host)
        if person is not None and not person.host_region.endswith("0000"):
            hospitals = tuple(h for h in hospitals if h.region == person.host_region) or hospitals
        hospital = hospitals[0]
        catalogue = list(self.directory.catalogue(side.host).values())
        wanted = [
            next((i for i in catalogue if i.catalogue_class is c), None)
            for c in (CatalogueClass.A, CatalogueClass.B)
        ]
        picked = [i for i in wanted if i is not None] or catalogue[:1]
        quantities = [max(1, ITEM_FEN // max(1, i.unit_price_fen)) * 1000 for i in picked]
        items = tuple(
            ClaimItem(
                item_code=i.item_code, item_name=i.item_name, category=i.category,
                catalogue_class=i.catalogue_class, quantity_milli=q,
                unit_price_fen=i.unit_price_fen, amount_fen=item_amount_fen(q, i.unit_price_fen),
            )
            for i, q in zip(picked, quantities, strict=True)
        )  # fmt: skip
        total = sum(i.amount_fen for i in items)
        mode = agreement.mode
        permille = min(100, self.directory.max_advance_permille(side.host))
        advance = max_advance_fen(total, permille) if mode is SettlementMode.DELAYED else 0
        now = dt.datetime.now(dt.UTC)
        admitted = now - dt.timedelta(days=2)
        if person is not None:
            first = dt.datetime.combine(person.valid_from, dt.time(9), CST)
            admitted = max(admitted, min(first, now - dt.timedelta(hours=2)))
        if admitted_at is not None:
            admitted = admitted_at
        return ClaimPackage(
            claim_id=f"C-{side.host}-{self.unique()}",
            filing_id=person.filing_id if person else f"F-{agreement.home}-{self.unique()}",
            person_id=person.person_id if person else self.fresh_person(agreement.home),
            home_region=person.home_region if person else agreement.home,
            host_region=hospital.region,
            hospital_code=hospital.code,
            hospital_level=hospital.level,
            settlement_mode=mode,
            visit_type=VisitType.INPATIENT,
            admitted_at=admitted,
            discharged_at=admitted + dt.timedelta(hours=1),
            diagnoses=("K35.8",),
            items=items,
            total_fen=total,
            advance_fen=advance,
            submitted_at=now,
        )

    async def claim_exchange(self, claim: ClaimPackage, side: HostSide) -> tuple[Sent, Record]:
        """Send ``claim`` to P as ``side``'s host; its first answer."""
        sent = await self.send_message(FAMILY_CLAIM, claim, side.host)
        return sent, await self.answer(sent.message_id)

    async def resend(self, sent: Sent, source: str) -> Sent:
        """``sent`` again as its sender re-sends it: same id, key and value, ``xs-attempt``
        + 1, new ``xs-sent-at`` and signature."""
        again = Envelope.from_headers(sent.headers).resent()
        headers = self.signed(source, again.to_headers(), sent.key, sent.value)
        family = sent.topic.split(".")[1]
        return await self.send(family, sent.key, sent.value, headers)

    # P's records
    def check_signed(self, rec: Record) -> None:
        """Fails unless ``rec`` verifies with a key the directory gives P."""
        got = dict(rec.headers)
        require(H_SIGNATURE in got, f"the {self.type_of(rec)} from {self.p} is unsigned")
        try:
            verified = self.verifier.verify(rec.headers, rec.key, rec.value, now_ms())
        except BusError as exc:
            raise fail(f"the {self.type_of(rec)} from {self.p} does not verify: {exc}") from None
        key = self.directory.keyring().get(verified.key_id)
        require(
            key is not None and key.province == self.p,
            f"signed with {verified.key_id}, not a key of {self.p}",
        )

    def check_headers(self, rec: Record, request: Sent, paired: type[Message]) -> list[str]:
        """What is wrong with the headers of P's answer ``rec`` to ``request``."""
        problems: list[str] = []
        names = [k for k, _ in rec.headers]
        h = {k: v.decode("utf-8", "replace") for k, v in rec.headers}
        kit = dict(request.headers)[H_SOURCE].decode()
        for name in (H_MESSAGE_ID, H_MESSAGE_TYPE, H_SOURCE, H_TARGET, H_SENT_AT, H_CORRELATION_ID):
            if name not in h:
                problems.append(f"{name} missing")
            elif names.count(name) > 1:
                problems.append(f"{name} appears {names.count(name)} times")
        if h.get(H_SOURCE, self.p) != self.p:
            problems.append(f"xs-source {h[H_SOURCE]!r}, expected {self.p}")
        if h.get(H_TARGET, kit) != kit:
            problems.append(f"xs-target {h[H_TARGET]!r}, expected {kit}")
        if h.get(H_CORRELATION_ID, request.message_id) != request.message_id:
            problems.append(
                f"xs-correlation-id {h[H_CORRELATION_ID]!r}, expected {request.message_id}"
            )
        if h.get(H_MESSAGE_TYPE, paired.avro_name) != paired.avro_name:
            problems.append(f"xs-message-type {h[H_MESSAGE_TYPE]!r}, expected {paired.avro_name}")
        if h.get(H_MESSAGE_ID) == request.message_id:
            problems.append("xs-message-id is the request's: an answer is a message of its own")
        if not h.get(H_SENT_AT, "0").isdigit():
            problems.append(f"xs-sent-at {h[H_SENT_AT]!r} is not epoch milliseconds")
        attempt = h.get(H_ATTEMPT, "1")
        if not attempt.isdigit() or int(attempt) < 1:
            problems.append(f"xs-attempt {attempt!r}, expected 1 or more")
        if H_REPLY_TO in h or H_DEADLINE in h:
            problems.append("an answer carries xs-reply-to or xs-deadline (request headers)")
        return problems

    def check_encoding(self, rec: Record) -> list[str]:
        """What is wrong with the encoding of P's record ``rec``."""
        value = rec.value or b""
        what = self.type_of(rec)
        if value[:2] != SINGLE_OBJECT_MARKER:
            return [f"the {what} value starts with {value[:2].hex() or 'nothing'}, not c301"]
        entry = self.schemas.by_fingerprint(value[2:HEADER_LEN])
        if entry is None:
            return [f"the {what} fingerprint {value[2:HEADER_LEN].hex()} names no contract schema"]
        if entry.name != what:
            return [f"the fingerprint names {entry.name}, xs-message-type says {what}"]
        try:
            self.codec.decode(value)
        except BusError as exc:
            return [f"the {what} does not decode with the contract schemas: {exc}"]
        return []

    # lifecycle
    async def start(self) -> None:
        """Connect, find P's filings with the kit's hosts (answering the open ones), then
        watch P's output."""
        await self.producer.start()
        hosts = sorted({s.host for s in (self.cp.instant, self.cp.delayed) if s is not None})
        records = await read_filings(
            self.settings,
            self.options.bootstrap,
            [topic(FAMILY_FILING, h) for h in hosts],
            self.timeout_s,
        )
        await self._take_filings(records)
        await self.observer.start()

    async def _take_filings(self, records: Sequence[Record]) -> None:
        """Take the persons P filed with the kit's hosts: the latest filing of each person
        (a home checks a claim against it), if it is in force today."""
        latest: dict[str, tuple[int, str, FilingUpload]] = {}
        for rec in records:
            h = {k: v.decode("utf-8", "replace") for k, v in rec.headers}
            if h.get(H_SOURCE) != self.p:
                continue
            self.own_requests.append(rec)
            try:
                filing = self.codec.decode_as(rec.value or b"", FilingUpload)
                sent_at = int(h.get(H_SENT_AT, "0"))
            except (BusError, ValueError):
                continue
            host = rec.topic.split(".")[2]
            seen = latest.get(filing.person_id)
            if seen is None or seen[0] <= sent_at:
                latest[filing.person_id] = (sent_at, host, filing)
            if int(h.get(H_DEADLINE, "0") or 0) > now_ms():
                await self._receipt(rec, filing, host, h)
        today = dt.datetime.now(CST).date()
        for sent_at, host, filing in latest.values():
            if filing.action is FilingAction.REVOKE or filing.valid_from > today:
                continue
            if filing.valid_until is not None and filing.valid_until < today:
                continue
            self.persons.setdefault(host, []).append(
                FiledPerson(
                    filing.person_id, filing.filing_id, filing.home_region, filing.host_region,
                    filing.valid_from, sent_at, filing.reason,
                )
            )  # fmt: skip
        for people in self.persons.values():
            people.sort(key=lambda f: -f.sent_at_ms)

    async def _receipt(
        self, rec: Record, filing: FilingUpload, host: str, h: dict[str, str]
    ) -> None:
        """Answer an open filing of P as its host would."""
        status = {
            FilingAction.UPDATE: FilingStatus.UPDATED,
            FilingAction.REVOKE: FilingStatus.REVOKED,
        }.get(filing.action, FilingStatus.REGISTERED)
        receipt = FilingReceipt(
            filing_id=filing.filing_id, person_id=filing.person_id,
            host_region=filing.host_region, status=status, received_at=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        env = Envelope(
            message_id=new_id(), message_type=receipt.avro_name, source=host, target=self.p,
            sent_at_ms=now_ms(), correlation_id=h.get(H_MESSAGE_ID),
        )  # fmt: skip
        value = self.codec.encode(receipt)
        headers = self.signed(host, env.to_headers(), rec.key, value)
        await self.producer.send_and_wait(topic(FAMILY_REPLY, self.p), rec.key, value, headers)

    async def stop(self) -> None:
        """Disconnect; harmless twice."""
        await self.observer.stop()
        await self.producer.stop()


# --- the checks ------------------------------------------------------------------------------
Run = Callable[[Kit], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Check:
    """One named requirement of the contract and how to test it."""

    id: str
    """Stable id, e.g. ``headers.required``."""
    description: str
    """What it checks, in a few words."""
    run: Run
    """Returns when P passes; raises :class:`CheckFailed` or :class:`CheckSkipped`."""


async def _receipt_filing(kit: Kit) -> None:
    filing, _sent, rec = await kit.filing_exchange()
    receipt = kit.decode(rec, FilingReceipt)
    require(
        receipt.filing_id == filing.filing_id,
        f"filing_id {receipt.filing_id!r}, expected {filing.filing_id}",
    )
    require(receipt.person_id == filing.person_id, "person_id not echoed")
    require(
        receipt.status is FilingStatus.REGISTERED,
        f"status {receipt.status.value}, expected REGISTERED",
    )
    require(rec.topic == topic(FAMILY_REPLY, kit.cp.home or ""), f"answered on {rec.topic}")


async def _undecodable(kit: Kit, cut: bool) -> Sent:
    """A signed filing whose value cannot be decoded: cut in the middle of its body (``cut``),
    or with a fingerprint no schema has."""
    filing = kit.filing()
    assert kit.cp.home is not None
    key = filing.person_id.encode()
    value = kit.codec.encode(filing)
    value = (
        value[: HEADER_LEN + (len(value) - HEADER_LEN) // 2]
        if cut
        else value[:2] + b"\x58" * 8 + value[HEADER_LEN:]
    )
    env = kit.envelope(filing, kit.cp.home)
    return await kit.send(
        FAMILY_FILING, key, value, kit.signed(kit.cp.home, env.to_headers(), key, value)
    )


async def _headers_required(kit: Kit) -> None:
    _filing, sent, rec = await kit.filing_exchange()
    problems = [f"receipt: {p}" for p in kit.check_headers(rec, sent, FilingReceipt)]
    bad = await _undecodable(kit, cut=False)
    report = await kit.answer(bad.message_id)
    problems += [f"error report: {p}" for p in kit.check_headers(report, bad, ErrorReport)]
    require(not problems, "; ".join(problems))


async def _key_person_id(kit: Kit) -> None:
    filing, _sent, rec = await kit.filing_exchange()
    want = filing.person_id.encode()
    require(rec.key == want, f"receipt key {rec.key!r}, expected the person id {want.decode()}")
    bad = await _undecodable(kit, cut=False)
    report = await kit.answer(bad.message_id)
    require(report.key == bad.key, f"error report key {report.key!r}, expected {bad.key!r}")


async def _encoding(kit: Kit) -> None:
    _filing, _sent, rec = await kit.filing_exchange()
    problems = kit.check_encoding(rec)
    bad = await _undecodable(kit, cut=False)
    problems += kit.check_encoding(await kit.answer(bad.message_id))
    require(not problems, "; ".join(problems))


async def _answers_signed(kit: Kit) -> None:
    _filing, _sent, rec = await kit.filing_exchange()
    kit.check_signed(rec)
    bad = await _undecodable(kit, cut=False)
    kit.check_signed(await kit.answer(bad.message_id))


async def _resend_idempotent(kit: Kit) -> None:
    assert kit.cp.home is not None
    _filing, sent, first = await kit.filing_exchange()
    await kit.resend(sent, kit.cp.home)
    second = await kit.answer(sent.message_id, index=1)
    a, b = dict(first.headers), dict(second.headers)
    require(second.value == first.value, "the re-sent request got another answer (value differs)")
    require(
        a.get(H_MESSAGE_ID) == b.get(H_MESSAGE_ID),
        "the stored answer was sent again under another xs-message-id (a re-sent answer keeps it)",
    )
    require(
        int(b.get(H_ATTEMPT, b"1")) > int(a.get(H_ATTEMPT, b"1")),
        f"the answer sent again has xs-attempt {b.get(H_ATTEMPT)!r}, not more than the first's",
    )


async def _region_not_connected(kit: Kit) -> None:
    filing = kit.filing()
    assert kit.cp.home is not None
    connected = {a.home for a in kit.directory.agreements_as_host(kit.p)}
    region = next(
        (
            r.code
            for r in kit.directory.regions()
            if province_of(r.code) == kit.cp.home and r.code not in connected
        ),
        f"{kit.cp.home[:2]}9999",
    )
    filing = filing.model_copy(
        update={"home_region": region, "filing_id": f"F-{region}-{kit.unique()}"}
    )
    sent = await kit.send_message(FAMILY_FILING, filing, kit.cp.home)
    kit.report(await kit.answer(sent.message_id), ErrorCode.REGION_NOT_CONNECTED)
    await kit.no_reply(sent.message_id)


async def _invalid_message(kit: Kit) -> None:
    sent = await _undecodable(kit, cut=False)
    await kit.refused(sent, ErrorCode.INVALID_MESSAGE, "unknown_fingerprint")


async def _reply_to(kit: Kit) -> None:
    assert kit.cp.home is not None
    filing = kit.filing()
    other = next((p for p in kit.cp.kit_provinces() if p != kit.cp.home), kit.p)
    env = kit.envelope(filing, kit.cp.home, reply_to=topic(FAMILY_REPLY, other))
    sent = await kit.send_message(FAMILY_FILING, filing, kit.cp.home, env)
    await kit.refused(sent, ErrorCode.INVALID_MESSAGE, "header_mismatch")


async def _deadletter_bytes(kit: Kit) -> None:
    sent = await _undecodable(kit, cut=True)
    letter = await kit.dead_letter(sent)
    require(letter.key == sent.key, f"dead letter key {letter.key!r}, expected {sent.key!r}")
    require(letter.value == sent.value, "dead letter value is not the original's byte for byte")
    kept = sorted((k, v) for k, v in letter.headers if not k.startswith(DLQ_HEADER_PREFIX))
    require(
        kept == sorted(sent.headers), "dead letter headers are not the original's byte for byte"
    )
    h = dict(letter.headers)
    problems = [
        f"{n} missing" for n in (H_DLQ_TIMESTAMP, H_DLQ_ERROR, H_DLQ_DETECTED_AT) if n not in h
    ]
    kind = h.get(H_DLQ_ERROR_KIND, b"").decode("utf-8", "replace")
    if kind not in DLQ_KINDS_UNDECODABLE:
        problems.append(
            f"xs-dlq-error-kind {kind!r}, expected one of {', '.join(DLQ_KINDS_UNDECODABLE)}"
        )
    if h.get(H_DLQ_GROUP) != f"xsettle-{kit.p}".encode():
        problems.append(f"xs-dlq-consumer-group {h.get(H_DLQ_GROUP)!r}, expected xsettle-{kit.p}")
    if h.get(H_DLQ_CONTENT) != b"copy":
        problems.append(f"xs-dlq-content {h.get(H_DLQ_CONTENT)!r}, expected copy")
    if len(h.get(H_DLQ_ERROR, b"").decode("utf-8", "replace")) > ERROR_TEXT_MAX:
        problems.append(f"xs-dlq-error longer than {ERROR_TEXT_MAX} characters")
    for name in (H_DLQ_TIMESTAMP, H_DLQ_DETECTED_AT):
        if name in h and not h[name].lstrip(b"-").isdigit():
            problems.append(f"{name} {h[name]!r} is not a number")
    require(not problems, "; ".join(problems))


async def _signature_refusal(
    kit: Kit, headers_of: Callable[[Headers, bytes | None, bytes], Headers], kind: str
) -> None:
    """Send a fresh filing whose headers ``headers_of`` spoils; expect the signature refusal
    ``kind`` to the sender and to P's own ops, and no handling."""
    assert kit.cp.home is not None
    filing = kit.filing()
    key = filing.person_id.encode()
    value = kit.codec.encode(filing)
    env = kit.envelope(filing, kit.cp.home)
    sent = await kit.send(FAMILY_FILING, key, value, headers_of(env.to_headers(), key, value))
    await kit.refused(sent, ErrorCode.SIGNATURE_INVALID, kind)
    own = topic(FAMILY_ERROR, kit.p)

    def ops_copy() -> Record | None:
        for rec in kit.observer.reports:
            if rec.topic != own:
                continue
            if dict(rec.headers).get(H_CORRELATION_ID) == sent.message_id.encode():
                return rec
            with contextlib.suppress(BusError):
                report = kit.codec.decode(rec.value or b"")
                if isinstance(report, ErrorReport) and report.ref_message_id == sent.message_id:
                    return rec
        return None

    if await kit.observer.wait_for(ops_copy, kit.left()) is None:
        raise fail(
            f"no report of the refusal on {own} "
            "(a signature refusal also goes to the receiver's ops)"
        )


async def _unsigned(kit: Kit) -> None:
    await _signature_refusal(kit, lambda h, k, v: h, "unsigned")


async def _bad_signature(kit: Kit) -> None:
    assert kit.cp.home is not None
    home = kit.cp.home

    def tampered(h: Headers, k: bytes | None, v: bytes) -> Headers:
        signed = kit.signed(home, h, k, v)
        later = str(int(dict(signed)[H_DEADLINE]) + 1).encode()
        return tuple((n, later if n == H_DEADLINE else x) for n, x in signed)

    await _signature_refusal(kit, tampered, "bad_signature")


async def _key_not_owned(kit: Kit) -> None:
    spare = kit.cp.spare
    if spare is None:
        raise CheckSkipped("the kit has the key of no third province to sign with")
    await _signature_refusal(kit, lambda h, k, v: kit.signed(spare, h, k, v), "key_not_owned")


async def _stale(kit: Kit) -> None:
    assert kit.cp.home is not None
    home = kit.cp.home
    old = str(now_ms() - STALE_S * 1000).encode()

    def stale(h: Headers, k: bytes | None, v: bytes) -> Headers:
        return kit.signed(home, tuple((n, old if n == H_SENT_AT else x) for n, x in h), k, v)

    await _signature_refusal(kit, stale, "stale")


async def _replayed(kit: Kit) -> None:
    _filing, sent, first = await kit.filing_exchange()
    kit.decode(first, FilingReceipt)
    family = sent.topic.split(".")[1]
    copy = await kit.send(family, sent.key, sent.value, sent.headers)
    rec = await kit.answer(sent.message_id, index=1)
    report = kit.report(rec, ErrorCode.SIGNATURE_INVALID, kind="replayed")
    require(
        report.ref_offset in (None, copy.offset),
        f"the report names offset {report.ref_offset}, the copy is at {copy.offset}",
    )
    letter = await kit.dead_letter(copy)
    got = parse_dead_letter(letter.headers).error_kind or ""
    require(got == "replayed", f"dead letter kind {got!r}, expected 'replayed'")


def _identities(claim: ClaimPackage, r: ReviewResult) -> list[str]:
    """The contract's identities a ReviewResult of ``claim`` breaks."""
    out = []
    if r.claim_id != claim.claim_id:
        out.append(f"claim_id {r.claim_id!r}, expected {claim.claim_id}")
    if r.total_fen != claim.total_fen:
        out.append(f"total_fen {r.total_fen}, the claim's is {claim.total_fen}")
    shares = r.fund_fen + r.critical_illness_fen + r.assistance_fen + r.personal_fen
    if shares != r.total_fen:
        out.append(
            f"fund {r.fund_fen} + critical illness {r.critical_illness_fen} + assistance "
            f"{r.assistance_fen} + personal {r.personal_fen} = {shares} ≠ total {r.total_fen}"
        )
    for name in (
        "eligible_fen",
        "deductible_fen",
        "fund_fen",
        "critical_illness_fen",
        "assistance_fen",
        "personal_fen",
    ):
        if getattr(r, name) < 0:
            out.append(f"{name} {getattr(r, name)} < 0")
    if r.eligible_fen > r.total_fen:
        out.append(f"eligible_fen {r.eligible_fen} > total {r.total_fen}")
    if r.advance_fen != claim.advance_fen:
        out.append(f"advance_fen {r.advance_fen}, the claim's is {claim.advance_fen}")
    if r.balance_fen != r.personal_fen - r.advance_fen:
        out.append(
            f"balance_fen {r.balance_fen} ≠ personal {r.personal_fen} − advance {r.advance_fen}"
        )
    if (
        r.decision is ReviewDecision.REJECTED
        and r.fund_fen + r.critical_illness_fen + r.assistance_fen
    ):
        out.append("REJECTED, yet the funds pay something")
    out += [
        f"adjustment {a.item_code} approved_fen {a.approved_fen} < 0"
        for a in r.adjustments
        if a.approved_fen < 0
    ]
    return out


async def _review_result(kit: Kit, sent: Sent, first: Record) -> tuple[Record, int]:
    """The terminal answer to ``sent`` (a ReviewResult to a claim; after any
    acknowledgements) and its index."""
    index, rec = 0, first
    while kit.type_of(rec) == RequestAcknowledgement.avro_name:
        index += 1
        try:
            rec = await kit.answer(sent.message_id, index=index)
        except CheckFailed:
            what = dict(sent.headers).get(H_MESSAGE_TYPE, b"request").decode().split(".")[-1]
            raise CheckSkipped(
                f"{kit.p} acknowledged the {what}; no answer came within "
                f"{kit.timeout_s:.0f} s (a reviewer must decide)"
            ) from None
    return rec, index


async def _money_identities(kit: Kit) -> None:
    side = kit.side()
    claim = kit.claim(side, kit.person(side))
    sent, first = await kit.claim_exchange(claim, side)
    rec, _ = await _review_result(kit, sent, first)
    problems = _identities(claim, kit.decode(rec, ReviewResult))
    require(not problems, "; ".join(problems))


async def _resend_review(kit: Kit) -> None:
    side = kit.side()
    claim = kit.claim(side, kit.person(side))
    sent, first = await kit.claim_exchange(claim, side)
    rec, index = await _review_result(kit, sent, first)
    kit.decode(rec, ReviewResult)
    await kit.resend(sent, side.host)
    again = await kit.answer(sent.message_id, index=index + 1)
    require(
        kit.type_of(again) == ReviewResult.avro_name,
        f"the re-sent claim got {kit.type_of(again)}, not its ReviewResult",
    )
    require(
        again.value == rec.value,
        "the re-sent claim got another review (value differs: reviewed twice)",
    )


async def _duplicate_claim(kit: Kit) -> None:
    side = kit.side()
    claim = kit.claim(side, kit.person(side))
    sent, first = await kit.claim_exchange(claim, side)
    rec, _ = await _review_result(kit, sent, first)
    kit.decode(rec, ReviewResult)
    other = await kit.send_message(FAMILY_CLAIM, claim, side.host)
    kit.report(await kit.answer(other.message_id), ErrorCode.DUPLICATE_CLAIM)
    await kit.no_reply(other.message_id)


async def _error_for_claim(
    kit: Kit, code: ErrorCode, spoil: Callable[[ClaimPackage], ClaimPackage], filed: bool = True
) -> None:
    """Send a claim ``spoil`` made wrong (of a filed person, or not ``filed``) to P as the
    instant host (else the delayed one); expect an ErrorReport ``code`` and no review."""
    side = kit.side(delayed=kit.cp.instant is None and kit.cp.delayed is not None)
    claim = spoil(kit.claim(side, kit.person(side) if filed else None))
    sent, rec = await kit.claim_exchange(claim, side)
    kit.report(rec, code)
    require(rec.key == claim.person_id.encode(), f"report key {rec.key!r}, expected the person id")
    await kit.no_reply(sent.message_id)


async def _not_filed(kit: Kit) -> None:
    await _error_for_claim(kit, ErrorCode.NOT_FILED, lambda c: c, filed=False)


async def _amount_mismatch(kit: Kit) -> None:
    await _error_for_claim(
        kit,
        ErrorCode.AMOUNT_MISMATCH,
        lambda c: c.model_copy(update={"total_fen": c.total_fen + 100}),
    )


async def _catalogue_unknown(kit: Kit) -> None:
    def unknown(c: ClaimPackage) -> ClaimPackage:
        item = c.items[0].model_copy(update={"item_code": UNKNOWN_ITEM})
        return c.model_copy(update={"items": (item, *c.items[1:])})

    await _error_for_claim(kit, ErrorCode.CATALOGUE_ITEM_UNKNOWN, unknown)


async def _ack_deferred(kit: Kit) -> None:
    side = kit.side(delayed=True)
    claim = kit.claim(side, kit.person(side))
    sent, first = await kit.claim_exchange(claim, side)
    if kit.type_of(first) != RequestAcknowledgement.avro_name:
        kit.decode(first, ReviewResult)
        raise CheckSkipped(
            f"{kit.p} answered the DELAYED claim at once "
            "(an acknowledgement is for an answer that waits)"
        )
    ack = kit.decode(first, RequestAcknowledgement)
    problems = kit.check_headers(first, sent, RequestAcknowledgement)
    if ack.request_type != ClaimPackage.avro_name:
        problems.append(f"request_type {ack.request_type!r}, expected {ClaimPackage.avro_name}")
    if ack.subject_id != claim.claim_id:
        problems.append(f"subject_id {ack.subject_id!r}, expected {claim.claim_id}")
    if ack.state not in (AckState.RECEIVED, AckState.ACCEPTED_FOR_REVIEW):
        problems.append(f"state {ack.state.value}")
    if first.key != claim.person_id.encode():
        problems.append(f"key {first.key!r}, expected the person id")
    if first.topic != topic(FAMILY_REPLY, side.host):
        problems.append(f"sent to {first.topic}, not the request's xs-reply-to")
    require(not problems, "; ".join(problems))
    kit.check_signed(first)
    await kit.resend(sent, side.host)
    again = await kit.answer(sent.message_id, index=1)
    if kit.type_of(again) == RequestAcknowledgement.avro_name:
        kit.decode(again, RequestAcknowledgement)
        require(
            dict(again.headers).get(H_MESSAGE_ID) != dict(first.headers).get(H_MESSAGE_ID),
            "the acknowledgement of the re-sent request reuses the first one's xs-message-id",
        )
    else:
        kit.decode(again, ReviewResult)  # answered meanwhile: the stored answer instead


# --- more refusals of P as host --------------------------------------------------------------
async def _unknown_symbol(kit: Kit) -> None:
    filing = kit.filing().model_copy(update={"reason": FilingReason.UNKNOWN})
    assert kit.cp.home is not None
    sent = await kit.send_message(FAMILY_FILING, filing, kit.cp.home)
    await kit.refused(sent, ErrorCode.INVALID_MESSAGE, "unknown_symbol")


async def _oversized(kit: Kit) -> None:
    filing = kit.filing()
    assert kit.cp.home is not None
    key = filing.person_id.encode()
    value = kit.codec.encode(filing)
    headers = kit.signed(kit.cp.home, kit.envelope(filing, kit.cp.home).to_headers(), key, value)
    size = len(key) + len(value) + sum(len(n.encode()) + len(v) for n, v in headers)
    total = MAX_RECORD_BYTES + PADDING_OVER
    padding = b"x" * (total - size - len(PADDING_HEADER))
    try:
        sent = await kit.send(FAMILY_FILING, key, value, (*headers, (PADDING_HEADER, padding)))
    except BusError as exc:
        raise CheckSkipped(
            f"the broker refused a {total}-byte record ({exc}): with message.max.bytes at the "
            "contract's limit no oversized record reaches P"
        ) from None
    await kit.refused(sent, ErrorCode.INVALID_MESSAGE, "oversized")
    letter = dict((await kit.dead_letter(sent)).headers)
    problems = []
    if letter.get(H_DLQ_CONTENT) != b"digest":
        problems.append(f"xs-dlq-content {letter.get(H_DLQ_CONTENT)!r}, expected digest")
    if letter.get(H_DLQ_ORIGINAL_SIZE) != str(total).encode():
        got = letter.get(H_DLQ_ORIGINAL_SIZE)
        problems.append(f"xs-dlq-original-size {got!r}, expected {total}")
    if letter.get(H_DLQ_ORIGINAL_SHA256) != hashlib.sha256(value).hexdigest().encode():
        got = letter.get(H_DLQ_ORIGINAL_SHA256)
        problems.append(f"xs-dlq-original-sha256 {got!r}, not the SHA-256 of the value")
    require(not problems, "; ".join(problems))


async def _duplicate_header(kit: Kit) -> None:
    assert kit.cp.home is not None
    home = kit.cp.home

    def doubled(h: Headers, k: bytes | None, v: bytes) -> Headers:
        signed = kit.signed(home, h, k, v)
        return (*signed, (H_TARGET, dict(signed)[H_TARGET]))

    await _signature_refusal(kit, doubled, "duplicate_header")


# --- more of P as home: errors, its own requests -----------------------------------------------
def _any_side(kit: Kit) -> HostSide:
    """The instant host, else the delayed one (skips when P has neither)."""
    return kit.side(delayed=kit.cp.instant is None and kit.cp.delayed is not None)


async def _expect_error(kit: Kit, side: HostSide, claim: ClaimPackage, code: ErrorCode) -> None:
    """Send ``claim`` to P as ``side``'s host; expect an ErrorReport ``code`` keyed by the
    person, and no review."""
    sent, rec = await kit.claim_exchange(claim, side)
    kit.report(rec, code)
    require(rec.key == claim.person_id.encode(), f"report key {rec.key!r}, expected the person id")
    await kit.no_reply(sent.message_id)


async def _filing_expired(kit: Kit) -> None:
    side = kit.side()
    person = kit.person(side)
    for _ in kit.persons.get(side.host, []):
        if person.reason is not FilingReason.EMERGENCY:
            break
        person = kit.person(side)
    if person.reason is FilingReason.EMERGENCY:
        raise CheckSkipped(
            f"every person {kit.p} filed with {side.host} is an EMERGENCY filing, which covers "
            "visits outside its validity"
        )
    before = dt.datetime.combine(person.valid_from - dt.timedelta(days=1), dt.time(9), CST)
    await _expect_error(
        kit, side, kit.claim(side, person, admitted_at=before), ErrorCode.FILING_EXPIRED
    )


async def _hospital_not_designated(kit: Kit) -> None:
    side = _any_side(kit)
    known = {h.code for h in kit.directory.allowed_hospitals(side.agreement.home, side.host)}
    code = next(
        c
        for c in (f"H{side.host[:2]}{'9' * n}" for n in range(6, 12))
        if c not in known and kit.directory.hospital(c) is None
    )
    claim = kit.claim(side, kit.person(side)).model_copy(update={"hospital_code": code})
    await _expect_error(kit, side, claim, ErrorCode.HOSPITAL_NOT_DESIGNATED)


async def _orphan_reply(kit: Kit) -> None:
    side = kit.cp.instant or kit.cp.delayed
    source = side.host if side is not None else kit.cp.kit_provinces()[0]
    person = kit.fresh_person(kit.cp.host_region)
    receipt = FilingReceipt(
        filing_id=f"F-{kit.p}-{kit.unique()}", person_id=person, host_region=source,
        status=FilingStatus.REGISTERED, received_at=dt.datetime.now(dt.UTC),
    )  # fmt: skip
    env = replace(kit.notice_envelope(receipt, source), correlation_id=new_id())
    sent = await kit.send_message(FAMILY_REPLY, receipt, source, env)
    rec = await kit.answer(sent.message_id)
    kit.report(rec, ErrorCode.ORPHAN_REPLY)
    require(rec.topic == topic(FAMILY_ERROR, source), f"reported on {rec.topic}, not to {source}")


def _request_problems(kit: Kit, rec: Record) -> list[str]:
    """What is wrong with one FilingUpload P sent (its headers, id, route, key, signature)."""
    problems: list[str] = []
    names = [k for k, _ in rec.headers]
    h = {k: v.decode("utf-8", "replace") for k, v in rec.headers}
    host = rec.topic.split(".")[2]
    for name in (H_MESSAGE_ID, H_MESSAGE_TYPE, H_SOURCE, H_TARGET, H_SENT_AT, H_REPLY_TO):
        if name not in h:
            problems.append(f"{name} missing")
        elif names.count(name) > 1:
            problems.append(f"{name} appears {names.count(name)} times")
    if names.count(H_DEADLINE) != 1:
        problems.append(f"xs-deadline appears {names.count(H_DEADLINE)} times, expected once")
    if h.get(H_MESSAGE_TYPE, FilingUpload.avro_name) != FilingUpload.avro_name:
        problems.append(f"xs-message-type {h[H_MESSAGE_TYPE]!r}, expected {FilingUpload.avro_name}")
    if h.get(H_TARGET, host) != host:
        problems.append(f"xs-target {h[H_TARGET]!r}, but the record is in {rec.topic}")
    own = topic(FAMILY_REPLY, kit.p)
    if h.get(H_REPLY_TO, own) != own:
        problems.append(f"xs-reply-to {h[H_REPLY_TO]!r}, expected {own}")
    sent_at = h.get(H_SENT_AT, "")
    if not sent_at.isdigit():
        problems.append(f"xs-sent-at {sent_at!r} is not epoch milliseconds")
    deadline = h.get(H_DEADLINE, "")
    if not deadline.isdigit():
        problems.append(f"xs-deadline {deadline!r} is not epoch milliseconds")
    elif sent_at.isdigit() and int(deadline) <= int(sent_at):
        problems.append(f"xs-deadline {deadline} is not after xs-sent-at {sent_at}")
    attempt = h.get(H_ATTEMPT, "1")
    if not attempt.isdigit() or int(attempt) < 1:
        problems.append(f"xs-attempt {attempt!r}, expected 1 or more")
    try:
        filing = kit.codec.decode_as(rec.value or b"", FilingUpload)
    except BusError as exc:
        return [*problems, f"the value does not decode as a FilingUpload: {exc}"]
    parts = filing.filing_id.split("-", 2)
    if not (
        len(parts) == 3
        and parts[0] == "F"
        and len(parts[1]) == 6
        and parts[1].isdigit()
        and province_of(parts[1]) == kit.p
        and parts[2]
    ):
        problems.append(f"filing_id {filing.filing_id!r} is not F-<{kit.p} or its region>-<unique>")
    route = (province_of(filing.home_region), province_of(filing.host_region))
    if route != (kit.p, host):
        problems.append(f"the filing goes {route[0]}->{route[1]}, the headers {kit.p}->{host}")
    if rec.key != filing.person_id.encode():
        problems.append(f"key {rec.key!r}, expected the person id")
    if H_SIGNATURE not in h:
        return [*problems, "unsigned"]
    try:  # the signature as of its own xs-sent-at: the filing may be days old
        at = int(sent_at) if sent_at.isdigit() else now_ms()
        verified = kit.verifier.verify(rec.headers, rec.key, rec.value, at)
    except BusError as exc:
        return [*problems, f"the signature does not verify: {exc}"]
    key = kit.directory.keyring().get(verified.key_id)
    if key is None or key.province != kit.p:
        problems.append(f"signed with {verified.key_id}, not a key of {kit.p}")
    return problems


async def _headers_requests(kit: Kit) -> None:
    if not kit.own_requests:
        hosts = ", ".join(s.host for s in (kit.cp.instant, kit.cp.delayed) if s is not None)
        raise CheckSkipped(f"{kit.p} sent no FilingUpload to the kit's hosts ({hosts or 'none'})")
    newest = kit.own_requests[-REQUESTS_CHECKED:]
    found = [
        f"{rec.topic}@{rec.partition}:{rec.offset}: {p}"
        for rec in newest
        for p in _request_problems(kit, rec)
    ]
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    require(not found, "; ".join(found[:5]) + more)


# --- settlement, reconciliation, reversal, clearing: P as home ---------------------------------
async def _reviewed(
    kit: Kit, side: HostSide, person: FiledPerson, admitted_at: dt.datetime | None = None
) -> tuple[ClaimPackage, Sent, ReviewResult]:
    """A claim of ``person`` that P reviewed (skips when P gives no review: the claim checks
    say why)."""
    claim = kit.claim(side, person, admitted_at=admitted_at)
    sent, first = await kit.claim_exchange(claim, side)
    rec, _ = await _review_result(kit, sent, first)
    if kit.type_of(rec) != ReviewResult.avro_name:
        raise CheckSkipped(f"{kit.p} answered the claim with {kit.type_of(rec)}, no review")
    return claim, sent, kit.decode(rec, ReviewResult)


def _notice(claim: ClaimPackage, review: ReviewResult, settled_at: dt.datetime) -> SettlementNotice:
    """The host's notice that ``claim`` is settled as reviewed."""
    return SettlementNotice(
        claim_id=claim.claim_id, personal_paid_fen=review.personal_fen, fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen, assistance_fen=review.assistance_fen,
        settled_at=settled_at, advance_fen=claim.advance_fen,
        balance_fen=review.personal_fen - claim.advance_fen,
    )  # fmt: skip


async def _settle(
    kit: Kit,
    side: HostSide,
    claim: ClaimPackage,
    review: ReviewResult,
    settled_at: dt.datetime,
    *,
    strict: bool = False,
) -> tuple[Sent, Record]:
    """Send the notice of ``claim`` and, under the same key (the same partition, so P reads it
    after), a notice of a claim P never reviewed; returns the notice and the report of the
    second, which says that P is past the first. ``strict``: fail when the second is not
    reported or the first is refused (``settlement.notice``); else skip, naming that check."""
    key = claim.person_id.encode()
    notice = _notice(claim, review, settled_at)
    sent = await kit.send_message(
        FAMILY_SETTLEMENT, notice, side.host, kit.notice_envelope(notice, side.host), key=key
    )
    stray = notice.model_copy(update={"claim_id": f"C-{side.host}-{kit.unique()}"})
    marker = await kit.send_message(
        FAMILY_SETTLEMENT, stray, side.host, kit.notice_envelope(stray, side.host), key=key
    )
    try:
        rec = await kit.answer(marker.message_id)
        kit.report(rec, ErrorCode.INVALID_MESSAGE)
    except CheckFailed as exc:
        if strict and kit.observer.by_correlation.get(marker.message_id):
            raise fail(f"a notice of claim {stray.claim_id}, never reviewed: {exc}") from None
        if strict:
            raise fail(
                f"a notice of claim {stray.claim_id}, never reviewed, got no INVALID_MESSAGE "
                f"report within {kit.timeout_s:.0f} s"
            ) from None
        raise CheckSkipped(
            "cannot tell when P recorded the notice: a notice of a claim never reviewed got no "
            "INVALID_MESSAGE (see settlement.notice)"
        ) from None
    if strict:
        await asyncio.sleep(GRACE_S)
    refused = [
        r for r in kit.observer.by_correlation.get(sent.message_id, []) if kit.is_kit_topic(r)
    ]
    letter = kit.observer.dead_letters.get((sent.topic, sent.partition, sent.offset))
    if refused or letter is not None:
        why = f"{kit.type_of(refused[0])} on {refused[0].topic}" if refused else "dead-lettered"
        if strict:
            raise fail(f"the notice of reviewed claim {claim.claim_id} was refused: {why}")
        raise CheckSkipped(f"P refused the settlement notice ({why}; see settlement.notice)")
    return sent, rec


async def _settlement_notice(kit: Kit) -> None:
    side = kit.side()
    claim, _sent, review = await _reviewed(kit, side, kit.person(side))
    _notice_sent, rec = await _settle(
        kit, side, claim, review, dt.datetime.now(dt.UTC), strict=True
    )
    report = kit.decode(rec, ErrorReport)
    reason = report.details.get("reason")
    require(reason == "unknown_claim", f"details.reason {reason!r}, expected 'unknown_claim'")
    require(rec.key == claim.person_id.encode(), f"report key {rec.key!r}, expected the notice's")


async def _state_day(
    kit: Kit, host: str, day: dt.date, lines: Sequence[ReconciliationLine]
) -> tuple[ReconciliationStatement, Sent, Record, ReconciliationResult]:
    """State ``day`` to P as ``host``; P's answer."""
    statement = reconciliation.statement_of(host, kit.p, day, lines, f"S-{host}-{kit.unique()}")
    key = f"{host}:{day.isoformat()}".encode()
    sent = await kit.send_message(FAMILY_SETTLEMENT, statement, host, key=key)
    first = await kit.answer(sent.message_id)
    rec, _ = await _review_result(kit, sent, first)
    return statement, sent, rec, kit.decode(rec, ReconciliationResult)


async def _free_day(kit: Kit, side: HostSide, person: FiledPerson, slot: int) -> dt.date:
    """A past day, within ``person``'s filing, on which P has no settlement from ``side``'s
    host (an empty statement of it is MATCHED): ``slot``'s own days, so that the other
    reconciliation check of the run never settles on it."""
    today = dt.datetime.now(CST).date()
    n = min(DAYS_BACK, (today - person.valid_from).days) // DAY_SLOTS
    if n < 1:
        raise CheckSkipped(
            f"the person {kit.p} filed with {side.host} is valid only from {person.valid_from}: "
            f"file one valid from {DAY_SLOTS} days ago or earlier (the check settles a past day)"
        )
    tried = []
    for j in range(min(DAY_TRIES, n)):
        day = today - dt.timedelta(days=1 + ((kit.options.seed + j) % n) * DAY_SLOTS + slot)
        tried.append(day.isoformat())
        *_, result = await _state_day(kit, side.host, day, [])
        if result.outcome is ReconciliationOutcome.MATCHED:
            return day
        kinds = {d.kind for d in result.differences}
        require(
            kinds == {DifferenceKind.MISSING_AT_HOST},
            f"an empty statement of {day} got {result.outcome.value} with "
            f"{', '.join(sorted(k.value for k in kinds)) or 'no differences'}",
        )
    raise CheckSkipped(
        f"{kit.p} has settlements from {side.host} on every day tried ({', '.join(tried)}), "
        "an earlier run's: run with another --seed"
    )


async def _settled_day(
    kit: Kit, slot: int
) -> tuple[HostSide, dt.date, ClaimPackage, ReviewResult, ReconciliationLine]:
    """A claim P reviewed and the kit settled on a day of its own; its line as stated."""
    side = kit.side()
    person = kit.person(side)
    day = await _free_day(kit, side, person, slot)
    admitted = dt.datetime.combine(day, dt.time(9), CST)
    claim, _sent, review = await _reviewed(kit, side, person, admitted)
    await _settle(kit, side, claim, review, admitted + dt.timedelta(hours=2))
    line = ReconciliationLine(
        claim_id=claim.claim_id, total_fen=review.total_fen, fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen, assistance_fen=review.assistance_fen,
        personal_fen=review.personal_fen, advance_fen=claim.advance_fen, reversed=False,
    )  # fmt: skip
    return side, day, claim, review, line


def _answer_problems(
    kit: Kit,
    rec: Record,
    sent: Sent,
    paired: type[Message],
    key: bytes | None,
    **fields: tuple[object, object],
) -> list[str]:
    """The header problems of P's answer ``rec``, a key other than ``key``, and each
    ``name=(got, expected)`` that differs."""
    problems = kit.check_headers(rec, sent, paired)
    if rec.key != key:
        problems.append(f"key {rec.key!r}, expected {key!r}")
    return problems + [
        f"{n} {got!r}, expected {want!r}" for n, (got, want) in fields.items() if got != want
    ]


async def _reconciliation_matched(kit: Kit) -> None:
    side, day, _claim, _review, line = await _settled_day(kit, slot=0)
    statement, sent, rec, result = await _state_day(kit, side.host, day, [line])
    require(
        result.outcome is ReconciliationOutcome.MATCHED,
        f"{result.outcome.value}: "
        + "; ".join(f"{d.kind.value} {d.claim_id}: {d.note}" for d in result.differences)[:300],
    )
    problems = _answer_problems(
        kit, rec, sent, ReconciliationResult, f"{side.host}:{day.isoformat()}".encode(),
        statement_id=(result.statement_id, statement.statement_id), day=(result.day, day),
        count=(result.count, 1), fund_fen=(result.fund_fen, line.fund_fen),
        critical_illness_fen=(result.critical_illness_fen, line.critical_illness_fen),
        assistance_fen=(result.assistance_fen, line.assistance_fen),
        personal_fen=(result.personal_fen, line.personal_fen),
    )  # fmt: skip
    require(not problems, "; ".join(problems))


async def _reconciliation_mismatch(kit: Kit) -> None:
    side, day, claim, review, line = await _settled_day(kit, slot=1)
    planted = line.model_copy(
        update={"fund_fen": line.fund_fen + 1, "total_fen": line.total_fen + 1}
    )
    statement, sent, rec, result = await _state_day(kit, side.host, day, [planted])
    require(
        result.outcome is ReconciliationOutcome.MISMATCHED,
        f"{result.outcome.value}, though the statement's fund share of {claim.claim_id} is "
        f"{planted.fund_fen} fen and the notice's {review.fund_fen}",
    )
    diff = next((d for d in result.differences if d.claim_id == claim.claim_id), None)
    if diff is None:
        raise fail(f"MISMATCHED, but no difference names {claim.claim_id}")
    problems = _answer_problems(
        kit, rec, sent, ReconciliationResult, f"{side.host}:{day.isoformat()}".encode(),
        statement_id=(result.statement_id, statement.statement_id), day=(result.day, day),
        kind=(diff.kind, DifferenceKind.AMOUNT_DIFFERS),
        host_fund_fen=(diff.host_fund_fen, planted.fund_fen),
        home_fund_fen=(diff.home_fund_fen, review.fund_fen),
    )  # fmt: skip
    require(not problems, "; ".join(problems))
    watched = [*kit.cp.kit_provinces(), kit.p]
    require(diff.responsible in watched, f"responsible {diff.responsible!r}: no province here")
    got, report = await kit.report_about(
        sent.message_id, ErrorCode.RECONCILIATION_MISMATCH, diff.responsible
    )
    problems = [
        f"{n} {a!r}, expected {b!r}"
        for n, a, b in (
            ("details.claim_id", report.details.get("claim_id"), claim.claim_id),
            ("details.statement_id", report.details.get("statement_id"), statement.statement_id),
            ("severity", report.severity, Severity.ERROR),
            ("origin", report.origin, side.host),
            ("detected_by", report.detected_by, kit.p),
        )
        if a != b
    ]
    if H_CORRELATION_ID in dict(got.headers):
        problems.append("the report carries xs-correlation-id (it is no answer)")
    require(not problems, "the RECONCILIATION_MISMATCH report: " + "; ".join(problems))


def _reversal_of(
    kit: Kit, side: HostSide, claim: ClaimPackage, request_id: str, review: ReviewResult
) -> ReversalRequest:
    """The host's request to cancel ``claim``, reviewed as ``review`` under ``request_id``."""
    return ReversalRequest(
        reversal_id=f"V-{side.host}-{kit.unique()}", claim_id=claim.claim_id,
        claim_request_id=request_id, person_id=claim.person_id, home_region=claim.home_region,
        host_region=claim.host_region, reason=ReversalReason.WRONG_PATIENT,
        note="conformance kit", fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen, assistance_fen=review.assistance_fen,
        personal_paid_fen=review.personal_fen, requested_at=dt.datetime.now(dt.UTC),
    )  # fmt: skip


async def _reverse(
    kit: Kit, side: HostSide, request: ReversalRequest
) -> tuple[Sent, Record, ReversalResult]:
    """Send ``request`` to P as ``side``'s host; P's ReversalResult (fails on anything else,
    or on an answer about another reversal or claim)."""
    sent = await kit.send_message(FAMILY_CLAIM, request, side.host)
    rec, _ = await _review_result(kit, sent, await kit.answer(sent.message_id))
    result = kit.decode(rec, ReversalResult)
    problems = _answer_problems(
        kit, rec, sent, ReversalResult, request.person_id.encode(),
        reversal_id=(result.reversal_id, request.reversal_id),
        claim_id=(result.claim_id, request.claim_id),
    )  # fmt: skip
    if rec.topic != topic(FAMILY_REPLY, side.host):
        problems.append(f"sent to {rec.topic}, not the request's xs-reply-to")
    require(not problems, "; ".join(problems))
    return sent, rec, result


async def _confirmed(
    kit: Kit, *, strict: bool = False
) -> tuple[HostSide, ClaimPackage, ReversalRequest, ReversalResult]:
    """A claim P reviewed, and P's answer to its reversal. ``strict``: fail unless CONFIRMED
    as the contract says (``reversal.confirmed``); else skip, naming that check."""
    side = kit.side()
    claim, sent, review = await _reviewed(kit, side, kit.person(side))
    request = _reversal_of(kit, side, claim, sent.message_id, review)
    _sent, _rec, result = await _reverse(kit, side, request)
    problems = []
    if result.decision is not ReversalDecision.CONFIRMED:
        problems.append(f"{result.decision.value} {result.refusal_code}: {result.note[:120]}")
    elif result.refusal_code is not None:
        problems.append(f"CONFIRMED with refusal_code {result.refusal_code!r}")
    for name, restored, share in (
        ("fund", result.fund_restored_fen, review.fund_fen),
        ("critical_illness", result.critical_illness_restored_fen, review.critical_illness_fen),
        ("assistance", result.assistance_restored_fen, review.assistance_fen),
    ):
        if not 0 <= restored <= share:
            problems.append(f"{name}_restored_fen {restored}, the review's share is {share}")
    if problems and not strict:
        raise CheckSkipped(
            f"the reversal of a reviewed claim was not confirmed as it should be ({problems[0]}; "
            "see reversal.confirmed)"
        )
    require(not problems, "; ".join(problems))
    return side, claim, request, result


async def _reversal_confirmed(kit: Kit) -> None:
    await _confirmed(kit, strict=True)


async def _reversal_idempotent(kit: Kit) -> None:
    side, _claim, request, first = await _confirmed(kit)
    _sent, _rec, again = await _reverse(kit, side, request)  # a new xs-message-id
    require(
        again == first,
        f"the same reversal under a new message id got {again.decision.value} decided at "
        f"{again.decided_at:%H:%M:%S.%f}, not the stored answer ({first.decision.value} at "
        f"{first.decided_at:%H:%M:%S.%f})",
    )


async def _reversal_already_reversed(kit: Kit) -> None:
    side, _claim, request, _first = await _confirmed(kit)
    second = request.model_copy(update={"reversal_id": f"V-{side.host}-{kit.unique()}"})
    _sent, _rec, result = await _reverse(kit, side, second)
    require(
        result.decision is ReversalDecision.REFUSED and result.refusal_code == "ALREADY_REVERSED",
        f"a second reversal of reversed claim {request.claim_id} got {result.decision.value}"
        f"{'' if result.refusal_code is None else ' ' + result.refusal_code}, expected "
        "REFUSED ALREADY_REVERSED",
    )


async def _reversal_not_reviewed(kit: Kit) -> None:
    side = _any_side(kit)
    claim = kit.claim(side)  # never sent: P reviewed no such claim
    review = ReviewResult(
        claim_id=claim.claim_id, decision=ReviewDecision.APPROVED, total_fen=claim.total_fen,
        eligible_fen=claim.total_fen, deductible_fen=0, fund_fen=claim.total_fen,
        critical_illness_fen=0, assistance_fen=0, personal_fen=0, advance_fen=0, balance_fen=0,
        adjustments=(), reviewer="kit", reviewed_at=dt.datetime.now(dt.UTC),
    )  # fmt: skip
    request = _reversal_of(kit, side, claim, new_id(), review)
    _sent, _rec, result = await _reverse(kit, side, request)
    require(
        result.decision is ReversalDecision.REFUSED and result.refusal_code == "NOT_REVIEWED",
        f"the reversal of a claim never reviewed got {result.decision.value}"
        f"{'' if result.refusal_code is None else ' ' + result.refusal_code}, expected "
        "REFUSED NOT_REVIEWED",
    )
    for name in ("fund", "critical_illness", "assistance"):
        restored = getattr(result, f"{name}_restored_fen")
        require(restored == 0, f"refused, yet {name}_restored_fen {restored}")


async def _state_month(
    kit: Kit, side: HostSide, month: str, lines: Sequence[ClearingLine]
) -> tuple[ClearingStatement, Sent, ClearingResponse, list[str]]:
    """State ``month`` to P as ``side``'s host; P's answer and what is wrong with its
    headers, key and echoed ids."""
    statement = clearing.statement_of(
        side.host, kit.p, month, lines, f"S-{side.host}-{kit.unique()}"
    )
    key = f"{side.host}:{month}".encode()
    sent = await kit.send_message(FAMILY_SETTLEMENT, statement, side.host, key=key)
    rec, _ = await _review_result(kit, sent, await kit.answer(sent.message_id))
    response = kit.decode(rec, ClearingResponse)
    problems = _answer_problems(
        kit, rec, sent, ClearingResponse, key,
        statement_id=(response.statement_id, statement.statement_id),
        month=(response.month, month),
        sum=(response.confirmed_fen + response.disputed_fen, statement.owed_fen),
    )  # fmt: skip
    return statement, sent, response, problems


async def _clearing_confirmed(kit: Kit) -> None:
    side = kit.side()
    claim, _sent, review = await _reviewed(kit, side, kit.person(side))
    settled = dt.datetime.now(dt.UTC)
    await _settle(kit, side, claim, review, settled)
    line = ClearingLine(
        claim_id=claim.claim_id, fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen, assistance_fen=review.assistance_fen,
        reversed=False,
    )  # fmt: skip
    month = settled.astimezone(CST).strftime("%Y-%m")
    statement, _sent, response, problems = await _state_month(kit, side, month, [line])
    if response.decision is not ClearingDecision.CONFIRMED:
        problems.insert(
            0,
            f"{response.decision.value}: "
            + "; ".join(f"{d.claim_id} {d.reason_code}: {d.note}" for d in response.disputes)[:300],
        )
    if response.confirmed_fen != statement.owed_fen:
        problems.append(f"confirmed_fen {response.confirmed_fen}, owed {statement.owed_fen}")
    require(not problems, "; ".join(problems))


async def _clearing_disputed(kit: Kit) -> None:
    side = _any_side(kit)
    claim_id = f"C-{side.host}-{kit.unique()}"  # never sent: P reviewed no such claim
    line = ClearingLine(
        claim_id=claim_id, fund_fen=ITEM_FEN, critical_illness_fen=0, assistance_fen=0,
        reversed=False,
    )  # fmt: skip
    month = dt.datetime.now(CST).strftime("%Y-%m")
    statement, sent, response, problems = await _state_month(kit, side, month, [line])
    dispute = next((d for d in response.disputes if d.claim_id == claim_id), None)
    if response.decision is not ClearingDecision.DISPUTED or dispute is None:
        raise fail(
            f"{response.decision.value} with no dispute of {claim_id}, a claim never reviewed"
        )
    problems += [
        f"{n} {a!r}, expected {b!r}"
        for n, a, b in (
            ("reason_code", dispute.reason_code, "NOT_REVIEWED"),
            ("home_owed_fen", dispute.home_owed_fen, None),
            ("disputed_fen", response.disputed_fen, ITEM_FEN),
            ("confirmed_fen", response.confirmed_fen, 0),
        )
        if a != b
    ]
    require(not problems, "; ".join(problems))
    got, report = await kit.report_about(sent.message_id, ErrorCode.CLEARING_DISPUTED, side.host)
    problems = [
        f"{n} {a!r}, expected {b!r}"
        for n, a, b in (
            ("details.claim_id", report.details.get("claim_id"), claim_id),
            ("details.statement_id", report.details.get("statement_id"), statement.statement_id),
            ("details.reason_code", report.details.get("reason_code"), "NOT_REVIEWED"),
            ("severity", report.severity, Severity.ERROR),
            ("responsible", report.responsible, side.host),
            ("key", got.key, f"{side.host}:{month}".encode()),
        )
        if a != b
    ]
    if H_CORRELATION_ID in dict(got.headers):
        problems.append("the report carries xs-correlation-id (it is no answer)")
    require(not problems, "the CLEARING_DISPUTED report: " + "; ".join(problems))


CHECKS: Final[tuple[Check, ...]] = (
    Check(
        "receipt.filing",
        "a FilingUpload from a home gets a FilingReceipt (REGISTERED, ids echoed)",
        _receipt_filing,
    ),
    Check(
        "headers.required",
        "answers carry the required headers: source P, target the kit, correlation, type",
        _headers_required,
    ),
    Check(
        "key.person_id",
        "answers and error reports are keyed by the request's person id",
        _key_person_id,
    ),
    Check(
        "encoding.single_object",
        "values are single-object Avro (c301 + a contract fingerprint) and decode",
        _encoding,
    ),
    Check(
        "signature.answers_signed",
        "P's records verify with a key the directory gives P",
        _answers_signed,
    ),
    Check(
        "resend.idempotent",
        "a re-sent FilingUpload gets its stored answer again (same id and value, attempt + 1)",
        _resend_idempotent,
    ),
    Check(
        "error.REGION_NOT_CONNECTED",
        "a filing from a region without agreement gets REGION_NOT_CONNECTED",
        _region_not_connected,
    ),
    Check(
        "error.INVALID_MESSAGE",
        "an unknown fingerprint is dead-lettered and reported INVALID_MESSAGE",
        _invalid_message,
    ),
    Check(
        "error.INVALID_MESSAGE.reply_to",
        "a request whose xs-reply-to is not the sender's is refused (header_mismatch)",
        _reply_to,
    ),
    Check(
        "error.INVALID_MESSAGE.unknown_symbol",
        "a filing whose enum reads UNKNOWN is refused (unknown_symbol), not handled",
        _unknown_symbol,
    ),
    Check(
        "deadletter.bytes",
        "an unreadable record is dead-lettered byte for byte with the xs-dlq-* headers",
        _deadletter_bytes,
    ),
    Check(
        "deadletter.oversized",
        "a record over 1 MiB is refused (oversized): dead letter with its size and SHA-256",
        _oversized,
    ),
    Check(
        "error.SIGNATURE_INVALID",
        "an unsigned record is refused (SIGNATURE_INVALID, kind unsigned), not handled",
        _unsigned,
    ),
    Check(
        "signature.bad_signature",
        "a record changed after signing is refused (kind bad_signature), not handled",
        _bad_signature,
    ),
    Check(
        "signature.key_not_owned",
        "a record signed with another province's key is refused (kind key_not_owned)",
        _key_not_owned,
    ),
    Check(
        "signature.duplicate_header",
        "a record with a signed header twice is refused (kind duplicate_header)",
        _duplicate_header,
    ),
    Check(
        "signature.stale",
        "a record sent 8 days ago is refused (kind stale), not handled",
        _stale,
    ),
    Check(
        "signature.replayed",
        "a signed record written twice is handled once; the copy is refused (replayed)",
        _replayed,
    ),
    Check(
        "error.NOT_FILED",
        "a claim for a person P never filed gets NOT_FILED",
        _not_filed,
    ),
    Check(
        "error.FILING_EXPIRED",
        "a claim for a visit before the person's filing began gets FILING_EXPIRED",
        _filing_expired,
    ),
    Check(
        "error.HOSPITAL_NOT_DESIGNATED",
        "a claim from a hospital the directory does not designate gets HOSPITAL_NOT_DESIGNATED",
        _hospital_not_designated,
    ),
    Check(
        "review.money_identities",
        "a valid claim's ReviewResult: fund + CI + assistance + personal = total, ≥ 0",
        _money_identities,
    ),
    Check(
        "resend.idempotent_review",
        "a re-sent ClaimPackage gets the same ReviewResult byte for byte (reviewed once)",
        _resend_review,
    ),
    Check(
        "error.DUPLICATE_CLAIM",
        "a new message for an answered claim_id gets DUPLICATE_CLAIM",
        _duplicate_claim,
    ),
    Check(
        "error.AMOUNT_MISMATCH",
        "a claim whose total is not the sum of its items gets AMOUNT_MISMATCH",
        _amount_mismatch,
    ),
    Check(
        "error.CATALOGUE_ITEM_UNKNOWN",
        "an item outside the host catalogue gets CATALOGUE_ITEM_UNKNOWN",
        _catalogue_unknown,
    ),
    Check(
        "ack.deferred",
        "a DELAYED claim answered later is acknowledged at once, and again when re-sent",
        _ack_deferred,
    ),
    Check(
        "error.ORPHAN_REPLY",
        "an answer to a request P never sent gets ORPHAN_REPLY",
        _orphan_reply,
    ),
    Check(
        "headers.requests",
        "P's FilingUploads: xs-reply-to its reply topic, xs-deadline, its own filing_id, signed",
        _headers_requests,
    ),
    Check(
        "settlement.notice",
        "a notice of a reviewed claim is taken; one of a claim never reviewed gets INVALID_MESSAGE",
        _settlement_notice,
    ),
    Check(
        "reconciliation.matched",
        "a day's statement of the claims the kit settled is MATCHED",
        _reconciliation_matched,
    ),
    Check(
        "reconciliation.mismatch",
        "a planted amount difference is MISMATCHED naming the claim, and reported",
        _reconciliation_mismatch,
    ),
    Check(
        "reversal.confirmed",
        "a ReversalRequest of a reviewed claim is CONFIRMED, ids echoed",
        _reversal_confirmed,
    ),
    Check(
        "reversal.idempotent",
        "the same reversal under a new message id gets the stored ReversalResult",
        _reversal_idempotent,
    ),
    Check(
        "reversal.already_reversed",
        "a second reversal of a reversed claim is REFUSED ALREADY_REVERSED",
        _reversal_already_reversed,
    ),
    Check(
        "reversal.not_reviewed",
        "a reversal of a claim never reviewed is REFUSED NOT_REVIEWED",
        _reversal_not_reviewed,
    ),
    Check(
        "clearing.confirmed",
        "a month's statement of a reviewed, settled claim is CONFIRMED in full",
        _clearing_confirmed,
    ),
    Check(
        "clearing.disputed",
        "a line of a claim never reviewed is DISPUTED NOT_REVIEWED, and reported",
        _clearing_disputed,
    ),
)
"""Every check, in the order reported."""


# --- running and reporting -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CheckResult:
    """How one check went."""

    check: Check
    status: str
    """PASS, FAIL or SKIP."""
    why: str = ""
    """Why it failed or was skipped (or a note on a pass)."""
    seconds: float = 0.0


@dataclass
class Report:
    """A whole run."""

    province: str
    bootstrap: str
    seed: int
    counterparts: str
    persons: dict[str, int]
    """Filed persons found per kit host."""
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        """Checks with ``status``."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return self.count(FAIL) == 0

    def failed(self) -> list[str]:
        """Ids of the failed checks."""
        return [r.check.id for r in self.results if r.status == FAIL]

    def lines(self) -> list[str]:
        """One line per check, then the summary line."""
        out = []
        for r in self.results:
            why = f"; {r.why}" if r.why else ""
            out.append(f"{r.status} {r.check.id} — {r.check.description}{why}")
        out.append(self.summary())
        return out

    def summary(self) -> str:
        """``N checks: P passed, F failed, S skipped``."""
        return (
            f"{len(self.results)} checks: {self.count(PASS)} passed, {self.count(FAIL)} failed, "
            f"{self.count(SKIP)} skipped"
        )

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (``--json FILE``)."""
        return {
            "province": self.province,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "counterparts": self.counterparts,
            "filed_persons": self.persons,
            "seconds": round(self.seconds, 3),
            "checks": [
                {
                    "id": r.check.id,
                    "description": r.check.description,
                    "status": r.status,
                    "why": r.why,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.results
            ],
            "summary": {
                "checks": len(self.results),
                "passed": self.count(PASS),
                "failed": self.count(FAIL),
                "skipped": self.count(SKIP),
            },
        }


async def run_check(kit: Kit, check: Check) -> CheckResult:
    """One check, bounded by the check timeout (plus the grace waits it may add)."""
    started = time.monotonic()
    bound = kit.timeout_s + CHECK_MARGIN_S
    _DEADLINE.set(asyncio.get_running_loop().time() + kit.timeout_s)
    try:
        await asyncio.wait_for(check.run(kit), bound)
        status, why = PASS, ""
    except CheckFailed as exc:
        status, why = FAIL, str(exc)
    except CheckSkipped as exc:
        status, why = SKIP, str(exc)
    except TimeoutError:
        status, why = FAIL, f"no outcome within {bound:.0f} s"
    except BusError as exc:
        status, why = FAIL, f"the kit could not talk to the broker: {exc}"
    except Exception as exc:  # a record the kit did not expect at all: say so, go on
        status, why = FAIL, f"unexpected {type(exc).__name__} in the check: {exc}"
    return CheckResult(check, status, why.replace("\n", " "), time.monotonic() - started)


async def missing_topics(settings: BusSettings, bootstrap: str, names: Sequence[str]) -> list[str]:
    """Which of ``names`` the broker does not have."""
    async with Admin(settings, bootstrap) as admin:
        have = set(await admin.list_topics())
    return [n for n in names if n not in have]


async def run_conformance(
    options: KitOptions,
    settings: BusSettings,
    *,
    directory: Directory | None = None,
    keys_dir: Path | None = None,
) -> Report:
    """A whole run against P on ``options.bootstrap``. ValueError for a usage problem
    (P not in the directory, unusable keys, missing topics)."""
    started = time.monotonic()
    directory = directory or Directory.default()
    if options.province not in directory.provinces():
        raise ValueError(f"--province {options.province}: not a province of the directory")
    keys = Keys(directory, keys_dir)
    cp = Counterparts.choose(directory, options.province, keys.provinces())
    if not cp.kit_provinces():
        raise ValueError(
            f"the kit can sign as no province with an agreement with {options.province}: "
            "give their private keys with --keys DIR (<code>.pem)"
        )
    needed = [
        topic(f, options.province)
        for f in (
            FAMILY_FILING,
            FAMILY_CLAIM,
            FAMILY_SETTLEMENT,
            FAMILY_REPLY,
            FAMILY_ERROR,
            FAMILY_DLQ,
        )
    ]
    needed += [
        topic(f, k) for k in cp.kit_provinces() for f in (FAMILY_FILING, FAMILY_REPLY, FAMILY_ERROR)
    ]
    missing = await missing_topics(settings, options.bootstrap, needed)
    if missing:
        raise ValueError(
            f"topics missing on {options.bootstrap}: {', '.join(missing)} (an administrator "
            "creates the six topics of every province)"
        )
    kit = Kit(options, settings, directory, keys, cp)
    wanted = [c for c in CHECKS if not options.only or c.id.startswith(tuple(options.only))]
    await kit.start()
    try:
        gate = asyncio.Semaphore(PARALLEL)

        async def bounded(check: Check) -> CheckResult:
            async with gate:
                return await run_check(kit, check)

        results = await asyncio.gather(*(bounded(c) for c in wanted))
    finally:
        await kit.stop()
    return Report(
        province=options.province,
        bootstrap=options.bootstrap,
        seed=options.seed,
        counterparts=cp.describe(),
        persons={h: len(p) for h, p in kit.persons.items()},
        results=list(results),
        seconds=time.monotonic() - started,
    )


def write_json(report: Report, path: Path) -> None:
    """Write ``report`` as JSON to ``path``."""
    path.write_text(
        json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
