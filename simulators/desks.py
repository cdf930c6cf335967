"""The people at a province gateway's HTTP API, as the simulators play them: an agency counter
that files persons, a hospital desk that admits and discharges, a reviewer who decides delayed
claims.

Each is a thin class over one :class:`httpx.AsyncClient` signed in as its role; the simulators
share one client per gateway and role (:class:`GatewayDesks`) among all the simulated persons
of that role, with as many connections as they keep requests in flight. The API's answers come
back as small frozen values; an answer the API does not give for the call is a
:class:`DeskError` naming the call, the status and the problem's detail (person ids travel in
request bodies only, and the gateway's problems never echo input values).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from adapters.backoffice import Person
from adapters.gateway.testing import TEST_TOKENS
from adapters.review_desk import ReviewClosed, UnknownReview
from bus.models import ClaimItem, FilingUpload, ItemAdjustment, SettlementMode, VisitType

TIMEOUT: Final = httpx.Timeout(30.0, pool=None)
"""Per request: 30 s to connect, send, read; no limit on the wait for a pooled connection
(the simulators bound what they keep in flight themselves, so a wait there is a queue)."""
KEEPALIVE_S: Final = 2.0
"""Idle pooled connections are kept this long: less than uvicorn's 5 s (its
``timeout_keep_alive``), so a request never goes out on a connection the server is closing."""


class DeskError(RuntimeError):
    """The gateway answered a call with a status its API does not give for it."""

    def __init__(self, call: str, status: int, detail: str) -> None:
        super().__init__(f"{call}: HTTP {status}: {detail}")
        self.call = call
        self.status = status
        self.detail = detail


def open_client(
    base_url: str,
    role: str,
    *,
    connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A client of the gateway at ``base_url`` signed in as ``role`` with its test token,
    keeping at most ``connections`` connections (all kept alive between requests)."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {TEST_TOKENS[role]}"},
        timeout=TIMEOUT,
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_S,
        ),
        transport=transport,
    )


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:300]
    return str(body)[:300]


def _expect(call: str, response: httpx.Response, *statuses: int) -> dict[str, Any]:
    if response.status_code not in statuses:
        raise DeskError(call, response.status_code, _detail(response))
    body: dict[str, Any] = response.json()
    return body


def _iso(at: dt.datetime | dt.date | None) -> str | None:
    return None if at is None else at.isoformat()


# --- the agency counter (home) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FilingState:
    """A filing as the agency's API shows it."""

    filing_id: str
    state: str
    """``SENT`` until the host's receipt of the latest upload, then ``REGISTERED``,
    ``UPDATED`` or ``REVOKED``."""
    sent: bool = False
    """This call sent an upload (202); False: the counter had it already (200)."""


class AgencyCounter:
    """A home agency's counter (role ``agency``): files persons to hosts, revokes filings."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def file(self, person: Person, filing: FilingUpload) -> FilingState:
        """Record ``person`` with ``filing`` and send it to the host (``POST /v1/filings``)."""
        body = {
            "filing_id": filing.filing_id,
            "person_id": person.person_id,
            "person_name": person.name,
            "insurance_type": person.insurance_type.value,
            "assistance_eligible": person.assistance_eligible,
            "home_region": filing.home_region,
            "host_region": filing.host_region,
            "reason": filing.reason.value,
            "channel": filing.channel.value,
            "valid_from": _iso(filing.valid_from),
            "valid_until": _iso(filing.valid_until),
            "referral_hospital": filing.referral_hospital,
            "filed_at": _iso(filing.filed_at),
        }
        response = await self.client.post("/v1/filings", json=body)
        got = _expect("file", response, 200, 202)
        return FilingState(str(got["filing_id"]), str(got["state"]), response.status_code == 202)

    async def revoke(self, filing_id: str) -> FilingState:
        """Revoke a filing and tell the host (``POST /v1/filings/{id}/revoke``); revoked
        before: nothing is sent."""
        response = await self.client.post(f"/v1/filings/{filing_id}/revoke")
        got = _expect("revoke", response, 200, 202)
        return FilingState(str(got["filing_id"]), str(got["state"]), response.status_code == 202)

    async def get(self, filing_id: str) -> FilingState | None:
        """A filing's state, or None if the agency has no such filing."""
        response = await self.client.get(f"/v1/filings/{filing_id}")
        if response.status_code == 404:
            return None
        got = _expect("filing", response, 200)
        return FilingState(str(got["filing_id"]), str(got["state"]))


# --- the hospital desk (host) ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Admitted:
    """The patient is admitted for direct settlement."""

    admission_id: str
    mode: SettlementMode


@dataclass(frozen=True, slots=True)
class Refused:
    """Admission refused: the contract's code (the home was told with an ErrorReport)."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class ClaimSent:
    """A discharge's claim, packaged and sent to the home."""

    claim_id: str
    mode: SettlementMode
    total_fen: int
    advance_fen: int
    repeated: bool
    """The admission was discharged before: this is that claim, nothing was sent again."""


class HospitalDesk:
    """A host hospital's admission and discharge desk (role ``hospital``)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def admit(
        self, person_id: str, home_region: str, hospital_code: str, at: dt.datetime
    ) -> Admitted | Refused:
        """Admit a patient (``POST /v1/admissions``)."""
        body = {
            "person_id": person_id,
            "home_region": home_region,
            "hospital_code": hospital_code,
            "admitted_at": _iso(at),
        }
        got = _expect("admit", await self.client.post("/v1/admissions", json=body), 200, 201)
        if got["outcome"] == "ADMITTED":
            return Admitted(str(got["admission_id"]), SettlementMode(got["mode"]))
        return Refused(str(got["code"]), str(got.get("text") or ""))

    async def discharge(
        self,
        admission_id: str,
        *,
        visit_type: VisitType,
        diagnoses: Sequence[str],
        items: Sequence[ClaimItem],
        at: dt.datetime,
    ) -> ClaimSent:
        """Send the bill at discharge (``POST /v1/admissions/{id}/discharge``): codes,
        quantities and prices; the gateway prices each line and packages the claim."""
        body = {
            "visit_type": visit_type.value,
            "diagnoses": list(diagnoses),
            "items": [
                {
                    "item_code": i.item_code,
                    "quantity_milli": i.quantity_milli,
                    "unit_price_fen": i.unit_price_fen,
                }
                for i in items
            ],
            "discharged_at": _iso(at),
        }
        response = await self.client.post(f"/v1/admissions/{admission_id}/discharge", json=body)
        got = _expect("discharge", response, 200, 201)
        return ClaimSent(
            claim_id=str(got["claim_id"]),
            mode=SettlementMode(got["mode"]),
            total_fen=int(got["total_fen"]),
            advance_fen=int(got["advance_fen"]),
            repeated=response.status_code == 200,
        )

    async def claim(self, claim_id: str) -> dict[str, Any]:
        """Where a claim stands (``GET /v1/claims/{id}``), as the API shows it."""
        return _expect("claim", await self.client.get(f"/v1/claims/{claim_id}"), 200)


# --- the review desk (home) ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OpenReview:
    """A line of a review desk's queue, as a reviewer sees it."""

    claim_id: str
    host: str
    """The host province that sent the claim."""
    person: str
    """The person's masked ID number."""
    total_fen: int


@dataclass(frozen=True, slots=True)
class ProposedItem:
    """One item code of a claim under review: billed, and what the rules propose to pay."""

    item_code: str
    amount_fen: int
    proposed_fen: int


class ReviewerClient:
    """A reviewer at a home's review desk (role ``reviewer``). A review decided already is
    :class:`~adapters.review_desk.ReviewClosed` (409), an unknown one
    :class:`~adapters.review_desk.UnknownReview` (404), as at the desk itself."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def open_reviews(self, limit: int) -> list[OpenReview]:
        """Open reviews, the earliest expected answer first (``GET /v1/reviews``)."""
        response = await self.client.get("/v1/reviews", params={"limit": limit})
        got = _expect("reviews", response, 200)
        return [
            OpenReview(str(r["claim_id"]), str(r["host"]), str(r["person"]), int(r["total_fen"]))
            for r in got["reviews"]
        ]

    async def count_open(self) -> int:
        """How many reviews wait."""
        got = _expect("reviews", await self.client.get("/v1/reviews", params={"limit": 1}), 200)
        return int(got["count_open"])

    async def proposed_items(self, claim_id: str) -> list[ProposedItem]:
        """The items of a review with their proposed amounts (``GET /v1/reviews/{id}``)."""
        response = await self.client.get(f"/v1/reviews/{claim_id}")
        if response.status_code == 404:
            raise UnknownReview(_detail(response))
        got = _expect("review", response, 200)
        return [
            ProposedItem(str(i["item_code"]), int(i["amount_fen"]), int(i["proposed_fen"]))
            for i in got["items"]
        ]

    async def approve(self, claim_id: str, reviewer: str) -> None:
        """Approve the rules' proposal."""
        await self._decide(claim_id, {"action": "approve", "reviewer": reviewer})

    async def adjust(
        self, claim_id: str, adjustments: Sequence[ItemAdjustment], reviewer: str
    ) -> None:
        """Set the approved amount of some items (reason code and note each)."""
        await self._decide(
            claim_id,
            {
                "action": "adjust",
                "reviewer": reviewer,
                "adjustments": [a.model_dump(mode="json") for a in adjustments],
            },
        )

    async def reject(self, claim_id: str, reason: str, reviewer: str) -> None:
        """Reject the claim: the patient pays in full."""
        await self._decide(claim_id, {"action": "reject", "reviewer": reviewer, "reason": reason})

    async def _decide(self, claim_id: str, body: Mapping[str, object]) -> None:
        response = await self.client.post(f"/v1/reviews/{claim_id}/decision", json=body)
        if response.status_code == 409:
            raise ReviewClosed(_detail(response))
        if response.status_code == 404:
            raise UnknownReview(_detail(response))
        _expect("decision", response, 200, 201)


# --- one gateway's desks ---------------------------------------------------------------------
class GatewayDesks:
    """The clients of one gateway, one per role, each shared by every simulated person of
    that role: ``connections`` maps each role (agency, hospital, reviewer) to its most
    connections at once."""

    def __init__(
        self,
        base_url: str,
        connections: Mapping[str, int],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._clients = {
            role: open_client(base_url, role, connections=n, transport=transport)
            for role, n in connections.items()
        }
        self.agency = AgencyCounter(self._clients["agency"])
        self.hospital = HospitalDesk(self._clients["hospital"])
        self.reviewer = ReviewerClient(self._clients["reviewer"])

    async def aclose(self) -> None:
        """Close every client (their connections). Idempotent."""
        for client in self._clients.values():
            await client.aclose()
