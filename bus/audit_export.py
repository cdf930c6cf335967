"""Evidence of one claim: an export of the signed message log that anyone can check offline
with the directory's public keys only (``xsettle audit export`` / ``xsettle audit verify``).

An export carries every entry of the province's log (:mod:`bus.audit`) about one subject (a
claim id or a filing id) in full, the digests of the entries in between (no content: they may
be about other people), and the chain head signed by the exporting province. It shows that
each record was signed by the province it names as its sender, that the exporting province
logged exactly these bytes, in this order, in one append-only chain, and what that chain's
head was when it exported. It cannot show that no other entry is about the subject: an entry
given by digest only is opaque.

The document (JSON, UTF-8; :func:`write_export` sorts keys and indents)::

    {
      "format": "xsettle-audit-export/1",
      "province": "460000",                 exporting province
      "subject": "C-460000-...",            the claim (or filing) id
      "exported_at_ms": 1778000000000,      epoch milliseconds
      "anchor": {"seq": 41, "hash": HEX},   chain hash of the entry before the first link
      "chain": [LINK, ...],                 every seq from anchor.seq + 1 up to head.seq
      "head": {"seq": 97, "hash": HEX},     the log's last entry when exported
      "head_signature": {"algorithm": "ed25519", "key_id": "460000-demo-1",
                         "signature": B64}
    }

    LINK  = {"seq": N, "entry": ENTRY}      an entry about the subject, in full
          | {"seq": N, "digest": HEX}       any other entry: its digest only
    ENTRY = {"direction": "sent" | "received", "at_ms": INT, "topic": STR,
             "partition": INT | null, "offset": INT | null,
             "key": B64 | null, "value": B64, "headers": [[NAME, B64], ...],
             "message_id": STR, "correlation_id": STR | null, "subject": STR,
             "signature": B64 | null, "digest": HEX}

HEX is lowercase hexadecimal (64 digits for 32 bytes); B64 is standard base64 with padding
(RFC 4648 section 4), in its canonical form (re-encoding the decoded bytes gives the same
text). Header names are text, header values bytes (B64), in wire order.

Canonical forms (a field is the byte 0x00 when absent, else 0x01, its length as 4 bytes
big-endian, then its bytes; numbers are decimal ASCII text):

* Entry digest: SHA-256 of ``"XSETTLE-AUDIT-V1\\n"``, then the fields direction, at_ms,
  topic, partition, offset (text: UTF-8; numbers: decimal; a null partition or offset is
  absent), the record key (null: absent), the value, then the number of headers as 4
  bytes big-endian, then for each header in wire order its name (UTF-8) and its value as
  two fields (:func:`bus.audit.entry_digest`). ``message_id``, ``correlation_id``, ``subject``,
  ``signature`` and ``digest`` are not covered: the verifier derives them from the covered
  bytes and checks they agree.
* Chain: ``hash = SHA-256(previous hash || digest)`` (32 + 32 raw bytes) for each link in
  order, starting from ``anchor.hash``; after the last link it must equal ``head.hash``. An
  anchor of seq 0 is 32 zero bytes (nothing before the first entry ever written).
* Head statement, signed by the exporting province (Ed25519 over these bytes):
  ``"XSETTLE-AUDIT-HEAD-V1\\n" + province + "\\n" + head.seq + "\\n" + hex(head.hash) + "\\n"
  + exported_at_ms`` (UTF-8, ASCII in practice; no final newline). The key named by
  ``key_id`` must be published for ``province`` and valid at ``exported_at_ms``.
* Record signature (contract v1.1, :func:`bus.signing.canonical`): ``"XSETTLE-SIG-V1\\n"``,
  then the raw values of the headers xs-message-id, xs-message-type, xs-source, xs-target,
  xs-sent-at, xs-reply-to, xs-deadline, xs-correlation-id, xs-attempt, xs-signature-alg,
  xs-key-id as fields in this order (absent: 0x00; one present twice: invalid), then the
  record key, then the value. The signature (Ed25519, RFC 8032, 64 bytes) is the base64
  ``xs-signature`` header, made with the key ``xs-key-id``, which
  must be published for ``xs-source`` and valid at ``xs-sent-at``. No age window applies:
  evidence is old by nature.

What :func:`verify_export` checks, besides the structure: every entry's digest recomputed
(and equal to the one it states); the chain from the anchor through every link equal to the
head; the head signature; every record's signature; each entry's ``message_id``,
``correlation_id`` and ``signature`` equal to its headers; a sent entry's ``xs-source`` and a
received entry's ``xs-target`` equal to the exporting province; and that each entry is about
the subject: its value decodes (contract schemas) to a message naming the subject
(``claim_id`` / ``filing_id``), or, for a message without one (ErrorReport), it answers
(``xs-correlation-id``) a record of the export that is (in any order: a sent record is logged
once the broker acknowledged it, which can be after the answer to it was logged).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bus.audit import GENESIS, RECEIVED, SENT, AuditEntry, AuditLog, chain, entry_digest
from bus.codec import Codec
from bus.constants import (
    H_CORRELATION_ID,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_SENT_AT,
    H_SOURCE,
    H_TARGET,
)
from bus.envelope import SUBJECT_OF
from bus.errors import DecodeError
from bus.signing import ED25519, KeyRing, SignatureError, Signer, Verified, Verifier, signature_of
from bus.transport import Headers

FORMAT: Final = "xsettle-audit-export/1"
"""The ``format`` tag of an export this module writes and reads."""
HEAD_TAG: Final = b"XSETTLE-AUDIT-HEAD-V1\n"
"""First bytes of the signed head statement (domain separation)."""

_HEX32 = re.compile(r"[0-9a-f]{64}")


class ExportError(ValueError):
    """An export cannot be made (nothing about the subject, an inconsistent log) or a file
    is not an export at all. One line, fit for the command line."""


# --- canonical forms ----------------------------------------------------------------------
def head_statement(province: str, seq: int, head_hash: bytes, exported_at_ms: int) -> bytes:
    """The bytes the exporting province signs (see the module docstring)."""
    return HEAD_TAG + f"{province}\n{seq}\n{head_hash.hex()}\n{exported_at_ms}".encode()


def verify_record(
    headers: Headers, key: bytes | None, value: bytes | None, keys: KeyRing
) -> Verified:
    """Check a record's signature as evidence: the signature, the key published and owned by
    ``xs-source``, valid at ``xs-sent-at``, and no window on ``xs-sent-at`` (evidence is old
    by nature). :class:`SignatureError` says why it fails.

    The bus's own :class:`Verifier` does the work with both windows at zero and "now" set to
    the record's own ``xs-sent-at``, so the window checks pass by construction and every
    other check is exactly the one a receiving province makes."""
    raw = next((v for k, v in headers if k == H_SENT_AT), None)
    try:
        sent = int(raw) if raw is not None else 0
    except ValueError:
        sent = 0  # the Verifier reports the unreadable xs-sent-at
    return Verifier(keys, clock_skew_ms=0, max_age_ms=0).verify(headers, key, value, sent)


# --- JSON forms ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def entry_json(e: AuditEntry, digest: bytes) -> dict[str, Any]:
    """An entry as the export shows it (everything but its seq, which the link carries)."""
    return {
        "direction": e.direction,
        "at_ms": e.at_ms,
        "topic": e.topic,
        "partition": e.partition,
        "offset": e.offset,
        "key": _b64(e.key) if e.key is not None else None,
        "value": _b64(e.value),
        "headers": [[name, _b64(raw)] for name, raw in e.headers],
        "message_id": e.message_id,
        "correlation_id": e.correlation_id,
        "subject": e.subject,
        "signature": _b64(e.signature) if e.signature is not None else None,
        "digest": digest.hex(),
    }


def export_subject(log: AuditLog, subject: str, signer: Signer, now_ms: int) -> dict[str, Any]:
    """The export of every entry about ``subject`` with its chain proof up to the log's
    head, signed by ``signer`` at ``now_ms``. :class:`ExportError` when no entry is about
    the subject, or when the log does not hold together (a gap, an entry that no longer
    matches its digest, a chain that does not reach the head: the database was altered)."""
    head_seq, head_hash = log.head()  # first: entries appended while exporting are left out
    entries = [e for e in log.of_subject(subject) if e.seq <= head_seq]
    if not entries:
        raise ExportError(f"the signed message log has no entry about {subject}")
    first = entries[0].seq
    anchor = log.hash_before(first)
    digests = log.digests(first, head_seq)
    if [s for s, _ in digests] != list(range(first, head_seq + 1)):
        raise ExportError(
            f"the signed message log has a gap between seq {first} and {head_seq} "
            "(pruned while exporting? try again)"
        )
    full = {e.seq: e for e in entries}
    links: list[dict[str, Any]] = []
    running = anchor
    for seq, digest in digests:
        e = full.get(seq)
        if e is None:
            links.append({"seq": seq, "digest": digest.hex()})
        else:
            if entry_digest(e) != digest:
                raise ExportError(f"log entry {seq} no longer matches its digest: altered")
            links.append({"seq": seq, "entry": entry_json(e, digest)})
        running = chain(running, digest)
    if running != head_hash:
        raise ExportError(
            f"the chain from seq {first} does not reach the head hash at seq {head_seq}: "
            "the log was altered"
        )
    statement = head_statement(signer.province, head_seq, head_hash, now_ms)
    return {
        "format": FORMAT,
        "province": signer.province,
        "subject": subject,
        "exported_at_ms": now_ms,
        "anchor": {"seq": first - 1, "hash": anchor.hex()},
        "chain": links,
        "head": {"seq": head_seq, "hash": head_hash.hex()},
        "head_signature": {
            "algorithm": signer.algorithm,
            "key_id": signer.key_id,
            "signature": _b64(signer.key.sign(statement)),
        },
    }


def write_export(path: Path | str, doc: dict[str, Any]) -> None:
    """Write ``doc`` as UTF-8 JSON (sorted keys, indented), replacing ``path`` at once."""
    path = Path(path)
    text = json.dumps(doc, ensure_ascii=False, sort_keys=True, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_export(path: Path | str) -> dict[str, Any]:
    """Read an export; :class:`ExportError` (one line) when the file cannot be read, is not
    JSON, or is not an xsettle audit export."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot read it: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not an audit export: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f'{path}: not an audit export (no "format": "{FORMAT}")')
    return doc


# --- verification -------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """What :func:`verify_export` found."""

    ok: bool
    """True when there is no problem."""
    problems: list[str] = field(default_factory=list)
    """One line per problem."""
    entries: int = 0
    """Entries given in full (checked)."""
    signatures: int = 0
    """Signatures that verified (records and the head)."""
    chain_length: int = 0
    """Links from the first exported entry up to the head."""
    province: str = ""
    subject: str = ""
    head_seq: int = 0
    key_id: str = ""
    """The key that signed the head."""


class _Malformed(Exception):
    """A part of the document that does not have the documented shape."""


def _get(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise _Malformed(f"{where}: {name} is missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):  # JSON true is no integer here
        raise _Malformed(f"{where}: {name} is not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, "null" if k is type(None) else k.__name__) for k in kinds)


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise _Malformed(f"{where}: unexpected field(s) {', '.join(extra)}")


def _hex32(text: str, what: str) -> bytes:
    if not _HEX32.fullmatch(text):
        raise _Malformed(f"{what} is not 64 lowercase hex digits")
    return bytes.fromhex(text)


def _unb64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Malformed(f"{what} is not base64") from None
    if _b64(data) != text:
        raise _Malformed(f"{what} is not canonical base64 (changed?)")
    return data


_ENTRY_FIELDS = {
    "direction", "at_ms", "topic", "partition", "offset", "key", "value", "headers",
    "message_id", "correlation_id", "subject", "signature", "digest",
}  # fmt: skip
_NONE = type(None)
_OWN, _ANSWER, _BAD = "own", "answer", "bad"


@dataclass
class _Full:
    seq: int
    entry: AuditEntry
    stated_digest: bytes
    where: str


def _parse_entry(seq: int, obj: Any, where: str) -> _Full:
    if not isinstance(obj, dict):
        raise _Malformed(f"{where}: entry is not an object")
    _only(obj, _ENTRY_FIELDS, where)
    direction = _get(obj, "direction", str, where)
    if direction not in (SENT, RECEIVED):
        raise _Malformed(f"{where}: direction {direction!r} is neither sent nor received")
    raw_headers = _get(obj, "headers", list, where)
    headers: list[tuple[str, bytes]] = []
    for i, pair in enumerate(raw_headers):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise _Malformed(f"{where}: header {i} is not [name, base64 value]")
        headers.append((pair[0], _unb64(pair[1], f"{where}: header {pair[0]}")))
    key = _get(obj, "key", (str, _NONE), where)
    signature = _get(obj, "signature", (str, _NONE), where)
    entry = AuditEntry(
        direction=direction,
        at_ms=_get(obj, "at_ms", int, where),
        topic=_get(obj, "topic", str, where),
        partition=_get(obj, "partition", (int, _NONE), where),
        offset=_get(obj, "offset", (int, _NONE), where),
        key=_unb64(key, f"{where}: key") if key is not None else None,
        value=_unb64(_get(obj, "value", str, where), f"{where}: value"),
        headers=tuple(headers),
        message_id=_get(obj, "message_id", str, where),
        correlation_id=_get(obj, "correlation_id", (str, _NONE), where),
        subject=_get(obj, "subject", (str, _NONE), where),
        signature=_unb64(signature, f"{where}: signature") if signature is not None else None,
        seq=seq,
    )
    return _Full(seq, entry, _hex32(_get(obj, "digest", str, where), f"{where}: digest"), where)


def _header(headers: Headers, name: str) -> str | None:
    raw = next((v for k, v in headers if k == name), None)
    return raw.decode("utf-8", "replace") if raw is not None else None


def verify_export(doc: Any, keys: KeyRing, codec: Codec | None = None) -> VerifyReport:
    """Check an export offline with the directory's public keys (see the module docstring).
    A malformed document is a list of problems, never an exception."""
    report = VerifyReport(ok=False)
    problems = report.problems
    try:
        _verify(doc, keys, codec or Codec(), report)
    except _Malformed as exc:
        problems.append(f"malformed export: {exc}")
    report.ok = not problems
    return report


def _verify(doc: Any, keys: KeyRing, codec: Codec, report: VerifyReport) -> None:
    problems = report.problems
    if not isinstance(doc, dict):
        raise _Malformed("the document is not a JSON object")
    if doc.get("format") != FORMAT:
        raise _Malformed(f"format is {doc.get('format')!r}, not {FORMAT!r}")
    _only(
        doc,
        {"format", "province", "subject", "exported_at_ms", "anchor", "chain", "head",
         "head_signature"},
        "document",
    )  # fmt: skip
    province = report.province = _get(doc, "province", str, "document")
    subject = report.subject = _get(doc, "subject", str, "document")
    exported_at = _get(doc, "exported_at_ms", int, "document")
    anchor_obj = _get(doc, "anchor", dict, "document")
    _only(anchor_obj, {"seq", "hash"}, "anchor")
    anchor_seq = _get(anchor_obj, "seq", int, "anchor")
    anchor = _hex32(_get(anchor_obj, "hash", str, "anchor"), "anchor hash")
    head_obj = _get(doc, "head", dict, "document")
    _only(head_obj, {"seq", "hash"}, "head")
    head_seq = report.head_seq = _get(head_obj, "seq", int, "head")
    head_hash = _hex32(_get(head_obj, "hash", str, "head"), "head hash")
    sig_obj = _get(doc, "head_signature", dict, "document")
    _only(sig_obj, {"algorithm", "key_id", "signature"}, "head_signature")
    algorithm = _get(sig_obj, "algorithm", str, "head_signature")
    key_id = report.key_id = _get(sig_obj, "key_id", str, "head_signature")
    head_sig = _unb64(_get(sig_obj, "signature", str, "head_signature"), "head signature")
    raw_links = _get(doc, "chain", list, "document")

    # 1. the head, signed by the exporting province
    pub = keys.get(key_id)
    if pub is None:
        problems.append(f"head signature: key {key_id} is not in the directory")
    elif pub.province != province:
        problems.append(f"head signature: key {key_id} belongs to {pub.province}, not {province}")
    elif algorithm != ED25519 or pub.algorithm != algorithm:
        problems.append(f"head signature: algorithm {algorithm!r} does not fit key {key_id}")
    elif not pub.valid_at(exported_at):
        problems.append(f"head signature: key {key_id} is not valid at export time {exported_at}")
    elif not pub.verify(head_sig, head_statement(province, head_seq, head_hash, exported_at)):
        problems.append(
            f"head signature: does not verify with {key_id} (head, province or time changed)"
        )
    else:
        report.signatures += 1

    # 2. the chain: contiguous links from anchor.seq + 1 to head.seq, hashing to the head
    if anchor_seq < 0:
        problems.append(f"anchor: seq {anchor_seq} is negative")
    if anchor_seq == 0 and anchor != GENESIS:
        problems.append("anchor: seq 0 must be the genesis hash (32 zero bytes)")
    digests: list[bytes | None] = []
    fulls: list[_Full] = []
    out_of_order = 0
    for i, link in enumerate(raw_links):
        expected = anchor_seq + 1 + i
        where = f"link {i}"
        if not isinstance(link, dict):
            problems.append(f"{where}: not an object")
            digests.append(None)
            continue
        seq = link.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != expected:
            if not out_of_order:  # one line, not one per link after a removed one
                problems.append(
                    f"{where}: seq {seq!r} where {expected} follows (entry removed or moved?)"
                )
            out_of_order += 1
            seq = expected
        where = f"seq {seq}"
        try:
            if "entry" in link:
                _only(link, {"seq", "entry"}, where)
                full = _parse_entry(seq, link["entry"], where)
                fulls.append(full)
                digests.append(_check_digest(full, problems))
            else:
                _only(link, {"seq", "digest"}, where)
                digests.append(_hex32(_get(link, "digest", str, where), f"{where}: digest"))
        except _Malformed as exc:
            problems.append(str(exc))
            digests.append(None)
    if out_of_order > 1:
        problems.append(f"chain: {out_of_order} links in all are out of sequence")
    report.chain_length = len(raw_links)
    report.entries = len(fulls)
    last = anchor_seq + len(raw_links)
    if not raw_links or not fulls:
        problems.append("the export holds no entry")
    if last != head_seq:
        problems.append(f"chain: the links end at seq {last}, the head is seq {head_seq}")
    if all(d is not None for d in digests):
        running = anchor
        for d in digests:
            assert d is not None
            running = chain(running, d)
        if running != head_hash:
            problems.append(
                "chain: the hashes from the anchor through every link do not give the signed "
                "head (an entry, a digest, the anchor or the head was changed)"
            )
    else:
        problems.append("chain: cannot be recomputed (a link is unreadable)")

    # 3. every record: its signature, its fields, its direction, its subject
    # an entry whose message names no subject (ErrorReport) is about the subject when it
    # answers one that is: in any order, since a sent record is logged once the broker
    # acknowledged it, possibly after the answer to it was received and logged
    established: set[str] = set()
    answers: list[tuple[_Full, str]] = []
    for full in fulls:
        about, where = _check_entry(full, province, subject, keys, codec, report)
        if about == _OWN:
            established.add(full.entry.message_id)
        elif about == _ANSWER:
            answers.append((full, where))
    while True:
        tied = [(f, w) for f, w in answers if f.entry.correlation_id in established]
        if not tied:
            break
        established.update(f.entry.message_id for f, _ in tied)
        answers = [(f, w) for f, w in answers if f.entry.correlation_id not in established]
    for full, where in answers:
        problems.append(
            f"{where}: answers {full.entry.correlation_id!r}, not a record of this export "
            f"about {subject}"
        )


def _check_digest(full: _Full, problems: list[str]) -> bytes:
    """The entry's recomputed digest (what the chain uses); a problem if it differs from the
    one the export states."""
    digest = entry_digest(full.entry)
    if digest != full.stated_digest:
        problems.append(
            f"{full.where}: the entry does not match its digest (its content was changed)"
        )
    return digest


def _check_entry(
    full: _Full,
    province: str,
    subject: str,
    keys: KeyRing,
    codec: Codec,
    report: VerifyReport,
) -> tuple[str, str]:
    """Check one entry; (how it is about the subject, how problems name it): :data:`_OWN`
    (its message names the subject), :data:`_ANSWER` (its message names none: it must answer
    one that does) or :data:`_BAD` (a problem was reported)."""
    e = full.entry
    kind = _header(e.headers, H_MESSAGE_TYPE) or "?"
    where = f"{full.where} ({e.direction} {kind.removeprefix('xsettle.v1.')})"

    def problem(text: str) -> None:
        report.problems.append(f"{where}: {text}")

    try:
        verify_record(e.headers, e.key, e.value, keys)
    except SignatureError as exc:
        problem(f"record signature: {exc}")
    else:
        report.signatures += 1
    if _header(e.headers, H_MESSAGE_ID) != e.message_id:
        problem("message_id differs from the xs-message-id header")
    if _header(e.headers, H_CORRELATION_ID) != e.correlation_id:
        problem("correlation_id differs from the xs-correlation-id header")
    if signature_of(e.headers) != e.signature:
        problem("signature differs from the xs-signature header")
    if e.direction == SENT and _header(e.headers, H_SOURCE) != province:
        problem(f"sent by {province} but xs-source is {_header(e.headers, H_SOURCE)!r}")
    if e.direction == RECEIVED and _header(e.headers, H_TARGET) != province:
        problem(f"received by {province} but xs-target is {_header(e.headers, H_TARGET)!r}")
    if e.subject != subject:
        problem(f"subject {e.subject!r} is not the export's {subject!r}")
    try:
        message = codec.decode(e.value)
    except DecodeError as exc:
        problem(f"the value is not a contract message: {exc}")
        return _BAD, where
    if message.avro_name != kind:
        problem(f"xs-message-type {kind} but the value is a {message.avro_name}")
    name = SUBJECT_OF.get(type(message))
    if name is None:
        return _ANSWER, where
    about = str(getattr(message, name))
    if about != subject:
        problem(f"the message is about {about}, not {subject}")
        return _BAD, where
    return _OWN, where
