"""Admissions the hospital desks made through the gateway, kept until discharge.

``HostRole.admit`` checks a patient and returns an :class:`~adapters.host.Admission`; the desk
discharges days later, perhaps after a restart, so the gateway keeps each admission in the
province's database (``gateway_admissions``). The claim id of an admission's discharge is
derived from the admission id (``A-460000-X`` → ``C-460000-X``), so a discharge sent twice
submits the same claim, which :meth:`HostRole.submit` turns into one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from adapters.host import Admission
from bus.db import Database
from bus.envelope import new_id, now_ms
from bus.models import FilingUpload, SettlementMode

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS gateway_admissions (
    admission_id TEXT PRIMARY KEY,
    person_id TEXT NOT NULL,
    hospital_code TEXT NOT NULL,
    hospital_level INTEGER NOT NULL,
    mode TEXT NOT NULL,
    admitted_at TEXT NOT NULL,
    filing TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StoredAdmission:
    """An admission as kept: the host role's admission and its id."""

    admission_id: str
    admission: Admission
    created_at_ms: int

    @property
    def claim_id(self) -> str:
        """The claim id its discharge submits."""
        return "C-" + self.admission_id.removeprefix("A-")


class AdmissionBook:
    """The gateway's admissions, in the province's database."""

    def __init__(self, db: Database, province: str) -> None:
        self.db = db
        self.province = province
        db.migrate("gateway-admissions/1", SCHEMA)

    def add(self, admission: Admission) -> StoredAdmission:
        """Keep an admission; returns it with its new id (``A-<province>-<13 hex>``)."""
        admission_id = f"A-{self.province}-{new_id()[:13].upper()}"
        at = now_ms()
        with self.db.write() as cur:
            cur.execute(
                "INSERT INTO gateway_admissions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    admission_id,
                    admission.person_id,
                    admission.hospital_code,
                    admission.hospital_level,
                    admission.mode.value,
                    admission.admitted_at.isoformat(),
                    admission.filing.model_dump_json(),
                    at,
                ),
            )
        return StoredAdmission(admission_id, admission, at)

    def get(self, admission_id: str) -> StoredAdmission | None:
        """An admission by id, or None."""
        rows = self.db.query(
            "SELECT admission_id, person_id, hospital_code, hospital_level, mode, admitted_at, "
            "filing, created_at_ms FROM gateway_admissions WHERE admission_id = ?",
            (admission_id,),
        )
        if not rows:
            return None
        aid, person_id, hospital, level, mode, admitted_at, filing, created = rows[0]
        return StoredAdmission(
            aid,
            Admission(
                person_id=person_id,
                filing=FilingUpload.model_validate_json(filing),
                hospital_code=hospital,
                hospital_level=int(level),
                mode=SettlementMode(mode),
                admitted_at=dt.datetime.fromisoformat(admitted_at),
            ),
            int(created),
        )
