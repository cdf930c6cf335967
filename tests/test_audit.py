"""The signed message log as evidence: ``xsettle audit export`` of one claim verifies offline
with the public keys only, and fails after any one byte of it is changed."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bus.audit import RECEIVED, SENT, AuditEntry, SqlAuditLog
from bus.audit_export import (
    FORMAT,
    ExportError,
    export_subject,
    read_export,
    verify_export,
    write_export,
)
from bus.codec import Codec
from bus.constants import topic
from bus.db import SqliteDatabase
from bus.envelope import SUBJECT_OF, Envelope, new_id, now_ms
from bus.models import ErrorReport, Message
from bus.settings import BusSettings
from bus.signing import KeyRing, Signer
from simulators import samples
from simulators.cli import build_parser
from simulators.keys import demo_keyring, demo_signer
from tests.conftest import ProvincePool
from tests.helpers import eventually
from tests.test_crash_safety import Pair

HOST, HOME = "460000", "130000"
"""Hainan exports; Hebei is the other side."""
CLAIM = samples.claim().claim_id
OTHER = "C-460100-2"
"""Another patient's claim, in the same log."""
T0 = now_ms()

_codec = Codec()


def record(
    message: Message,
    source: str,
    target: str,
    *,
    correlation: str | None = None,
    signer: Signer | None = None,
) -> tuple[str, tuple[tuple[str, bytes], ...], bytes]:
    """(message id, signed headers, value) of one record as ``source`` sends it."""
    env = Envelope(
        message_id=new_id(),
        message_type=message.avro_name,
        source=source,
        target=target,
        sent_at_ms=now_ms(),
        correlation_id=correlation,
    )
    value = _codec.encode(message)
    headers = (signer or demo_signer(source)).sign(env.to_headers(), b"k", value)
    return env.message_id, headers, value


def entry(
    direction: str,
    message: Message,
    *,
    at_ms: int,
    correlation: str | None = None,
    signer: Signer | None = None,
    subject: str | None = None,
) -> AuditEntry:
    """The log entry of a record HOST sent to HOME or received from HOME."""
    source, target = (HOST, HOME) if direction == SENT else (HOME, HOST)
    message_id, headers, value = record(
        message, source, target, correlation=correlation, signer=signer
    )
    field = SUBJECT_OF.get(type(message))
    return AuditEntry(
        direction=direction,
        at_ms=at_ms,
        topic=topic("claim", target),
        partition=None if direction == SENT else 0,
        offset=None if direction == SENT else at_ms,
        key=b"k",
        value=value,
        headers=headers,
        message_id=message_id,
        correlation_id=correlation,
        subject=subject or (str(getattr(message, field)) if field else None),
        signature=base64.b64decode(dict(headers)["xs-signature"]),
    )


def report_about(correlation: str) -> ErrorReport:
    return samples.error_report().model_copy(update={"ref_message_id": correlation})


def fill(log: SqlAuditLog) -> dict[str, str]:
    """A log of 9 entries, four about CLAIM (seq 3, 5, 7, 8) between others' entries; the
    message ids by name."""
    claim = samples.claim()
    other = samples.claim(claim_id=OTHER)
    log.append([entry(SENT, other, at_ms=T0 + 1)])
    log.append([entry(RECEIVED, samples.review(OTHER), at_ms=T0 + 2)])
    sent = entry(SENT, claim, at_ms=T0 + 3)
    log.append([sent])
    log.append([entry(SENT, samples.notice().model_copy(update={"claim_id": OTHER}), at_ms=T0 + 4)])
    review = entry(RECEIVED, samples.review(CLAIM), at_ms=T0 + 5, correlation=sent.message_id)
    log.append([review])
    log.append([entry(SENT, samples.claim(claim_id="C-460100-3"), at_ms=T0 + 6)])
    notice = entry(SENT, samples.notice(), at_ms=T0 + 7)
    log.append([notice])
    # a report answering the notice: no claim id of its own, the subject is inherited
    report = entry(
        RECEIVED, report_about(notice.message_id), at_ms=T0 + 8, correlation=notice.message_id
    )
    log.append([report])
    log.append([entry(RECEIVED, samples.review("C-460100-3"), at_ms=T0 + 9)])
    return {"claim": sent.message_id, "notice": notice.message_id, "report": report.message_id}


@pytest.fixture
def log(tmp_path: Path) -> Any:
    db = SqliteDatabase(tmp_path / f"province-{HOST}.sqlite3")
    audit = SqlAuditLog(db)
    fill(audit)
    yield audit
    db.close()


def export(log: SqlAuditLog, subject: str = CLAIM) -> dict[str, Any]:
    return export_subject(log, subject, demo_signer(HOST), now_ms())


def problems_of(doc: dict[str, Any], keys: KeyRing | None = None) -> list[str]:
    report = verify_export(doc, keys or demo_keyring())
    assert report.ok is not bool(report.problems)
    return report.problems


def links(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["chain"])


def full_links(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [link for link in doc["chain"] if "entry" in link]


def flip_b64(text: str, at: int | None = None) -> str:
    """The base64 of the same bytes with one byte changed."""
    data = bytearray(base64.b64decode(text))
    data[len(data) // 2 if at is None else at] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


def flip_hex(text: str) -> str:
    data = bytearray(bytes.fromhex(text))
    data[7] ^= 0x80
    return bytes(data).hex()


class TestExport:
    def test_the_export_of_a_claim_verifies(self, log: SqlAuditLog) -> None:
        doc = export(log)
        report = verify_export(doc, demo_keyring())
        assert report.ok, report.problems
        assert report.entries == 4
        assert report.signatures == 5  # four records and the head
        assert report.chain_length == 7  # seq 3 .. 9
        assert (report.province, report.subject, report.head_seq) == (HOST, CLAIM, 9)
        assert doc["format"] == FORMAT
        assert doc["anchor"]["seq"] == 2
        assert [link["seq"] for link in full_links(doc)] == [3, 5, 7, 8]
        assert {link["entry"]["direction"] for link in full_links(doc)} == {SENT, RECEIVED}
        others = [link for link in links(doc) if "entry" not in link]
        assert all(set(link) == {"seq", "digest"} for link in others)  # no content of others

    def test_the_inherited_subject_of_a_report_is_exported(self, log: SqlAuditLog) -> None:
        *_, notice, report = full_links(export(log))
        assert report["entry"]["subject"] == CLAIM
        assert report["entry"]["correlation_id"] == notice["entry"]["message_id"]

    def test_an_answer_logged_before_the_record_it_answers_is_exported(
        self, tmp_path: Path
    ) -> None:
        """A sent record is logged once the broker acknowledged it (bus/outbox.py flushes
        every 50 ms): a fast refusal can be received and logged first. It still belongs to
        the claim, in the log and in the export."""
        db = SqliteDatabase(tmp_path / "p.sqlite3")
        log = SqlAuditLog(db)
        sent = entry(SENT, samples.claim(), at_ms=T0 + 2)
        report = entry(
            RECEIVED, report_about(sent.message_id), at_ms=T0 + 1, correlation=sent.message_id
        )
        log.append([report])
        again = entry(  # a report about the report (answers chain)
            SENT, report_about(report.message_id), at_ms=T0 + 1, correlation=report.message_id
        )
        log.append([again])
        log.append([sent])
        doc = export(log)
        db.close()
        assert [link["entry"]["message_id"] for link in full_links(doc)] == [
            report.message_id,
            again.message_id,
            sent.message_id,
        ]
        assert problems_of(doc) == []

    def test_an_answer_waits_for_its_subject_across_appends_and_a_rollback(
        self, tmp_path: Path
    ) -> None:
        """An answer logged first keeps waiting while other entries are logged, and while the
        record it answers is logged in a step that fails; it gets its subject when that
        record is logged for good, and the chain goes on from the last entry kept."""
        db = SqliteDatabase(tmp_path / "p.sqlite3")
        log = SqlAuditLog(db)
        sent = entry(SENT, samples.claim(), at_ms=T0 + 3)
        report = entry(
            RECEIVED, report_about(sent.message_id), at_ms=T0 + 1, correlation=sent.message_id
        )
        log.append([report])
        log.append([entry(SENT, samples.claim(claim_id=OTHER), at_ms=T0 + 2)])

        def failing_step() -> None:
            with db.write():
                log.append([sent])
                raise RuntimeError("the step fails after logging")

        with pytest.raises(RuntimeError):
            failing_step()
        assert log.of_subject(CLAIM) == []
        assert log.head()[0] == 2
        log.append([sent])
        assert [e.message_id for e in log.of_subject(CLAIM)] == [
            report.message_id,
            sent.message_id,
        ]
        doc = export(log)
        db.close()
        assert doc["head"]["seq"] == 3
        assert problems_of(doc) == []

    def test_a_report_answering_another_claim_is_a_problem(self, log: SqlAuditLog) -> None:
        doc = export(log)
        report = full_links(doc)[3]["entry"]
        stray = entry(RECEIVED, report_about("x"), at_ms=T0, correlation=new_id(), subject=CLAIM)
        log.append([stray])
        doc = export(log)
        problems = problems_of(doc)
        assert problems == [
            f"seq 10 (received ErrorReport): answers {stray.correlation_id!r}, not a record of "
            f"this export about {CLAIM}"
        ]
        assert report["subject"] == CLAIM

    def test_write_and_read_round_trip(self, log: SqlAuditLog, tmp_path: Path) -> None:
        doc = export(log)
        path = tmp_path / "e.json"
        write_export(path, doc)
        assert read_export(path) == doc
        assert verify_export(read_export(path), demo_keyring()).ok

    def test_no_entry_about_the_subject_is_an_error(self, log: SqlAuditLog) -> None:
        with pytest.raises(ExportError, match="no entry about C-nobody"):
            export(log, "C-nobody")

    def test_an_altered_log_is_not_exported(self, log: SqlAuditLog) -> None:
        [(_, digest)] = log.digests(4, 4)
        with log.db.write() as cur:
            cur.execute("UPDATE audit_log SET digest = ? WHERE seq = 4", (bytes(32),))
        with pytest.raises(ExportError, match="does not reach the head hash at seq 9"):
            export(log)
        with log.db.write() as cur:
            cur.execute("UPDATE audit_log SET digest = ? WHERE seq = 4", (digest,))
        assert export(log)
        with log.db.write() as cur:
            cur.execute("UPDATE audit_log SET at_ms = 1 WHERE seq = 5")
        with pytest.raises(ExportError, match="log entry 5 no longer matches its digest"):
            export(log)


def _value(doc: dict[str, Any]) -> None:
    entry = full_links(doc)[1]["entry"]
    entry["value"] = flip_b64(entry["value"])


def _header(doc: dict[str, Any]) -> None:
    headers = full_links(doc)[0]["entry"]["headers"]
    target = next(h for h in headers if h[0] == "xs-target")
    target[1] = flip_b64(target[1], at=0)


def _key(doc: dict[str, Any]) -> None:
    entry = full_links(doc)[0]["entry"]
    entry["key"] = flip_b64(entry["key"])


def _at(doc: dict[str, Any]) -> None:
    full_links(doc)[2]["entry"]["at_ms"] += 1


def _other_digest(doc: dict[str, Any]) -> None:
    link = links(doc)[1]  # seq 4: another claim's
    link["digest"] = flip_hex(link["digest"])


def _stated_digest(doc: dict[str, Any]) -> None:
    entry = full_links(doc)[0]["entry"]
    entry["digest"] = flip_hex(entry["digest"])


def _anchor(doc: dict[str, Any]) -> None:
    doc["anchor"]["hash"] = flip_hex(doc["anchor"]["hash"])


def _head_hash(doc: dict[str, Any]) -> None:
    doc["head"]["hash"] = flip_hex(doc["head"]["hash"])


def _head_signature(doc: dict[str, Any]) -> None:
    doc["head_signature"]["signature"] = flip_b64(doc["head_signature"]["signature"])


def _exported_at(doc: dict[str, Any]) -> None:
    doc["exported_at_ms"] += 1


def _record_signature(doc: dict[str, Any]) -> None:
    headers = full_links(doc)[3]["entry"]["headers"]
    sig = next(h for h in headers if h[0] == "xs-signature")
    sig[1] = flip_b64(sig[1])


def _subject(doc: dict[str, Any]) -> None:
    full_links(doc)[0]["entry"]["subject"] = OTHER


def _message_id(doc: dict[str, Any]) -> None:
    full_links(doc)[0]["entry"]["message_id"] = new_id()


def _not_canonical_b64(doc: dict[str, Any]) -> None:
    headers = full_links(doc)[0]["entry"]["headers"]
    sig = next(h for h in headers if h[0] == "xs-signature")  # 88 bytes: ends with ==
    text = sig[1]
    # the last character before == has 4 unused bits: set one, the same bytes decode
    pad = text.index("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[pad - 1])
    sig[1] = text[: pad - 1] + alphabet[last ^ 1] + text[pad:]
    assert base64.b64decode(sig[1]) == base64.b64decode(text)


TAMPERING: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("value", _value, ["seq 5: the entry does not match its digest", "chain"]),
    ("header", _header, ["seq 3: the entry does not match its digest", "record signature"]),
    ("key", _key, ["seq 3: the entry does not match its digest", "bad_signature"]),
    ("at_ms", _at, ["seq 7: the entry does not match its digest", "chain"]),
    ("digest of another entry", _other_digest, ["chain"]),
    ("stated digest", _stated_digest, ["seq 3: the entry does not match its digest"]),
    ("anchor", _anchor, ["chain"]),
    ("head hash", _head_hash, ["chain", "head signature: does not verify"]),
    ("head signature", _head_signature, ["head signature: does not verify"]),
    ("export time", _exported_at, ["head signature: does not verify"]),
    ("record signature", _record_signature, ["seq 8", "chain", "signature differs"]),
    ("subject", _subject, ["seq 3", "subject"]),
    ("message id", _message_id, ["message_id differs"]),
    ("non-canonical base64", _not_canonical_b64, ["not canonical base64"]),
]


class TestTampering:
    @pytest.mark.parametrize(
        ("change", "expected"),
        [(t[1], t[2]) for t in TAMPERING],
        ids=[t[0] for t in TAMPERING],
    )
    def test_one_changed_byte_fails(
        self,
        log: SqlAuditLog,
        change: Callable[[dict[str, Any]], None],
        expected: list[str],
    ) -> None:
        doc = export(log)
        changed = copy.deepcopy(doc)
        change(changed)
        assert changed != doc
        problems = problems_of(changed)
        assert problems
        for text in expected:
            assert any(text in p for p in problems), (text, problems)

    def test_a_digest_link_removed_from_the_middle_fails(self, log: SqlAuditLog) -> None:
        doc = export(log)
        del doc["chain"][3]  # seq 6: another claim's
        problems = problems_of(doc)
        assert any("where 6 follows" in p for p in problems), problems
        assert "chain: 3 links in all are out of sequence" in problems
        assert len(problems) == 4  # gap, count, end of the links, hash: not one per link
        assert any("chain" in p and "signed head" in p for p in problems), problems

    def test_an_exported_entry_removed_from_the_middle_fails(self, log: SqlAuditLog) -> None:
        doc = export(log)
        del doc["chain"][2]  # seq 5: the review
        problems = problems_of(doc)
        assert any("where 5 follows" in p for p in problems), problems

    def test_an_entry_replaced_by_its_digest_still_verifies_but_is_not_shown(
        self, log: SqlAuditLog
    ) -> None:
        """Hiding an entry behind its digest keeps the chain whole: the export then simply
        shows fewer records (what an export can and cannot prove)."""
        doc = export(log)
        link = doc["chain"][2]
        doc["chain"][2] = {"seq": link["seq"], "digest": link["entry"]["digest"]}
        assert problems_of(doc) == []

    @pytest.mark.parametrize(
        "doc",
        [
            None,
            "garbage",
            [],
            {},
            {"format": "something else"},
            {"format": FORMAT},
            {"format": FORMAT, "province": 460000},
        ],
    )
    def test_malformed_documents_are_problems_not_exceptions(self, doc: Any) -> None:
        report = verify_export(doc, demo_keyring())
        assert not report.ok
        assert len(report.problems) == 1
        assert "\n" not in report.problems[0]

    def test_broken_parts_are_problems_not_exceptions(self, log: SqlAuditLog) -> None:
        doc = export(log)
        full_links(doc)[0]["entry"]["value"] = "!!not base64!!"
        full_links(doc)[1]["entry"]["headers"] = [["xs-source"]]
        doc["chain"][1] = "nonsense"
        full_links(doc)[2]["entry"]["partition"] = True
        problems = problems_of(doc)
        assert any("seq 3: value is not base64" in p for p in problems), problems
        assert any("header 0 is not [name, base64 value]" in p for p in problems), problems
        assert any("link 1: not an object" in p for p in problems), problems
        assert any("partition is not an integer or null" in p for p in problems), problems
        assert any("cannot be recomputed" in p for p in problems), problems


class TestKeys:
    def test_a_record_signed_with_a_key_its_source_does_not_own_fails(self, tmp_path: Path) -> None:
        db = SqliteDatabase(tmp_path / "p.sqlite3")
        log = SqlAuditLog(db)
        log.append([entry(SENT, samples.claim(), at_ms=T0)])
        # "from Hebei", but signed with Fujian's key
        log.append(
            [entry(RECEIVED, samples.review(CLAIM), at_ms=T0 + 1, signer=demo_signer("350000"))]
        )
        problems = problems_of(export(log))
        db.close()
        assert problems == [
            "seq 2 (received ReviewResult): record signature: key_not_owned: key 350000-demo-1 "
            "belongs to 350000, not to '130000'"
        ]

    def test_the_head_must_be_signed_by_the_exporting_province(self, log: SqlAuditLog) -> None:
        doc = export_subject(log, CLAIM, demo_signer(HOME), now_ms())  # Hebei signs Hainan's log
        doc["province"] = HOST
        problems = problems_of(doc)
        assert any("belongs to 130000, not 460000" in p for p in problems), problems

    def test_old_evidence_verifies_with_a_retired_key_but_not_after_it(
        self, log: SqlAuditLog
    ) -> None:
        """No age window: records years old still verify with the key valid when they were
        sent; a head signed after the exporter's key was retired does not."""
        now = now_ms()  # after every record of the log was sent
        later = now + 10 * 365 * 86_400_000
        doc = export_subject(log, CLAIM, demo_signer(HOST), now)
        assert problems_of(doc) == []
        late = export_subject(log, CLAIM, demo_signer(HOST), later)
        host_key, home_key = (
            demo_keyring().get(f"{HOST}-demo-1"),
            demo_keyring().get(f"{HOME}-demo-1"),
        )
        assert host_key is not None
        assert home_key is not None
        retired = KeyRing([dataclasses.replace(host_key, valid_until_ms=now + 60_000), home_key])
        assert problems_of(doc, retired) == []
        assert problems_of(late, retired) == [
            f"head signature: key 460000-demo-1 is not valid at export time {later}"
        ]


class TestRetention:
    def test_prune_before_the_claim_keeps_the_export_verifiable(self, log: SqlAuditLog) -> None:
        assert log.prune(T0 + 3) == 2  # seq 1, 2 (others') dropped
        doc = export(log)
        assert doc["anchor"]["seq"] == 2
        assert problems_of(doc) == []

    def test_prune_inside_the_claim_keeps_the_rest_verifiable(self, log: SqlAuditLog) -> None:
        assert log.prune(T0 + 5) == 4  # the claim package (seq 3) is gone too
        doc = export(log)
        assert doc["anchor"]["seq"] == 4
        assert [link["seq"] for link in full_links(doc)] == [5, 7, 8]
        assert problems_of(doc) == []

    def test_prune_everything_then_append_continues_the_chain(self, log: SqlAuditLog) -> None:
        assert log.prune(T0 + 100) == 9
        assert log.count() == 0
        log.append([entry(SENT, samples.claim(claim_id="C-460100-9"), at_ms=T0 + 101)])
        doc = export(log, "C-460100-9")
        assert doc["anchor"]["seq"] == 9
        assert problems_of(doc) == []


# --- the command line ---------------------------------------------------------------------
async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Run one ``xsettle`` command; (exit code, stdout lines, stderr)."""
    args = build_parser().parse_args(list(argv))
    code: int = await args.run(args)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def change_one_byte_of_a_value(path: Path) -> None:
    """Change one byte of the file: a character in the middle of an entry's base64 value."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"value": "') + len(b'"value": "') + 12
    raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
    path.write_bytes(bytes(raw))


class TestCommandLine:
    async def test_export_then_verify(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        state = tmp_path / "state"
        db = SqliteDatabase(state / f"province-{HOST}.sqlite3")
        fill(SqlAuditLog(db))
        db.close()
        out = tmp_path / "evidence.json"

        code, lines, _ = await run(
            capsys, "audit", "export", "--claim", CLAIM, "--province", HOST,
            "--state", str(state), "--out", str(out),
        )  # fmt: skip
        assert code == 0
        assert len(lines) == 1
        assert "4 signed record(s)" in lines[0]
        assert "7 link(s)" in lines[0]
        assert str(out) in lines[0]

        code, lines, _ = await run(capsys, "audit", "verify", str(out))
        assert code == 0
        assert lines == [
            f"OK {out}: 4 signed record(s) about {CLAIM} from {HOST}'s log, 5 signature(s) "
            f"checked, chain of 7 link(s) up to seq 9 signed by {HOST}-demo-1"
        ]

        change_one_byte_of_a_value(out)
        code, lines, err = await run(capsys, "audit", "verify", str(out))
        assert code == 1
        assert any("does not match its digest" in line for line in lines), lines
        assert "FAILED" in err

        garbage = tmp_path / "garbage.json"
        garbage.write_text("{not json", encoding="utf-8")
        code, lines, err = await run(capsys, "audit", "verify", str(garbage))
        assert (code, lines) == (2, [])
        assert len(err.splitlines()) == 1
        assert "not an audit export" in err

        other = tmp_path / "other.json"
        other.write_text(json.dumps({"hello": 1}), encoding="utf-8")
        code, _, err = await run(capsys, "audit", "verify", str(other))
        assert code == 2
        assert "not an audit export" in err

    async def test_export_errors_are_one_line_and_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        state = tmp_path / "state"
        code, _, err = await run(
            capsys, "audit", "export", "--claim", CLAIM, "--province", HOST, "--state", str(state)
        )
        assert code == 2
        assert err.strip() == (
            f"xsettle audit export: no database of {HOST} at {state / f'province-{HOST}.sqlite3'}"
        )
        assert not state.exists()  # nothing created

        db = SqliteDatabase(state / f"province-{HOST}.sqlite3")
        fill(SqlAuditLog(db))
        db.close()
        code, _, err = await run(
            capsys, "audit", "export", "--claim", "C-nobody", "--province", HOST,
            "--state", str(state),
        )  # fmt: skip
        assert code == 2
        assert len(err.splitlines()) == 1
        assert "no entry about C-nobody" in err

        code, _, err = await run(
            capsys, "audit", "export", "--claim", CLAIM, "--province", "4600", "--state", str(state)
        )
        assert code == 2
        assert "not a province code" in err


# --- end to end on the real broker --------------------------------------------------------
@pytest.fixture
async def pair(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> Any:
    made = Pair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_lao_zhangs_claim_export_verifies_and_fails_after_one_byte_changed(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lao Zhang's stay in Hainan settled between two provinces on the broker: the export
    of his claim at the host and at the home verifies with the directory's public keys, and
    one byte changed in the file makes it fail."""
    await pair.start()
    await pair.file_lao_zhang()
    claim = await pair.claim()
    await pair.host.host.submit(claim)
    await pair.settled(claim.claim_id)
    await eventually(lambda: len(pair.home.backoffice.settlements()) == 1, 30)
    host_log, home_log = pair.host.node.store.audit, pair.home.node.store.audit

    def logged(log: Any, n: int) -> bool:
        return len(log.of_subject(claim.claim_id)) >= n

    # claim package, review result, settlement notice: sent or received on each side
    await eventually(lambda: logged(host_log, 3) and logged(home_log, 3), 30)
    keys = pair.directory.keyring()
    for system in (pair.host, pair.home):
        signer = system.node.trust.signer
        assert signer is not None
        doc = export_subject(system.node.store.audit, claim.claim_id, signer, now_ms())
        report = verify_export(doc, keys)
        assert report.ok, report.problems
        assert report.entries >= 3
        kinds = {
            (link["entry"]["direction"], dict(link["entry"]["headers"])["xs-message-type"])
            for link in full_links(doc)
        }
        claim_type = base64.b64encode(b"xsettle.v1.ClaimPackage").decode()
        if system is pair.host:
            assert (SENT, claim_type) in kinds
        else:
            assert (RECEIVED, claim_type) in kinds

    # the command line, on the host's database while the province runs
    out = tmp_path / "lao-zhang.json"
    directory_file = tmp_path / "directory.toml"  # the Pair's remapped directory
    code, lines, err = await run(
        capsys, "audit", "export", "--claim", claim.claim_id, "--province", pair.host_code,
        "--state", str(pair.state[pair.host_code]), "--out", str(out),
        "--directory", str(directory_file),
    )  # fmt: skip
    assert code == 0, err
    code, lines, err = await run(
        capsys, "audit", "verify", str(out), "--directory", str(directory_file)
    )
    assert code == 0, (lines, err)
    assert lines[0].startswith(f"OK {out}")

    change_one_byte_of_a_value(out)
    code, lines, err = await run(
        capsys, "audit", "verify", str(out), "--directory", str(directory_file)
    )
    assert code == 1
    assert any("does not match its digest" in line for line in lines), lines
    assert any("chain" in line for line in lines), lines
