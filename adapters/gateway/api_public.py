"""The five public queries of the national filing site (国家异地就医备案查询), for this province.

No token is needed; a token, when sent, must be valid (else 401), and a valid token of any
role shows ID numbers and names unmasked. Person ids travel in request bodies, never in URLs.

- ``GET /v1/public/hospitals`` (异地定点医疗机构查询): designated hospitals, by province, region
  or level.
- ``POST /v1/public/filing-status`` (参保人登记备案情况查询): a person's filings known here: the
  ones this province filed as home (with the host's receipt) and the one registered here as
  host.
- ``GET /v1/public/agencies`` (异地就医经办机构查询): agencies and their contacts.
- ``POST /v1/public/costs`` (跨省异地就医费用查询): a person's cross-province costs known here:
  as home, the reviews of their claims and the settlements; as host, their claims.
- ``GET /v1/public/regions`` (统筹区开通信息查询): which home regions settle directly with which
  host provinces, in which mode, at which hospitals.

Queries that name a province or region the directory lacks are 404; a person with nothing
known here is 404.

Beside them, ``GET /asyncapi.json`` serves the wire contract as an AsyncAPI 3.0.0 document
(:mod:`schemas.asyncapi`, the same as ``docs/asyncapi.json``), for the tools of a province
that joins the bus.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from adapters.backoffice import HostClaim, PersonReview
from adapters.directory import ALL_HOSPITALS, province_of
from adapters.gateway.api_agency import CHINA_TIME, FilingState, ReceiptOut, filing_state
from adapters.gateway.api_agency import receipt_out as _receipt
from adapters.gateway.api_hospital import PERSON_ID_PATTERN
from adapters.gateway.app import GatewayContext, context
from adapters.gateway.auth import Caller, caller
from adapters.gateway.problems import PROBLEM_RESPONSES, In, not_found
from adapters.home import filing_covers
from bus.logs import mask_id, mask_name
from bus.models import (
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ReviewDecision,
    SettlementMode,
    VisitType,
    yuan,
)
from schemas.asyncapi import document_json

router = APIRouter(
    prefix="/v1/public",
    tags=["public queries"],
    responses={k: v for k, v in PROBLEM_RESPONSES.items() if k in (401, 404, 422)},
)

HOST_STATE: Final[dict[FilingAction, FilingState]] = {
    FilingAction.CREATE: "REGISTERED",
    FilingAction.UPDATE: "UPDATED",
    FilingAction.REVOKE: "REVOKED",
}
"""A filing's state at its host, by the latest upload registered there."""

ProvinceQuery = Annotated[str | None, Query(pattern=r"^\d{2}0000$", description="province code")]
RegionQuery = Annotated[str | None, Query(pattern=r"^\d{6}$", description="region code")]


class _In(In):
    """A request body of this module (see :class:`adapters.gateway.problems.In`)."""


class PersonIn(_In):
    """Whose filings."""

    person_id: str = Field(pattern=PERSON_ID_PATTERN, description="resident ID number")


class CostsIn(_In):
    """Whose costs, of which year (of discharge; all years when left out)."""

    person_id: str = Field(pattern=PERSON_ID_PATTERN, description="resident ID number")
    year: int | None = Field(default=None, ge=2000, le=2100)


# --- hospitals ---------------------------------------------------------------------------------
class HospitalOut(BaseModel):
    """A cross-province designated hospital (跨省定点医疗机构)."""

    code: str
    name: str
    level: int
    region: str
    region_name: str
    province: str
    province_name: str


class HospitalsOut(BaseModel):
    hospitals: list[HospitalOut]


def _place(ctx: GatewayContext, code: str) -> str:
    """The name of a region, or of a province (for a province code)."""
    region = ctx.directory.region(code)
    return region.name if region is not None else ctx.directory.province_name(code)


def _known_province(ctx: GatewayContext, code: str) -> None:
    if code not in ctx.directory.provinces():
        raise not_found(f"no province {code} in the directory")


def _known_region(ctx: GatewayContext, code: str) -> None:
    if ctx.directory.region(code) is None:
        raise not_found(f"no region {code} in the directory")


@router.get("/hospitals", response_model=HospitalsOut)
async def hospitals(
    province: ProvinceQuery = None,
    region: RegionQuery = None,
    level: Annotated[int | None, Query(ge=1, le=3, description="hospital grade")] = None,
    ctx: GatewayContext = Depends(context),
    _: Caller = Depends(caller),
) -> HospitalsOut:
    """Designated hospitals elsewhere (异地定点医疗机构查询), in directory order."""
    if province is not None:
        _known_province(ctx, province)
    if region is not None:
        _known_region(ctx, region)
    found = [
        h
        for h in ctx.directory.data.hospitals
        if (province is None or h.province == province)
        and (region is None or h.region == region)
        and (level is None or h.level == level)
    ]
    return HospitalsOut(
        hospitals=[
            HospitalOut(
                code=h.code,
                name=h.name,
                level=h.level,
                region=h.region,
                region_name=_place(ctx, h.region),
                province=h.province,
                province_name=ctx.directory.province_name(h.province),
            )
            for h in found
        ]
    )


# --- filing status -----------------------------------------------------------------------------
class PublicFilingOut(BaseModel):
    """A filing known here: ``HOME`` (filed by this province) or ``HOST`` (registered here)."""

    side: Literal["HOME", "HOST"]
    filing_id: str
    action: FilingAction
    """The latest upload."""
    insurance_type: InsuranceType
    home_region: str
    home_region_name: str
    host_region: str
    host_region_name: str
    host: str
    host_name: str
    valid_from: dt.date
    valid_until: dt.date | None
    reason: FilingReason
    channel: FilingChannel
    state: FilingState
    """HOME: ``SENT`` until the host's receipt, then its status; HOST: as registered."""
    receipt: ReceiptOut | None
    """HOME only: the host's receipt of the latest upload."""
    active_today: bool
    """Not revoked and valid today (China time)."""


class FilingStatusOut(BaseModel):
    """A person's filings known at this gateway."""

    person_id: str
    """Masked unless the caller may see personal data."""
    person_name: str
    """Masked unless the caller may see personal data."""
    filings: list[PublicFilingOut]


def _today() -> dt.date:
    return dt.datetime.now(CHINA_TIME).date()


def _public_filing(
    ctx: GatewayContext,
    side: Literal["HOME", "HOST"],
    f: FilingUpload,
    state: FilingState,
    receipt: ReceiptOut | None,
) -> PublicFilingOut:
    host = province_of(f.host_region)
    return PublicFilingOut(
        side=side,
        filing_id=f.filing_id,
        action=f.action,
        insurance_type=f.insurance_type,
        home_region=f.home_region,
        home_region_name=_place(ctx, f.home_region),
        host_region=f.host_region,
        host_region_name=_place(ctx, f.host_region),
        host=host,
        host_name=ctx.directory.province_name(host),
        valid_from=f.valid_from,
        valid_until=f.valid_until,
        reason=f.reason,
        channel=f.channel,
        state=state,
        receipt=receipt,
        active_today=filing_covers(f, f.host_region, _today()) is None,
    )


def _shown_id(who: Caller, person_id: str) -> str:
    return person_id if who.sees_personal_data else mask_id(person_id)


def _shown_name(who: Caller, name: str) -> str:
    return name if who.sees_personal_data else mask_name(name)


@router.post("/filing-status", response_model=FilingStatusOut)
async def filing_status(
    body: PersonIn,
    ctx: GatewayContext = Depends(context),
    who: Caller = Depends(caller),
) -> FilingStatusOut:
    """A person's filings (参保人登记备案情况查询): those this province filed as their home,
    with the host's receipt, and the one registered here as host. 404 when none."""
    backoffice = ctx.system.backoffice
    made = backoffice.home_filings_of(body.person_id)
    filings = [_public_filing(ctx, "HOME", s.filing, filing_state(s), _receipt(s)) for s in made]
    names = [s.filing.person_name for s in made]
    registered = backoffice.filing_for(body.person_id)
    if registered is not None:
        filings.append(_public_filing(ctx, "HOST", registered, HOST_STATE[registered.action], None))
        names.append(registered.person_name)
    if not filings:
        raise not_found(f"no filing of this person at {ctx.province}")
    return FilingStatusOut(
        person_id=_shown_id(who, body.person_id),
        person_name=_shown_name(who, names[-1]),
        filings=filings,
    )


# --- agencies ----------------------------------------------------------------------------------
class AgencyOut(BaseModel):
    """An agency (经办机构) and how to reach it."""

    code: str
    name: str
    region: str
    region_name: str
    province: str
    province_name: str
    phone: str
    address: str
    hours: str | None


class AgenciesOut(BaseModel):
    agencies: list[AgencyOut]


@router.get("/agencies", response_model=AgenciesOut)
async def agencies(
    province: ProvinceQuery = None,
    ctx: GatewayContext = Depends(context),
    _: Caller = Depends(caller),
) -> AgenciesOut:
    """Agencies and their contacts (异地就医经办机构查询), in directory order."""
    if province is not None:
        _known_province(ctx, province)
    return AgenciesOut(
        agencies=[
            AgencyOut(
                code=a.code,
                name=a.name,
                region=a.region,
                region_name=_place(ctx, a.region),
                province=a.province,
                province_name=ctx.directory.province_name(a.province),
                phone=a.phone,
                address=a.address,
                hours=a.hours,
            )
            for a in ctx.directory.agencies(province)
        ]
    )


# --- costs -------------------------------------------------------------------------------------
class ReviewedCostOut(BaseModel):
    """A claim this province reviewed as the person's home (the one-bill split)."""

    claim_id: str
    host: str | None
    host_name: str | None
    year: int | None
    decision: ReviewDecision
    reviewed_at: dt.datetime
    total_fen: int
    fund_fen: int
    """Basic insurance."""
    critical_illness_fen: int
    assistance_fen: int
    personal_fen: int
    total_yuan: str
    fund_yuan: str
    personal_yuan: str
    settled_at: dt.datetime | None
    """When the host settled with the patient (null: not yet)."""


class HomeTotalsOut(BaseModel):
    claims: int
    total_fen: int
    fund_fen: int
    critical_illness_fen: int
    assistance_fen: int
    personal_fen: int
    total_yuan: str
    fund_yuan: str
    personal_yuan: str


class HomeCostsOut(BaseModel):
    """Costs known to this province as the person's home."""

    claims: list[ReviewedCostOut]
    totals: HomeTotalsOut


class HostCostOut(BaseModel):
    """A claim of the person's treatment here (this province as host)."""

    claim_id: str
    home_region: str
    home_region_name: str
    hospital_code: str
    hospital_name: str | None
    mode: SettlementMode
    visit_type: VisitType
    discharged_at: dt.datetime
    state: str
    total_fen: int
    advance_fen: int
    """What the patient paid before review."""
    fund_fen: int | None
    """Basic insurance, once reviewed."""
    personal_fen: int | None
    """The patient's share, once reviewed."""
    total_yuan: str
    advance_yuan: str


class HostTotalsOut(BaseModel):
    claims: int
    total_fen: int
    advance_fen: int
    total_yuan: str
    advance_yuan: str


class HostCostsOut(BaseModel):
    """Costs known to this province as the host of the person's treatment."""

    claims: list[HostCostOut]
    totals: HostTotalsOut


class CostsOut(BaseModel):
    """A person's cross-province costs known at this gateway (跨省异地就医费用查询)."""

    person_id: str
    """Masked unless the caller may see personal data."""
    year: int | None
    as_home: HomeCostsOut | None
    as_host: HostCostsOut | None


def _reviewed(ctx: GatewayContext, r: PersonReview) -> ReviewedCostOut:
    res = r.result
    return ReviewedCostOut(
        claim_id=r.claim_id,
        host=r.host,
        host_name=None if r.host is None else ctx.directory.province_name(r.host),
        year=r.year,
        decision=res.decision,
        reviewed_at=res.reviewed_at,
        total_fen=res.total_fen,
        fund_fen=res.fund_fen,
        critical_illness_fen=res.critical_illness_fen,
        assistance_fen=res.assistance_fen,
        personal_fen=res.personal_fen,
        total_yuan=yuan(res.total_fen),
        fund_yuan=yuan(res.fund_fen),
        personal_yuan=yuan(res.personal_fen),
        settled_at=None if r.settlement is None else r.settlement.settled_at,
    )


def _home_costs(ctx: GatewayContext, reviews: Iterable[PersonReview]) -> HomeCostsOut | None:
    claims = [_reviewed(ctx, r) for r in reviews]
    if not claims:
        return None
    total = sum(c.total_fen for c in claims)
    fund = sum(c.fund_fen for c in claims)
    personal = sum(c.personal_fen for c in claims)
    return HomeCostsOut(
        claims=claims,
        totals=HomeTotalsOut(
            claims=len(claims),
            total_fen=total,
            fund_fen=fund,
            critical_illness_fen=sum(c.critical_illness_fen for c in claims),
            assistance_fen=sum(c.assistance_fen for c in claims),
            personal_fen=personal,
            total_yuan=yuan(total),
            fund_yuan=yuan(fund),
            personal_yuan=yuan(personal),
        ),
    )


def _host_cost(ctx: GatewayContext, h: HostClaim) -> HostCostOut:
    c = h.claim
    hospital = ctx.directory.hospital(c.hospital_code)
    return HostCostOut(
        claim_id=c.claim_id,
        home_region=c.home_region,
        home_region_name=_place(ctx, c.home_region),
        hospital_code=c.hospital_code,
        hospital_name=None if hospital is None else hospital.name,
        mode=c.settlement_mode,
        visit_type=c.visit_type,
        discharged_at=c.discharged_at,
        state=h.state.name,
        total_fen=c.total_fen,
        advance_fen=h.advance_collected_fen,
        fund_fen=None if h.review is None else h.review.fund_fen,
        personal_fen=None if h.review is None else h.review.personal_fen,
        total_yuan=yuan(c.total_fen),
        advance_yuan=yuan(h.advance_collected_fen),
    )


def _host_costs(ctx: GatewayContext, claims: Iterable[HostClaim]) -> HostCostsOut | None:
    shown = [_host_cost(ctx, h) for h in claims]
    if not shown:
        return None
    total = sum(c.total_fen for c in shown)
    advance = sum(c.advance_fen for c in shown)
    return HostCostsOut(
        claims=shown,
        totals=HostTotalsOut(
            claims=len(shown),
            total_fen=total,
            advance_fen=advance,
            total_yuan=yuan(total),
            advance_yuan=yuan(advance),
        ),
    )


@router.post("/costs", response_model=CostsOut)
async def costs(
    body: CostsIn,
    ctx: GatewayContext = Depends(context),
    who: Caller = Depends(caller),
) -> CostsOut:
    """A person's cross-province costs (跨省异地就医费用查询) known here, of one year of
    discharge or all: as home, each reviewed claim's split and settlement; as host, each
    claim's total, advance and state. 404 when nothing is known."""
    backoffice = ctx.system.backoffice
    as_home = _home_costs(ctx, backoffice.reviews_of(body.person_id, body.year))
    as_host = _host_costs(
        ctx,
        (
            h
            for h in backoffice.claims_of(body.person_id)
            if body.year is None or h.claim.discharged_at.year == body.year
        ),
    )
    if as_home is None and as_host is None:
        raise not_found(f"no cross-province costs of this person at {ctx.province}")
    return CostsOut(
        person_id=_shown_id(who, body.person_id), year=body.year, as_home=as_home, as_host=as_host
    )


# --- connected regions -------------------------------------------------------------------------
class ConnectionOut(BaseModel):
    """A home region connected to a host province (统筹区开通信息) by an agreement."""

    home_region: str
    home_region_name: str
    home: str
    home_name: str
    host: str
    host_name: str
    mode: SettlementMode
    hospitals: Literal["all"] | list[str]
    """``all`` designated hospitals of the host, or the codes allowed."""
    hospital_count: int
    """How many hospitals that is."""


class ConnectionsOut(BaseModel):
    regions: list[ConnectionOut]


@router.get("/regions", response_model=ConnectionsOut)
async def regions(
    home: Annotated[
        str | None, Query(pattern=r"^\d{6}$", description="home region, or a province")
    ] = None,
    host: Annotated[
        str | None, Query(pattern=r"^\d{6}$", description="host province (or a region of it)")
    ] = None,
    ctx: GatewayContext = Depends(context),
    _: Caller = Depends(caller),
) -> ConnectionsOut:
    """Which home regions settle directly with which host provinces (统筹区开通信息查询):
    mode and allowed hospitals. ``home`` is a region, or a province for all its regions."""
    directory = ctx.directory
    whole_province = home is not None and home == province_of(home)
    if home is not None:
        (_known_province if whole_province else _known_region)(ctx, home)
    if host is not None:
        _known_province(ctx, province_of(host))
    found = [
        a
        for a in directory.agreements()
        if (home is None or (province_of(a.home) if whole_province else a.home) == home)
        and (host is None or a.host == province_of(host))
    ]
    return ConnectionsOut(
        regions=[
            ConnectionOut(
                home_region=a.home,
                home_region_name=_place(ctx, a.home),
                home=province_of(a.home),
                home_name=directory.province_name(a.home),
                host=a.host,
                host_name=directory.province_name(a.host),
                mode=a.mode,
                hospitals=ALL_HOSPITALS if a.hospitals == ALL_HOSPITALS else list(a.hospitals),
                hospital_count=len(directory.allowed_hospitals(a.home, a.host)),
            )
            for a in found
        ]
    )


# --- the wire contract -------------------------------------------------------------------------
contract_router = APIRouter(
    tags=["public queries"],
    responses={k: v for k, v in PROBLEM_RESPONSES.items() if k == 401},
)


@contract_router.get(
    "/asyncapi.json", response_class=JSONResponse, summary="The wire contract (AsyncAPI 3.0.0)"
)
async def asyncapi(_: Caller = Depends(caller)) -> Response:
    """The wire contract as an AsyncAPI 3.0.0 document: the topics, headers, record key and
    Avro schemas a province system needs to join the bus (``xsettle schemas asyncapi``)."""
    return Response(content=document_json(), media_type="application/json")


def setup(app: FastAPI, ctx: GatewayContext) -> None:
    """Serve ``/asyncapi.json`` at the root, outside the ``/v1/public`` prefix, where tools
    look for it."""
    app.include_router(contract_router)
