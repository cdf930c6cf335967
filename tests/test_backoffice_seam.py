"""A province plugs in its own systems through the back-office Protocols alone."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import pytest

from adapters.backoffice import (
    ClaimState,
    HomeBackOffice,
    HostBackOffice,
    HostClaim,
    Person,
    ReviewRecord,
)
from adapters.directory import Directory
from adapters.home import HomeRole
from adapters.host import HostRole
from adapters.rules import YearUsage
from bus.models import (
    CatalogueClass,
    ClaimItem,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingStatus,
    FilingUpload,
    InsuranceType,
    ItemCategory,
    ReversalDecision,
    ReversalResult,
    ReviewResult,
    SettlementNotice,
    VisitType,
    now,
)
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually

pytestmark = pytest.mark.broker

TIERS = ",\n".join(
    f'  {{ insurance_type = "{t}", hospital_level = {lvl}, deductible_fen = 10000, '
    f"ratio_permille = 800, annual_cap_fen = 10000000 }}"
    for t in ("EMPLOYEE", "RESIDENT", "RETIRED_CADRE")
    for lvl in (1, 2, 3)
)


def tiny_directory(home: str, host: str) -> Directory:
    """Two provinces, one hospital, one DELAYED agreement, a two-item catalogue."""
    h, g = home[:2], host[:2]
    return Directory.from_toml(
        f"""
demo_keys = true
[[provinces]]
code = "{home}"
name = "Home"
[[provinces]]
code = "{host}"
name = "Host"
[[regions]]
code = "{h}0100"
name = "Home city"
[[regions]]
code = "{g}0100"
name = "Host city"
[[hospitals]]
code = "H{g}0001"
name = "Host General Hospital"
level = 2
region = "{g}0100"
[[agreements]]
home = "{h}0100"
host = "{host}"
mode = "DELAYED"
hospitals = "all"
[[policies]]
home_region = "{h}0100"
class_b_self_permille = 100
critical_illness = {{ threshold_fen = 10000000, ratio_permille = 500, annual_cap_fen = 100 }}
assistance = {{ ratio_permille = 500, annual_cap_fen = 100 }}
tiers = [
{TIERS}
]
[[catalogues]]
host = "{host}"
[[catalogues.items]]
item_code = "D1"
item_name = "drug"
category = "DRUG"
catalogue_class = "A"
unit_price_fen = 1000
[[catalogues.items]]
item_code = "T1"
item_name = "scan"
category = "TREATMENT"
catalogue_class = "B"
unit_price_fen = 50000
""",
        source="tiny.toml",
    )


class DictBackOffice:
    """A province's own systems, written by hand: plain dicts, no SQLite."""

    def __init__(self) -> None:
        self.persons: dict[str, Person] = {}
        self.filings: dict[str, list[FilingUpload]] = {}
        self.usage: dict[tuple[str, int], YearUsage] = {}
        self.reviews: dict[str, tuple[str, ReviewResult]] = {}
        self.hosts: dict[str, str] = {}
        self.notices: dict[str, SettlementNotice] = {}
        self.registry: dict[str, FilingUpload] = {}
        self.by_id: dict[str, HostClaim] = {}
        self.payments: list[tuple[str, str, int]] = []
        self.spent: dict[str, tuple[str, int, YearUsage]] = {}
        self.reversals: dict[str, tuple[str, ReversalResult]] = {}

    def person(self, person_id: str) -> Person | None:
        return self.persons.get(person_id)

    def record_filing(self, filing: FilingUpload) -> None:
        self.filings.setdefault(filing.person_id, []).append(filing)

    def filings_of(self, person_id: str) -> list[FilingUpload]:
        return self.filings.get(person_id, [])

    def record_receipt(self, filing_id: str, status: FilingStatus) -> None:
        pass

    def year_usage(self, person_id: str, year: int) -> YearUsage:
        return self.usage.get((person_id, year), YearUsage())

    def review_of(self, claim_id: str) -> tuple[str, ReviewResult] | None:
        return self.reviews.get(claim_id)

    def reviewed_for(self, claim_id: str) -> str | None:
        return self.hosts.get(claim_id)

    def record_review(
        self,
        claim_id: str,
        person_id: str,
        request_id: str,
        result: ReviewResult,
        year: int,
        usage: YearUsage,
        *,
        host: str,
        spent: YearUsage | None = None,
    ) -> tuple[str, ReviewResult]:
        if claim_id not in self.reviews:
            self.reviews[claim_id] = (request_id, result)
            self.hosts[claim_id] = host
            self.usage[(person_id, year)] = usage
            self.spent[claim_id] = (person_id, year, spent or YearUsage())
        return self.reviews[claim_id]

    def record_settlement(self, notice: SettlementNotice) -> None:
        self.notices[notice.claim_id] = notice

    def review_record(self, claim_id: str) -> ReviewRecord | None:
        if claim_id not in self.reviews:
            return None
        request_id, result = self.reviews[claim_id]
        person_id, year, spent = self.spent[claim_id]
        return ReviewRecord(request_id, result, person_id, year, self.hosts[claim_id], spent)

    def reversal(self, reversal_id: str) -> ReversalResult | None:
        found = self.reversals.get(reversal_id)
        return None if found is None else found[1]

    def confirmed_reversal_of(self, claim_id: str) -> ReversalResult | None:
        return next(
            (r for _, r in self.reversals.values()
             if r.claim_id == claim_id and r.decision is ReversalDecision.CONFIRMED),
            None,
        )  # fmt: skip

    def record_reversal(
        self, result: ReversalResult, *, host: str, usage: tuple[str, int, YearUsage] | None
    ) -> ReversalResult:
        if result.reversal_id in self.reversals:
            return self.reversals[result.reversal_id][1]
        self.reversals[result.reversal_id] = (host, result)
        if usage is not None:
            person_id, year, after = usage
            self.usage[(person_id, year)] = after
        return result

    def register_filing(self, filing: FilingUpload) -> FilingStatus:
        self.registry[filing.person_id] = filing
        return FilingStatus.REGISTERED

    def filing_for(self, person_id: str) -> FilingUpload | None:
        return self.registry.get(person_id)

    def save_claim(self, claim: HostClaim, payments: Sequence[tuple[str, int]] = ()) -> None:
        self.by_id[claim.claim.claim_id] = claim
        self.payments += [(claim.claim.claim_id, k, f) for k, f in payments if f]

    def claim(self, claim_id: str) -> HostClaim | None:
        return self.by_id.get(claim_id)

    def claim_by_request(self, request_id: str) -> HostClaim | None:
        return next((c for c in self.by_id.values() if c.request_id == request_id), None)

    def claims(self, *, open_only: bool = False) -> list[HostClaim]:
        return [
            c
            for c in self.by_id.values()
            if not open_only or c.state not in (ClaimState.SETTLED, ClaimState.REFUSED)
        ]


async def test_hand_written_back_office_settles_a_claim(
    make_node: NodeFactory, province_pool: ProvincePool
) -> None:
    """Home and host roles over a dict back office file, review and settle a stay."""
    home_code, host_code = province_pool.take(), province_pool.take()
    directory = tiny_directory(home_code, host_code)
    home_office, host_office = DictBackOffice(), DictBackOffice()
    home_node = await make_node(home_code, start=False)
    host_node = await make_node(host_code, start=False)
    typed_home: HomeBackOffice = home_office
    typed_host: HostBackOffice = host_office
    home = HomeRole(home_node, directory, typed_home)
    host = HostRole(host_node, directory, typed_host)
    await asyncio.gather(home_node.start(), host_node.start())
    await asyncio.gather(home_node.wait_ready(), host_node.wait_ready())
    region = home_code[:2] + "0100"
    pid = f"{region}195001011234"
    home_office.persons[pid] = Person(pid, "李四", InsuranceType.EMPLOYEE, region)
    await home.file(
        FilingUpload(
            filing_id=f"F-{region}-1", action=FilingAction.CREATE, person_id=pid,
            person_name="李四",
            insurance_type=InsuranceType.EMPLOYEE, home_region=region, host_region=host_code,
            reason=FilingReason.LONG_TERM_RESIDENT, channel=FilingChannel.WEB,
            valid_from=dt.date(2026, 1, 1), filed_at=now(),
        )
    )  # fmt: skip
    await eventually(lambda: pid in host_office.registry)
    at = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    admission = await host.admit(pid, region, f"H{host_code[:2]}0001", at)
    items = (
        ClaimItem(item_code="D1", item_name="drug", category=ItemCategory.DRUG,
                  catalogue_class=CatalogueClass.A, quantity_milli=10_000,
                  unit_price_fen=1000, amount_fen=10_000),
        ClaimItem(item_code="T1", item_name="scan", category=ItemCategory.TREATMENT,
                  catalogue_class=CatalogueClass.B, quantity_milli=1000,
                  unit_price_fen=50_000, amount_fen=50_000),
    )  # fmt: skip
    claim = host.package(
        admission, items, visit_type=VisitType.OUTPATIENT, diagnoses=("I10",), discharged_at=at
    )
    await host.submit(claim)
    await eventually(lambda: host_office.by_id[claim.claim_id].state is ClaimState.SETTLED)
    settled = host_office.by_id[claim.claim_id]
    assert settled.review is not None
    # eligible 10,000 + 45,000 = 55,000; minus deductible 10,000 → 45,000 × 80% = 36,000
    assert settled.review.fund_fen == 36_000
    assert settled.review.personal_fen == 24_000
    assert [(k, f) for _, k, f in host_office.payments] == [("ADVANCE", 15_000), ("TOP_UP", 9_000)]
    await eventually(lambda: claim.claim_id in home_office.notices)
