"""The province store's behaviour, on both backends: the embedded SQLite file and PostgreSQL
(the session's embedded server, a fresh database per test).

The same assertions run against both (parametrized), so a statement one engine reads
differently, a type it stores differently or a transaction it scopes differently shows here.
The PostgreSQL-only tests are about what only a shared database has: two instances."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.backoffice import ClaimState, HostClaim, Person, SqlBackOffice
from adapters.fixtures import lao_zhang_claim
from bus.db import Database, SqliteDatabase
from bus.errors import StoreError
from bus.models import InsuranceType
from bus.pg import PostgresDatabase, masked_url, pg_ddl, pg_sql
from bus.store import (
    ANSWERED,
    DELIVERED,
    EXPIRED,
    LATE,
    OPEN,
    PENDING,
    Obligation,
    OutRecord,
    PendingRequest,
    SqlStore,
)
from simulators.cli import build_parser

RECORD = OutRecord("xsettle.claim.130000", b"k", b"\x00\x01value", (("xs-message-id", b"m"),))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The province's database on each backend."""
    database: Database
    if request.param == "sqlite":
        database = SqliteDatabase(tmp_path / "province-130000.sqlite3")
    else:
        database = PostgresDatabase(request.getfixturevalue("postgres_url"))
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> SqlStore:
    return SqlStore(db)


def pending(
    message_id: str, *, deadline_ms: int = 10_000, sent_at_ms: int = 1_000
) -> PendingRequest:
    return PendingRequest(
        message_id=message_id,
        message_type="xsettle.v1.ClaimPackage",
        target="130000",
        record=RECORD,
        attempt=1,
        sent_at_ms=sent_at_ms,
        deadline_ms=deadline_ms,
        state=PENDING,
    )


ANSWER = OutRecord("xsettle.reply.460000", b"k", b"answer", (("xs-message-id", b"a-1"),))


class TestSteps:
    async def test_a_step_commits_all_or_nothing(self, store: SqlStore) -> None:
        async with store.step():
            store.add_outbox(RECORD)
        with pytest.raises(RuntimeError):  # noqa: PT012 (the step is what is tested)
            async with store.step():
                store.add_outbox(RECORD)
                store.add_pending(pending("m-1"))
                raise RuntimeError("the handler failed")
        assert store.outbox_size() == 1
        assert store.get_pending("m-1") is None

    async def test_a_nested_step_undoes_only_its_part(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("outer"))
            with pytest.raises(ValueError, match="inner"):  # noqa: PT012
                async with store.step():
                    store.add_pending(pending("inner"))
                    raise ValueError("inner")
        assert store.get_pending("outer") is not None
        assert store.get_pending("inner") is None

    async def test_commit_callbacks_run_after_the_commit_only(self, store: SqlStore) -> None:
        seen: list[int] = []
        async with store.step() as step:
            store.add_outbox(RECORD)
            step.on_commit.append(lambda: seen.append(store.outbox_size()))
            assert seen == []
        assert seen == [1]

    def test_migrations_are_recorded_once(self, db: Database) -> None:
        SqlStore(db)
        SqlStore(db)  # a second open (a second instance, a restart) applies nothing again
        rows = db.query("SELECT name FROM xsettle_migrations ORDER BY name")
        names = [r[0] for r in rows]
        assert names == sorted(set(names))
        assert {"store/1", "store/2-outbox-owner", "audit/1"} <= set(names)


class TestOutbox:
    async def test_rows_keep_bytes_and_order(self, store: SqlStore) -> None:
        async with store.step():
            ids = [store.add_outbox(RECORD) for _ in range(3)]
        assert ids == sorted(ids)
        assert len(set(ids)) == 3
        rows = store.outbox(10)
        assert [i for i, _ in rows] == ids
        assert rows[0][1] == RECORD  # bytes, key and headers exactly as written
        assert [i for i, _ in store.outbox(10, after_id=ids[0])] == ids[1:]
        store.outbox_sent(ids[:2])
        assert store.outbox_size() == 1

    async def test_replace_keeps_the_row(self, store: SqlStore) -> None:
        async with store.step():
            row = store.add_outbox(RECORD)
        again = OutRecord(RECORD.topic, RECORD.key, RECORD.value, (("xs-attempt", b"2"),))
        async with store.step():
            store.outbox_replace(row, again)
        assert store.outbox(1) == [(row, again)]

    async def test_one_instance_has_no_one_to_adopt(self, store: SqlStore) -> None:
        async with store.step():
            store.add_outbox(RECORD)
        assert store.outbox_owners() == []


class TestPending:
    async def test_answer_delivers_once(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("m-1"))
            store.add_pending(pending("m-1"))  # the same request twice: kept once
        async with store.step():
            before, req = store.record_answer(
                "m-1", ANSWER, 2_000, answer_id="a-1", answer_type="t", delivered=True
            )
        assert before == PENDING
        assert req is not None
        assert req.record == RECORD
        got = store.get_pending("m-1")
        assert got is not None
        assert got.state == DELIVERED
        assert got.answer == ANSWER
        assert got.answered_at_ms == 2_000
        assert store.processed("a-1") is not None
        async with store.step():
            assert store.record_answer(
                "nobody", ANSWER, 1, answer_id="a-2", answer_type="t", delivered=True
            ) == (None, None)

    async def test_undelivered_answer_waits_for_the_next_start(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("m-1"))
            store.record_answer("m-1", ANSWER, 5, answer_id="a-1", answer_type="t", delivered=False)
        assert [p.message_id for p in store.undelivered()] == ["m-1"]
        assert store.get_pending("m-1").state == ANSWERED  # type: ignore[union-attr]
        async with store.step():
            assert store.mark_delivered("m-1")
            assert not store.mark_delivered("m-1")  # a second instance: nothing to do
        assert store.undelivered() == []

    async def test_deadline_expires_once_then_a_late_answer(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("early", deadline_ms=100))
            store.add_pending(pending("later", deadline_ms=200))
            store.add_pending(pending("future", deadline_ms=10_000))
        assert [p.message_id for p in store.due(500, 10)] == ["early", "later"]
        assert [p.message_id for p in store.due(500, 1)] == ["early"]
        async with store.step():
            assert store.mark_expired("early")
            assert not store.mark_expired("early")
        assert store.count(EXPIRED) == 1
        assert store.count(PENDING) == 2
        async with store.step():
            before, _ = store.record_answer(
                "early", ANSWER, 600, answer_id="a-1", answer_type="t", delivered=True
            )
        assert before == EXPIRED
        assert store.get_pending("early").state == LATE  # type: ignore[union-attr]

    async def test_acknowledgements_and_resends(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("quiet", sent_at_ms=1_000))
            store.add_pending(pending("acked", sent_at_ms=1_000))
        async with store.step():
            assert store.record_ack("acked", 1_500, "ACCEPTED_FOR_REVIEW", 9_000, "desk")
            assert not store.record_ack("nobody", 1_500, "RECEIVED", None, "")
        acked = store.get_pending("acked")
        assert acked is not None
        assert acked.acknowledged_at_ms == 1_500
        assert acked.expected_by_ms == 9_000
        assert acked.ack_note == "desk"
        quiet = store.unacknowledged(2_000, 2_000, 4, 10)
        assert [p.message_id for p in quiet] == ["quiet"]
        again = OutRecord(RECORD.topic, RECORD.key, RECORD.value, (("xs-attempt", b"2"),))
        async with store.step():
            store.bump_attempt("quiet", again, 3_000)
        bumped = store.get_pending("quiet")
        assert bumped is not None
        assert bumped.attempt == 2
        assert bumped.last_sent_ms == 3_000
        assert bumped.record.headers == again.headers
        assert store.unacknowledged(2_500, 2_500, 4, 10) == []  # sent since the window
        assert [p.message_id for p in store.pending_requests(10)] == ["quiet", "acked"]


class TestProcessed:
    async def test_a_message_is_marked_processed_once(self, store: SqlStore) -> None:
        async with store.step():
            store.mark_processed("m-1", "t", ANSWER, 5)
            store.mark_processed("m-2", "t", None, 5)
        seen = store.processed("m-1")
        assert seen is not None
        assert seen.answer == ANSWER
        unanswered = store.processed("m-2")
        assert unanswered is not None
        assert unanswered.answer is None
        assert store.processed("m-3") is None
        with pytest.raises(StoreError, match="processed meanwhile"):
            async with store.step():
                store.mark_processed("m-1", "t", None, 6)
        assert store.processed("m-1").answer == ANSWER  # type: ignore[union-attr]


class TestObligations:
    async def test_a_deferred_answer_is_settled_once(self, store: SqlStore) -> None:
        ob = Obligation("r-1", "xsettle.v1.ClaimPackage", "460000", b"k", 9_000, 1_000, OPEN)
        async with store.step():
            store.add_obligation(ob)
            store.add_obligation(ob)
            store.mark_processed("r-1", "t", None, 1_000)
        assert store.count_obligations() == 1
        assert [o.request_id for o in store.obligations(OPEN, 10)] == ["r-1"]
        async with store.step():
            store.settle_obligation("r-1", ANSWER, 2_000)
        got = store.get_obligation("r-1")
        assert got is not None
        assert got.state == "answered"
        assert got.answer == ANSWER
        assert store.processed("r-1").answer == ANSWER  # type: ignore[union-attr]
        assert store.count_obligations() == 0

    async def test_prune_drops_only_finished_old_entries(self, store: SqlStore) -> None:
        async with store.step():
            store.add_pending(pending("done", deadline_ms=100))
            store.add_pending(pending("open", deadline_ms=100))
            store.record_answer("done", ANSWER, 200, answer_id="a", answer_type="t", delivered=True)
            store.mark_processed("old", "t", None, 50)
        async with store.step():
            pruned = store.prune(1_000)
        assert pruned == 3  # the delivered request, its answer's mark, the old mark
        assert store.get_pending("open") is not None
        assert store.get_pending("done") is None


class TestBackOffice:
    """The back office's queries (JSON inside rows, sums) read the same on both engines."""

    async def test_claims_and_their_figures(self, db: Database) -> None:
        office = SqlBackOffice(db)
        office.add_person(Person("460100195001011234", "老张", InsuranceType.EMPLOYEE, "460100"))
        office.add_person(Person("460100195001011234", "老张", InsuranceType.RESIDENT, "460100"))
        person = office.person("460100195001011234")
        assert person is not None
        assert person.insurance_type is InsuranceType.RESIDENT
        claim = lao_zhang_claim()
        host_claim = HostClaim(claim=claim, request_id="req-1", state=ClaimState.SUBMITTED)
        async with db.step():
            office.save_claim(host_claim, [("ADVANCE", 1_000)])
            office.save_claim(host_claim)  # saved again: one row
        assert [c.claim.claim_id for c in office.claims_of(claim.person_id)] == [claim.claim_id]
        assert office.claim_by_request("req-1") is not None
        assert office.payments(claim.claim_id) == [(claim.claim_id, "ADVANCE", 1_000)]
        assert office.count_open_claims() == 1
        stats = office.settlement_stats("130000")
        assert stats == []  # nothing settled yet
        json.dumps(stats)


class TestPostgresOnly:
    def test_translation(self) -> None:
        assert pg_sql("SELECT a FROM t WHERE b = ? AND c LIKE '5%'") == (
            "SELECT a FROM t WHERE b = %s AND c LIKE '5%%'"
        )
        assert pg_ddl(
            "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v BLOB, n INTEGER);"
        ) == ["CREATE TABLE t (id BIGSERIAL PRIMARY KEY, v BYTEA, n BIGINT)"]
        assert masked_url("postgresql://u:secret@h:5432/d") == "postgresql://u:***@h:5432/d"
        assert masked_url("postgresql:///d?host=/tmp") == "postgresql:///d?host=/tmp"

    async def test_two_instances_share_the_store(self, postgres_url: str) -> None:
        a, b = PostgresDatabase(postgres_url), PostgresDatabase(postgres_url)
        try:
            sa, sb = SqlStore(a), SqlStore(b)
            async with sa.step():
                row = sa.add_outbox(RECORD)
                sa.add_pending(pending("m-1"))
            # Each instance sends only its own rows; the request is seen by both.
            assert [i for i, _ in sa.outbox(10)] == [row]
            assert sb.outbox(10) == []
            assert sb.get_pending("m-1") is not None
            assert sb.outbox_owners() == [a.instance_id]
            assert sb.alive(a.instance_id)
            assert sb.alive(b.instance_id)
        finally:
            a.close()
        try:
            await asyncio.sleep(0.1)  # the server ends a's session: its lock goes with it
            assert not sb.alive(a.instance_id)
        finally:
            b.close()

    async def test_a_dead_instances_rows_are_adopted_once(self, postgres_url: str) -> None:
        a = PostgresDatabase(postgres_url)
        sa = SqlStore(a)
        async with sa.step():
            ids = [sa.add_outbox(RECORD) for _ in range(3)]
        a.close()
        b, c = PostgresDatabase(postgres_url), PostgresDatabase(postgres_url)
        try:
            sb, sc = SqlStore(b), SqlStore(c)
            assert not sb.alive(a.instance_id)
            got_b = sb.adopt_outbox(a.instance_id)
            got_c = sc.adopt_outbox(a.instance_id)
            assert [i for i, _ in got_b] == ids
            assert got_c == []
            assert [i for i, _ in sb.outbox(10)] == ids
            assert sc.outbox(10) == []
        finally:
            b.close()
            c.close()

    async def test_a_second_instance_cannot_mark_a_message_twice(self, postgres_url: str) -> None:
        a, b = PostgresDatabase(postgres_url), PostgresDatabase(postgres_url)
        try:
            sa, sb = SqlStore(a), SqlStore(b)
            async with sa.step():
                sa.mark_processed("m-1", "t", None, 1)
            with pytest.raises(StoreError, match="processed meanwhile"):
                async with sb.step():
                    sb.mark_processed("m-1", "t", None, 2)
        finally:
            a.close()
            b.close()

    def test_an_unreachable_server_is_one_line(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError) as info:
            PostgresDatabase(f"postgresql://nobody@/x?host={tmp_path}&connect_timeout=1")
        assert "\n" not in str(info.value)
        assert "cannot open the database" in str(info.value)


class TestOpsReadsTheDatabase:
    """``xsettle ops claims`` and ``ops pending`` read a province's PostgreSQL database when
    ``XSETTLE_DATABASE_URL`` says where it is (no state folder on the operator's machine)."""

    async def test_ops_claims_by_url(
        self, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        db = PostgresDatabase(postgres_url)
        try:
            office = SqlBackOffice(db)
            claim = lao_zhang_claim()
            async with db.step():
                office.save_claim(HostClaim(claim, "req-1", ClaimState.OVERDUE))
        finally:
            db.close()
        parser = build_parser()
        monkeypatch.setenv("XSETTLE_DATABASE_URL", postgres_url)
        args = parser.parse_args(["ops", "claims", "--province", "460000", "--state-dir", "none"])
        assert await args.run(args) == 0
        assert claim.claim_id in capsys.readouterr().out
        template = postgres_url.rsplit("/", 1)[0] + "/xsettle_{province}"
        monkeypatch.setenv("XSETTLE_DATABASE_URL", template)
        args = parser.parse_args(["ops", "pending", "--state-dir", "none"])
        with pytest.raises(SystemExit) as stopped:
            await args.run(args)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == (
            "xsettle ops pending: XSETTLE_DATABASE_URL has one database per province: "
            "give --province"
        )
