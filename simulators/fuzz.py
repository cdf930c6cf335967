"""Hostile-record harness: ``xsettle fuzz`` sends mutated records into one province's inbox and
checks that every one of them has an outcome, that every inbox partition still answers
afterwards, and that the process did not grow.

One province runs in this process (:class:`~adapters.province.ProvinceSystem`, the real node
and roles) on the embedded broker or ``--bootstrap``. From valid records of every family (a
filing and a claim request, a settlement notice, a receipt, a review and an error report,
sent by a partner province) it derives ``--records`` mutated ones with a seeded RNG: bit flips,
truncation, wrong markers and fingerprints, missing or contradicting headers, header keys and
values that are not UTF-8, values over the contract's record limit, negative and huge money,
dates far out, a wrong ``xs-reply-to`` or ``xs-source``, duplicates, and valid controls.

Each sent record (known by its topic, partition and offset, and by its ``xs-message-id``) is
then classified by the first outcome that names it:

* **dead-lettered**: a record in ``xsettle.dlq.<P>`` whose ``xs-dlq-original-*`` headers name it;
* **reported**: an ErrorReport on any ``xsettle.error.*`` topic whose ``ref_topic``,
  ``ref_partition``, ``ref_offset`` or ``xs-correlation-id`` names it;
* **answered**: a record on any ``xsettle.reply.*`` topic whose ``xs-correlation-id`` is its id;
* **handled**: the node's store has its message id as processed;
* **silent**: none of these, which is a bug.

The last line printed is ``N records: D dead-lettered, R reported, A answered, H handled,
S silent``; the exit code is 1 when a record is silent, an inbox partition stopped answering or
the process's resident memory grew by more than :data:`RSS_GROWTH_MAX_MB`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from adapters.directory import Directory, province_of
from adapters.province import ProvinceSystem
from bus.broker import EmbeddedBroker, create_contract_topics
from bus.codec import Codec
from bus.constants import (
    FAMILY_CLAIM,
    FAMILY_DLQ,
    FAMILY_ERROR,
    FAMILY_FILING,
    FAMILY_REPLY,
    FAMILY_SETTLEMENT,
    H_CORRELATION_ID,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_REPLY_TO,
    H_SOURCE,
    H_TARGET,
    INBOX_FAMILIES,
    MAX_RECORD_BYTES,
    topic,
)
from bus.deadletter import parse_dead_letter
from bus.envelope import Envelope, new_id, now_ms
from bus.errors import BusError, DecodeError
from bus.logs import configure
from bus.models import ErrorReport, Message
from bus.settings import BusSettings
from bus.transport import (
    Admin,
    Consumer,
    Headers,
    Partition,
    Producer,
    RawRecord,
    Record,
    write_raw_records,
)
from simulators import samples
from simulators.keys import sign_as

log = structlog.get_logger(__name__)

DEAD_LETTERED = "dead-lettered"
REPORTED = "reported"
ANSWERED = "answered"
HANDLED = "handled"
SILENT = "silent"
OUTCOMES = (DEAD_LETTERED, REPORTED, ANSWERED, HANDLED, SILENT)
"""In order of precedence: a record is classified by the first that names it."""

RSS_GROWTH_MAX_MB = 20.0
"""Resident memory may grow this much over a run (after warm-up) before it counts as a leak."""
OVERSIZED_BYTES = 2_000_000
"""Value size of an oversized record: about twice the contract's MAX_RECORD_BYTES."""
WARMUP_RECORDS = 300
"""Valid records sent before the memory baseline is taken (caches, connections, buffers)."""
SEND_CHUNK = 200
"""Records sent concurrently before their acknowledgements are awaited."""
SETTLE_S = 10.0
"""The run ends once this long passes with no silent record finding an outcome (a handler's
retries take up to a few seconds; a stuck partition never moves)."""
PROBE_TIMEOUT_S = 30.0
"""How long the liveness probes (one valid record per inbox partition) may take."""
SETUP_ALLOWANCE_S = 60.0
"""Time for the broker, the topics and the node's start and stop, beyond ``--timeout``."""
POLL_S = 0.5
"""How often outcomes are recounted while waiting."""
FAR_FUTURE = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)
FAR_PAST = dt.datetime(1, 1, 2, tzinfo=dt.UTC)

FAMILIES = ("filing", "claim", "notice", "receipt", "review", "error")
"""Message families the harness starts from, one valid template each."""

MUTATIONS: dict[str, int] = {
    "valid": 8,
    "bit_flip": 8,
    "truncated": 6,
    "bad_marker": 4,
    "wrong_fingerprint": 4,
    "empty_value": 3,
    "missing_header": 6,
    "wrong_type_header": 4,
    "wrong_target": 3,
    "wrong_source": 5,
    "wrong_family_topic": 3,
    "bad_number_header": 4,
    "non_utf8_header_value": 4,
    "non_utf8_header_key": 3,
    "negative_money": 4,
    "huge_money": 4,
    "far_date": 4,
    "wrong_reply_to": 5,
    "duplicate": 3,
    "unsigned": 4,
    "forged_signature": 3,
    "tampered_after_signing": 3,
}
"""Mutation kinds and their relative weights; ``oversized`` records are added by count."""


# --- planning (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Planned:
    """One record to send: what it is and its exact bytes."""

    kind: str
    """Mutation kind."""
    family: str
    """Template family it was derived from."""
    topic: str
    """Destination topic."""
    key: bytes | None
    """Record key."""
    value: bytes
    """Record value."""
    headers: tuple[tuple[bytes, bytes], ...]
    """Headers with raw keys (a key may not be UTF-8)."""
    partition: int | None = None
    """Explicit partition (raw records, probes); None: by key."""

    @property
    def raw(self) -> bool:
        """True when no Kafka client would send it (a header key that is not UTF-8, or a
        value over the producer's request size): written with the raw batch writer."""
        if len(self.value) > MAX_RECORD_BYTES:
            return True
        try:
            for name, _ in self.headers:
                name.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    @property
    def message_id(self) -> str | None:
        """``xs-message-id`` as the node reads it (undecodable bytes replaced)."""
        found = None
        for name, value in self.headers:
            if name == H_MESSAGE_ID.encode():
                found = value.decode("utf-8", errors="replace")
        return found

    def text_headers(self) -> Headers:
        """Headers for the ordinary producer (keys are UTF-8 here)."""
        return tuple((name.decode("utf-8"), value) for name, value in self.headers)


@dataclass(frozen=True, slots=True)
class Sent:
    """A record as written: where, and what it was."""

    kind: str
    """Mutation kind (or ``probe`` / ``warmup``)."""
    family: str
    """Template family."""
    topic: str
    """Topic written to."""
    partition: int
    """Partition written to."""
    offset: int
    """Offset written at."""
    message_id: str | None
    """Its ``xs-message-id``, when it has one."""


@dataclass
class Seen:
    """What the province's outputs say about the records sent (bounded by the run)."""

    dead_lettered: dict[tuple[str, int, int], str] = field(default_factory=dict)
    """Original coordinates of each dead letter, with its error kind."""
    reported_at: set[tuple[str, int, int]] = field(default_factory=set)
    """Coordinates named by an ErrorReport's ref_topic/ref_partition/ref_offset."""
    reported_ids: set[str] = field(default_factory=set)
    """``xs-correlation-id`` of every ErrorReport."""
    answered_ids: set[str] = field(default_factory=set)
    """``xs-correlation-id`` of every reply."""

    def take(self, rec: Record, codec: Codec) -> None:
        """Note what one output record says."""
        if rec.poison is not None:
            return
        family = rec.topic.split(".")[1] if rec.topic.count(".") == 2 else ""
        correlation = None
        for name, value in rec.headers:
            if name == H_CORRELATION_ID:
                correlation = value.decode("utf-8", errors="replace")
        if family == FAMILY_DLQ:
            info = parse_dead_letter(rec.headers)
            if (
                info.original_topic is not None
                and info.original_partition is not None
                and info.original_offset is not None
                and not info.is_replay_marker
            ):
                where = (info.original_topic, info.original_partition, info.original_offset)
                self.dead_lettered[where] = info.error_kind or "?"
        elif family == FAMILY_ERROR:
            if correlation is not None:
                self.reported_ids.add(correlation)
            with contextlib.suppress(BusError):
                report = codec.decode(rec.value or b"")
                if (
                    isinstance(report, ErrorReport)
                    and report.ref_topic is not None
                    and report.ref_partition is not None
                    and report.ref_offset is not None
                ):
                    self.reported_at.add(
                        (report.ref_topic, report.ref_partition, report.ref_offset)
                    )
        elif family == FAMILY_REPLY and correlation is not None:
            self.answered_ids.add(correlation)


def classify(sent: Sent, seen: Seen, processed: Callable[[str], bool]) -> str:
    """The outcome of one sent record: the first of :data:`OUTCOMES` that names it."""
    where = (sent.topic, sent.partition, sent.offset)
    if where in seen.dead_lettered:
        return DEAD_LETTERED
    mid = sent.message_id
    if where in seen.reported_at or (mid is not None and mid in seen.reported_ids):
        return REPORTED
    if mid is not None and mid in seen.answered_ids:
        return ANSWERED
    if mid is not None and processed(mid):
        return HANDLED
    return SILENT


def _region_of(directory: Directory, province: str) -> str:
    for region in directory.regions():
        if province_of(region.code) == province:
            return region.code
    return province[:2] + "0100"


@dataclass(frozen=True, slots=True)
class Parties:
    """The province under test and the partner that sends to it."""

    province: str
    """Province under test (P)."""
    sender: str
    """Partner province that sends the records (S)."""
    sender_home_region: str
    """S's region with an agreement to be treated in P (filings from S to P)."""
    province_region: str
    """P's region where S's persons are treated (the host region of those filings)."""
    province_home_region: str
    """P's region as the home of claims that S hosts."""
    sender_host_region: str
    """S's region as the host of those claims."""

    @classmethod
    def choose(cls, directory: Directory, province: str) -> Parties:
        """A partner with an agreement hosted by ``province`` (else any other province)."""
        agreements = directory.agreements_as_host(province)
        if agreements:
            home_region = agreements[0].home
            sender = province_of(home_region)
        else:
            sender = next(p for p in directory.provinces() if p != province)
            home_region = _region_of(directory, sender)
        homes = directory.home_regions_of(province)
        return cls(
            province=province,
            sender=sender,
            sender_home_region=home_region,
            province_region=_region_of(directory, province),
            province_home_region=homes[0] if homes else _region_of(directory, province),
            sender_host_region=_region_of(directory, sender),
        )


def template(family: str, n: int, parties: Parties) -> tuple[str, Message, Envelope]:
    """A valid record of ``family`` from the sender to the province: topic, message, envelope."""
    p, s = parties.province, parties.sender
    sent = now_ms()
    request = {"reply_to": topic(FAMILY_REPLY, s), "deadline_ms": sent + 120_000}
    answer = {"correlation_id": new_id()}  # answers a request P never sent
    message: Message
    extra: dict[str, Any]
    person = f"{parties.sender_home_region}{n:012d}"  # 18 characters, one per record
    if family == "filing":
        message = samples.filing(
            home=parties.sender_home_region, host=parties.province_region, person=person
        )
        message = message.model_copy(update={"filing_id": f"F-{s}-FZ{n}"})
        dest, extra = topic(FAMILY_FILING, p), request
    elif family == "claim":
        message = samples.claim(
            home=parties.province_home_region,
            host=parties.sender_host_region,
            claim_id=f"C-{s}-FZ{n}",
            person=person,
        )
        dest, extra = topic(FAMILY_CLAIM, p), request
    elif family == "notice":
        message = samples.notice().model_copy(update={"claim_id": f"C-{s}-FZ{n}"})
        dest, extra = topic(FAMILY_SETTLEMENT, p), {}
    elif family == "receipt":
        message = samples.receipt().model_copy(update={"person_id": person})
        dest, extra = topic(FAMILY_REPLY, p), answer
    elif family == "review":
        message, dest, extra = samples.review(f"C-{s}-FZ{n}"), topic(FAMILY_REPLY, p), answer
    elif family == "error":
        message, dest, extra = samples.error_report(), topic(FAMILY_ERROR, p), answer
    else:
        raise ValueError(f"unknown family {family!r}")
    env = Envelope(
        message_id=new_id(),
        message_type=message.avro_name,
        source=s,
        target=p,
        sent_at_ms=sent,
        **extra,
    )
    return dest, message, env


def _raw_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("utf-8"), value) for name, value in headers]


def _signed(
    province: str, headers: list[tuple[bytes, bytes]], key: bytes | None, value: bytes
) -> list[tuple[bytes, bytes]]:
    """``headers`` signed with ``province``'s demo key; unchanged when a header name is not
    UTF-8 or a signed header appears twice (such a record cannot be signed at all)."""
    try:
        text = tuple((k.decode("utf-8"), v) for k, v in headers)
        return _raw_headers(sign_as(province, text, key, value))
    except (UnicodeDecodeError, DecodeError):
        return headers


def _set_header(headers: list[tuple[bytes, bytes]], name: str, value: bytes) -> None:
    key = name.encode("utf-8")
    for i, (existing, _) in enumerate(headers):
        if existing == key:
            headers[i] = (key, value)
            return
    headers.append((key, value))


def _money_fields(message: Message) -> list[str]:
    return [n for n, v in message.model_dump().items() if n.endswith("_fen") and isinstance(v, int)]


def _date_fields(message: Message) -> list[str]:
    return [
        n for n, v in message.model_dump().items() if isinstance(v, dt.datetime | dt.date) and v
    ]


class Planner:
    """Derives mutated records from the templates with one seeded RNG."""

    def __init__(self, parties: Parties, codec: Codec, seed: int) -> None:
        self.parties = parties
        self.codec = codec
        self.rng = random.Random(seed)
        self._n = 0

    def valid(self, family: str, kind: str = "valid") -> Planned:
        """A valid record of ``family``."""
        self._n += 1
        dest, message, env = template(family, self._n, self.parties)
        return self._planned(kind, family, dest, message, env)

    def _planned(
        self,
        kind: str,
        family: str,
        dest: str,
        message: Message,
        env: Envelope,
        *,
        value: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        signer: str | None = "",
    ) -> Planned:
        """The record as planned; signed by ``signer``'s demo key ("": the sender, as a
        real province signs even the malformed records it sends; None: unsigned)."""
        key = getattr(message, "person_id", "").encode("utf-8") or None
        value = self.codec.encode(message) if value is None else value
        raw = list(headers if headers is not None else _raw_headers(env.to_headers()))
        if signer is not None:
            raw = _signed(signer or self.parties.sender, raw, key, value)
        return Planned(
            kind=kind, family=family, topic=dest, key=key, value=value, headers=tuple(raw)
        )

    def plan(self, records: int, oversized: int) -> list[Planned]:
        """``records`` records: first one valid control of every family (while there is
        room), then mutated ones in random order, ``oversized`` of them over the size limit."""
        controls = [self.valid(f) for f in FAMILIES[: max(0, records - oversized)]]
        out: list[Planned] = [self.mutate("oversized") for _ in range(min(oversized, records))]
        kinds, weights = list(MUTATIONS), list(MUTATIONS.values())
        while len(out) + len(controls) < records:
            kind = self.rng.choices(kinds, weights)[0]
            if kind == "duplicate":
                if len(out) + len(controls) + 2 > records:
                    continue
                first = self.mutate("duplicate")
                out += [first, first]
            else:
                out.append(self.mutate(kind))
        self.rng.shuffle(out)
        return controls + out

    def mutate(self, kind: str) -> Planned:
        """One record of mutation ``kind`` from a random family's template."""
        rng = self.rng
        families = list(FAMILIES)
        if kind == "negative_money" or kind == "huge_money":
            families = ["claim", "notice", "review"]
        elif kind == "far_date":
            families = ["filing", "claim", "notice", "receipt", "review"]
        elif kind == "wrong_reply_to":
            families = ["filing", "claim"]
        family = rng.choice(families)
        self._n += 1
        dest, message, env = template(family, self._n, self.parties)
        value = self.codec.encode(message)
        headers = _raw_headers(env.to_headers())
        signer: str | None = ""
        if kind in ("valid", "duplicate"):
            pass  # the second copy of a duplicate is a replay of the same signed record
        elif kind == "unsigned":
            signer = None
        elif kind == "forged_signature":  # a third province signs as the sender
            signer = next(c for c in ("530000", "620000", "440000") if c != self.parties.sender)
        elif kind == "tampered_after_signing":
            key = getattr(message, "person_id", "").encode("utf-8") or None
            headers = _signed(self.parties.sender, headers, key, value)
            flipped = bytearray(value)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            value, signer = bytes(flipped), None
        elif kind == "oversized":
            if rng.random() < 0.5:  # a valid message with junk after it
                value = value + rng.randbytes(OVERSIZED_BYTES - len(value))
            else:
                value = rng.randbytes(OVERSIZED_BYTES)
        elif kind == "bit_flip":
            flipped = bytearray(value)
            for _ in range(rng.randint(1, 3)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            value = bytes(flipped)
        elif kind == "truncated":
            value = value[: rng.randrange(len(value))]
        elif kind == "bad_marker":
            value = rng.choice([b"\x00\x00", b'{"', b"\xc3\x02"]) + value[2:]
        elif kind == "wrong_fingerprint":
            value = value[:2] + rng.randbytes(8) + value[10:]
        elif kind == "empty_value":
            value = b""
        elif kind == "missing_header":
            required = [H_MESSAGE_ID, H_MESSAGE_TYPE, H_SOURCE, H_TARGET, "xs-sent-at"]
            required += [H_REPLY_TO, "xs-deadline"] if family in ("filing", "claim") else []
            required += [H_CORRELATION_ID] if family in ("receipt", "review") else []
            drop = rng.choice(required).encode()
            headers = [(k, v) for k, v in headers if k != drop]
        elif kind == "wrong_type_header":
            other = rng.choice([m.avro_name for m in samples.ALL if type(m) is not type(message)])
            _set_header(headers, H_MESSAGE_TYPE, other.encode())
        elif kind == "wrong_target":
            _set_header(headers, H_TARGET, rng.choice([self.parties.sender, "999999"]).encode())
        elif kind == "wrong_source":
            _set_header(
                headers, H_SOURCE, rng.choice([self.parties.province, "530000", "ABC", ""]).encode()
            )
        elif kind == "wrong_family_topic":
            others = [f for f in INBOX_FAMILIES if f != dest.split(".")[1]]
            dest = topic(rng.choice(others), self.parties.province)
        elif kind == "bad_number_header":
            name = rng.choice(["xs-sent-at", "xs-attempt", "xs-deadline"])
            _set_header(headers, name, rng.choice([b"yesterday", b"-3", b"0", b"1e99", b""]))
        elif kind == "non_utf8_header_value":
            i = rng.randrange(len(headers))
            headers[i] = (headers[i][0], rng.choice([b"\xff\xfe", b"\xc3", b"ok\xedbad"]))
        elif kind == "non_utf8_header_key":
            headers.insert(rng.randrange(len(headers) + 1), (b"\xff\xfe-" + rng.randbytes(2), b"x"))
        elif kind == "negative_money" or kind == "huge_money":
            fields = _money_fields(message)
            amount = (
                -rng.randint(1, 10**9) if kind == "negative_money" else 2**62 + rng.randint(0, 9)
            )
            update = dict.fromkeys(rng.sample(fields, rng.randint(1, len(fields))), amount)
            value = self.codec.encode(message.model_copy(update=update))
        elif kind == "far_date":
            fields = _date_fields(message)
            name = rng.choice(fields)
            far = rng.choice([FAR_FUTURE, FAR_PAST])
            when = far if isinstance(getattr(message, name), dt.datetime) else far.date()
            value = self.codec.encode(message.model_copy(update={name: when}))
        elif kind == "wrong_reply_to":
            choices = [
                topic(FAMILY_REPLY, self.parties.province),
                topic(FAMILY_REPLY, "990000"),
                "not a topic!",
                "",
                topic(FAMILY_CLAIM, self.parties.sender),
            ]
            _set_header(headers, H_REPLY_TO, rng.choice(choices).encode())
        else:
            raise ValueError(f"unknown mutation {kind!r}")
        planned = self._planned(
            kind, family, dest, message, env, value=value, headers=headers, signer=signer
        )
        if planned.raw:
            return replace(planned, partition=rng.randrange(1 << 16))
        return planned


# --- running ----------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident memory of this process in MB (VmRSS of /proc/self/status), measured after a
    garbage collection and after glibc gave its free heap pages back (``malloc_trim``): what
    the process holds, not what its allocator keeps cached. glibc raises its mmap threshold
    after a large buffer is freed, so later multi-MB records come from the heap and stay in
    RSS when free; without the trim, three 2 MB records looked like 5 to 10 MB of growth."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True, slots=True)
class FuzzOptions:
    """What a fuzz run does."""

    province: str = "460000"
    """Province under test."""
    records: int = 2000
    """Mutated records sent."""
    seed: int = 1
    """Seed of the RNG that picks mutations."""
    oversized: int = 3
    """How many of the records are over the contract's size limit."""
    timeout_s: float = 300.0
    """Bound of the whole run."""
    separate_process: bool = True
    """Run the province in its own process, so that its RSS is measured without the
    harness's bookkeeping (which grows with every record sent; ~1 KB each)."""


@dataclass
class FuzzResult:
    """Outcomes of a run."""

    outcomes: list[tuple[Sent, str]]
    """Every fuzz record with its outcome."""
    probes: dict[Partition, str]
    """Outcome of the liveness probe of each inbox partition."""
    rss_before_mb: float
    """Resident memory after the warm-up."""
    rss_after_mb: float
    """Resident memory after the run."""
    dead_letter_kinds: Counter[str]
    """Error kinds of the dead letters of fuzz records."""
    seconds: float
    """Duration of the run."""
    notes: list[str] = field(default_factory=list)
    """What else went wrong (the node failing to stop, say)."""

    def count(self, outcome: str) -> int:
        """Fuzz records with ``outcome``."""
        return sum(1 for _, o in self.outcomes if o == outcome)

    @property
    def dead_partitions(self) -> list[Partition]:
        """Inbox partitions whose probe found no outcome."""
        return sorted(
            (p for p, o in self.probes.items() if o == SILENT),
            key=lambda p: (p.topic, p.partition),
        )

    @property
    def rss_growth_mb(self) -> float:
        """Resident memory growth over the run."""
        return self.rss_after_mb - self.rss_before_mb

    @property
    def ok(self) -> bool:
        """No silent record, no dead partition, no memory growth beyond the bound."""
        return (
            self.count(SILENT) == 0
            and not self.dead_partitions
            and self.rss_growth_mb <= RSS_GROWTH_MAX_MB
        )


def summary_line(result: FuzzResult) -> str:
    """The last line of the output."""
    c = result.count
    return (
        f"{len(result.outcomes)} records: {c(DEAD_LETTERED)} dead-lettered, {c(REPORTED)} "
        f"reported, {c(ANSWERED)} answered, {c(HANDLED)} handled, {c(SILENT)} silent"
    )


def render(result: FuzzResult) -> list[str]:
    """The report: outcomes per mutation kind, probes, memory, the summary line."""
    table: dict[str, Counter[str]] = {}
    for sent, outcome in result.outcomes:
        table.setdefault(sent.kind, Counter())[outcome] += 1
    width = max([len(k) for k in table] + [len("mutation")]) + 2
    head = f"{'mutation':<{width}}" + "".join(f"{o:>15}" for o in OUTCOMES) + f"{'total':>8}"
    lines = [head, "-" * len(head)]
    for kind in sorted(table):
        row = table[kind]
        cells = "".join(f"{row[o]:>15}" for o in OUTCOMES)
        lines.append(f"{kind:<{width}}{cells}{sum(row.values()):>8}")
    totals = Counter(o for _, o in result.outcomes)
    cells = "".join(f"{totals[o]:>15}" for o in OUTCOMES)
    lines += ["-" * len(head), f"{'all':<{width}}{cells}{len(result.outcomes):>8}", ""]
    kinds = ", ".join(f"{k} {n}" for k, n in result.dead_letter_kinds.most_common())
    lines.append(f"dead letters by error kind: {kinds or '-'}")
    alive = len(result.probes) - len(result.dead_partitions)
    lines.append(f"inbox partitions answering: {alive}/{len(result.probes)}")
    lines += [f"  silent partition {p.topic}[{p.partition}]" for p in result.dead_partitions]
    lines.append(
        f"RSS after warm-up {result.rss_before_mb:.1f} MB, after the run "
        f"{result.rss_after_mb:.1f} MB: {result.rss_growth_mb:+.1f} MB "
        f"(bound +{RSS_GROWTH_MAX_MB:.0f} MB)"
    )
    lines.append(f"run took {result.seconds:.1f} s")
    lines += [f"note: {note}" for note in result.notes]
    lines.append(summary_line(result))
    return lines


class Watcher:
    """Reads the outputs that can name a sent record: the province's DLQ, every error topic and
    every reply topic, from the beginning, in the background."""

    def __init__(self, settings: BusSettings, bootstrap: str, codec: Codec, province: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.codec = codec
        self.province = province
        self.seen = Seen()
        self.consumer = Consumer(settings, bootstrap, group=None, name="fuzz-watch")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign the output topics and start reading."""
        async with Admin(self.settings, self.bootstrap) as admin:
            names = await admin.list_topics()
        wanted = re.compile(r"^xsettle\.(error|reply)\.\d{6}$")
        topics = [n for n in names if wanted.match(n)] + [topic(FAMILY_DLQ, self.province)]
        await self.consumer.start()
        parts: list[Partition] = []
        for name in sorted(set(topics)):
            parts += await self.consumer.partitions_for(name)
        self.consumer.assign(parts)
        self._task = asyncio.create_task(self._run(), name="fuzz-watch")

    async def _run(self) -> None:
        while True:
            try:
                for rec in await self.consumer.fetch(200):
                    self.seen.take(rec, self.codec)
            except BusError as exc:
                log.warning("fuzz_watch_failed", error=str(exc))
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop reading; harmless twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.consumer.stop()


class InProcessTarget:
    """The province under test in this process (fast; RSS includes the harness)."""

    def __init__(self, system: ProvinceSystem) -> None:
        self.system = system
        self.directory = system.directory

    async def start(self, timeout_s: float) -> None:
        await self.system.start()
        await self.system.node.wait_ready(timeout_s=timeout_s)

    def processed(self, message_id: str) -> bool:
        return self.system.node.store.processed(message_id) is not None

    async def rss_mb(self) -> float:
        return rss_mb()

    async def stop(self) -> None:
        await self.system.stop()
        self.system.close()


class ProcessTarget:
    """The province under test as a child process (:func:`serve_main`): its RSS is its own.
    It prints ``ready`` once its inbox is assigned and answers ``rss`` lines on stdin with its
    RSS after a collection; end of input stops it."""

    def __init__(self, province: str, bootstrap: str, folder: Path) -> None:
        self.province = province
        self.bootstrap = bootstrap
        self.folder = folder
        self.directory = Directory.default()
        self._proc: asyncio.subprocess.Process | None = None
        self._db: Path = folder / f"province-{province}.sqlite3"

    async def start(self, timeout_s: float) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from simulators.fuzz import serve_main; serve_main()",
            self.province, self.bootstrap, str(self.folder),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        line = await asyncio.wait_for(self._line(), timeout_s)
        if line != "ready":
            raise RuntimeError(f"the province process did not start: {line!r}")

    async def _line(self) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        return (await self._proc.stdout.readline()).decode().strip()

    def processed(self, message_id: str) -> bool:
        uri = f"{self._db.as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute("SELECT 1 FROM processed WHERE message_id = ?", (message_id,))
            return row.fetchone() is not None

    async def rss_mb(self) -> float:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"rss\n")
        await self._proc.stdin.drain()
        return float((await self._line()).split()[1])

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            code = await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            code = await self._proc.wait()
        self._proc = None
        if code != 0:
            raise RuntimeError(f"the province process exited {code}")


def serve_main() -> None:
    """Child of :class:`ProcessTarget`: one province until its stdin closes."""
    province, bootstrap, folder = sys.argv[1:4]
    configure(json=False, level="CRITICAL")

    async def serve() -> None:
        settings = BusSettings.from_env().with_bootstrap(bootstrap, embedded=True)
        system = ProvinceSystem(
            province, settings, bootstrap=bootstrap, directory=Directory.default(),
            state_dir=Path(folder),
        )  # fmt: skip
        await system.start()
        await system.node.wait_ready(60)
        _say("ready")
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                if line.strip() == "rss":
                    _say(f"rss {rss_mb():.1f}")
        finally:
            await system.stop()
            system.close()

    asyncio.run(serve())


class Fuzz:
    """One run against one province system."""

    def __init__(
        self,
        options: FuzzOptions,
        settings: BusSettings,
        bootstrap: str,
        target: InProcessTarget | ProcessTarget,
    ) -> None:
        self.options = options
        self.settings = settings
        self.bootstrap = bootstrap
        self.target = target
        self.codec = Codec()
        self.parties = Parties.choose(target.directory, options.province)
        self.planner = Planner(self.parties, self.codec, options.seed)
        self.producer = Producer(settings, bootstrap, name="fuzz")
        self.watcher = Watcher(settings, bootstrap, self.codec, options.province)
        self.partitions: dict[str, int] = {}
        self.refused: Counter[str] = Counter()
        """Records the broker would not take, by mutation kind (a cluster's size limit)."""

    def processed(self, message_id: str) -> bool:
        """True when the node recorded ``message_id`` as processed."""
        return self.target.processed(message_id)

    def outcome(self, sent: Sent) -> str:
        """The outcome of ``sent`` as far as it is known now."""
        return classify(sent, self.watcher.seen, self.processed)

    async def send(self, planned: Sequence[Planned]) -> list[Sent]:
        """Write ``planned`` (ordinary ones concurrently, raw ones one batch each)."""
        out: list[Sent] = []
        for start in range(0, len(planned), SEND_CHUNK):
            chunk = planned[start : start + SEND_CHUNK]
            normal = [p for p in chunk if not p.raw]
            coords = await asyncio.gather(
                *(
                    self.producer.send_and_wait(
                        p.topic, p.key, p.value, p.text_headers(), partition=p.partition
                    )
                    for p in normal
                )
            )
            out += [self._sent(p, part, off) for p, (part, off) in zip(normal, coords, strict=True)]
            for p in chunk:
                if p.raw:
                    part = (p.partition or 0) % self.partitions[p.topic]
                    raw = RawRecord(p.key, p.value, list(p.headers))
                    try:
                        [offset] = await write_raw_records(self.bootstrap, p.topic, part, [raw])
                    except BusError as exc:
                        log.warning("fuzz_record_refused", kind=p.kind, error=str(exc))
                        self.refused[p.kind] += 1
                        continue
                    out.append(self._sent(p, part, offset))
        return out

    @staticmethod
    def _sent(p: Planned, partition: int, offset: int) -> Sent:
        return Sent(p.kind, p.family, p.topic, partition, offset, p.message_id)

    async def settle(self, sent: Sequence[Sent], deadline: float, settle_s: float) -> None:
        """Wait until no record is silent, or none found an outcome for ``settle_s``."""
        last = -1
        since = time.monotonic()
        while time.monotonic() < deadline:
            silent = sum(1 for s in sent if self.outcome(s) == SILENT)
            if silent == 0:
                return
            if silent != last:
                last, since = silent, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                return
            await asyncio.sleep(POLL_S)

    def probe_records(self) -> list[Planned]:
        """One valid record per partition of every inbox topic."""
        family_of_topic = {
            FAMILY_FILING: "filing",
            FAMILY_CLAIM: "claim",
            FAMILY_SETTLEMENT: "notice",
            FAMILY_REPLY: "receipt",
            FAMILY_ERROR: "error",
        }
        out = []
        for family in INBOX_FAMILIES:
            name = topic(family, self.options.province)
            for part in range(self.partitions[name]):
                probe = self.planner.valid(family_of_topic[family], kind="probe")
                out.append(replace(probe, partition=part))
        return out

    async def run(self) -> FuzzResult:
        """Warm up, take the memory baseline, send, wait for outcomes, probe, measure."""
        started = time.monotonic()
        deadline = started + self.options.timeout_s
        await self.target.start(max(5.0, min(60.0, deadline - time.monotonic())))
        await self.producer.start()
        await self.watcher.start()
        for family in INBOX_FAMILIES:
            name = topic(family, self.options.province)
            self.partitions[name] = len(await self.watcher.consumer.partitions_for(name))
        try:
            warm = [self.planner.valid(FAMILIES[i % len(FAMILIES)]) for i in range(WARMUP_RECORDS)]
            warm_sent = [replace(s, kind="warmup") for s in await self.send(warm)]
            await self.settle(warm_sent, min(deadline, time.monotonic() + 30), SETTLE_S)
            rss_before = await self.target.rss_mb()
            planned = self.planner.plan(self.options.records, self.options.oversized)
            sent = await self.send(planned)
            del planned
            reserve = min(PROBE_TIMEOUT_S, self.options.timeout_s / 4)
            await self.settle(sent, deadline - reserve, SETTLE_S)
            probes = await self.send(self.probe_records())
            await self.settle(probes, min(deadline, time.monotonic() + PROBE_TIMEOUT_S), 1e9)
            outcomes = [(s, self.outcome(s)) for s in sent]
            rss_after = await self.target.rss_mb()
        finally:
            await self.watcher.stop()
            await self.producer.stop()
        kinds: Counter[str] = Counter()
        for s, o in outcomes:
            if o == DEAD_LETTERED:
                kinds[self.watcher.seen.dead_lettered[(s.topic, s.partition, s.offset)]] += 1
        notes = [
            f"the broker refused {n} {kind} record(s); they are not counted"
            for kind, n in self.refused.items()
        ]
        return FuzzResult(
            notes=notes,
            outcomes=outcomes,
            probes={Partition(p.topic, p.partition): self.outcome(p) for p in probes},
            rss_before_mb=rss_before,
            rss_after_mb=rss_after,
            dead_letter_kinds=kinds,
            seconds=time.monotonic() - started,
        )


@contextlib.asynccontextmanager
async def _bootstrap(settings: BusSettings, provinces: Iterable[str]) -> AsyncIterator[str]:
    if settings.bootstrap:
        await create_contract_topics(settings, settings.bootstrap, list(provinces))
        yield settings.bootstrap
        return
    async with EmbeddedBroker() as broker:  # 127.0.0.1 on a free port
        await create_contract_topics(settings, broker.bootstrap, list(provinces))
        yield broker.bootstrap


async def run_fuzz(
    options: FuzzOptions,
    settings: BusSettings,
    *,
    directory: Directory | None = None,
    state_dir: Path | None = None,
) -> FuzzResult:
    """A whole run: the broker (embedded unless ``settings.bootstrap``), the province, the fuzz."""
    directory = directory or Directory.default()
    provinces = set(directory.provinces()) | {options.province}
    with contextlib.ExitStack() as stack:
        folder = state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        async with _bootstrap(settings, provinces) as bootstrap:
            node_settings = settings.with_bootstrap(bootstrap, embedded=not settings.bootstrap)
            target: InProcessTarget | ProcessTarget
            if options.separate_process and directory == Directory.default():
                target = ProcessTarget(options.province, bootstrap, folder)
            else:
                target = InProcessTarget(
                    ProvinceSystem(
                        options.province, node_settings, bootstrap=bootstrap,
                        directory=directory, state_dir=folder,
                    )
                )  # fmt: skip
            stop_error: str | None = None
            try:
                result = await Fuzz(options, node_settings, bootstrap, target).run()
            finally:
                try:
                    await target.stop()
                except Exception as exc:  # a worker that died re-raises here; report it
                    stop_error = f"the node failed to stop: {exc!r}"[:500]
                    log.error("fuzz_node_stop_failed", error=repr(exc))
            if stop_error is not None:
                result.notes.append(stop_error)
            return result


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def cmd_fuzz(args: argparse.Namespace) -> int:
    """``xsettle fuzz``."""
    if args.log_level is None:
        configure(json=args.log_json, level="CRITICAL")  # the node's warnings are expected
    from simulators.cli import settings_from

    options = FuzzOptions(
        province=args.province,
        records=args.records,
        seed=args.seed,
        oversized=args.oversized,
        timeout_s=args.timeout,
    )
    _say(
        f"fuzz: {options.records} records into {options.province}'s inbox, seed {options.seed}, "
        f"{options.oversized} oversized, timeout {options.timeout_s:.0f} s"
    )
    try:
        result = await asyncio.wait_for(
            run_fuzz(options, settings_from(args)), options.timeout_s + SETUP_ALLOWANCE_S
        )
    except TimeoutError:
        _say(f"fuzz: no result within {options.timeout_s + SETUP_ALLOWANCE_S:.0f} s")
        return 1
    for line in render(result):
        _say(line)
    return 0 if result.ok else 1


def register(sub: Any) -> None:
    """Add ``fuzz`` to the ``xsettle`` command line."""
    from simulators.cli import add_bootstrap

    p = sub.add_parser(
        "fuzz", help="send mutated records to one province; every one needs an outcome"
    )
    add_bootstrap(p)
    p.add_argument("--province", default="460000", help="province under test (default 460000)")
    p.add_argument("--records", type=int, default=2000, help="mutated records (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="RNG seed (default 1)")
    p.add_argument(
        "--oversized", type=int, default=3, help="records over the 1 MiB limit (default 3)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="bound of the run in s")
    p.set_defaults(run=cmd_fuzz)
