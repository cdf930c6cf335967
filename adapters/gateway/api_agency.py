"""The agency counter (home side, 参保地经办机构): file persons to hosts, update and revoke.

- ``POST /v1/filings`` (agency): file a person to a host province or city (先备案). The person
  is enrolled (or their data updated) and the filing recorded and uploaded in one step; 202
  once the broker has the upload. The same ``filing_id`` again with the same content is 200
  with the filing as it stands and sends nothing; with other content it is 409.
- ``PUT /v1/filings/{filing_id}`` (agency): change the destination (inside the same host
  province: another province is a new filing), the end of validity, the reason or the referral
  hospital (备案变更): an UPDATE upload, 202; 409 once revoked.
- ``POST /v1/filings/{filing_id}/revoke`` (agency): a REVOKE upload, 202; again: 200, nothing
  sent.
- ``GET /v1/filings/{filing_id}`` (agency, ops): the filing as it stands: ``SENT`` until the
  host's receipt of the latest upload comes, then the receipt's status.

A filing names a province or a city of another province, never a hospital (the contract), and
only one whose home region has an agreement with that province: anything else is a 422 naming
the field, and nothing is stored or sent.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated, Any, Final, Literal, cast

import structlog
from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field, StringConstraints, field_validator

from adapters.backoffice import HomeFiling, Person
from adapters.directory import province_of
from adapters.gateway.api_hospital import PERSON_ID_PATTERN
from adapters.gateway.app import GatewayContext, context
from adapters.gateway.auth import require
from adapters.gateway.problems import PROBLEM_RESPONSES, In, Problem, bad_field, not_found
from bus.logs import mask_name
from bus.models import (
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingStatus,
    FilingUpload,
    InsuranceType,
    now,
)

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1", tags=["agency"], responses=PROBLEM_RESPONSES)

FILING_ID_PATTERN: Final = r"^F-\d{6}-[A-Za-z0-9-]{1,60}$"
"""A filing id: ``F-``, the 6-digit code of the filing's home region (or province), ``-``, a
local part."""
HOSPITAL_CODE_PATTERN: Final = r"^[A-Za-z0-9_-]{1,32}$"
CHINA_TIME: Final = dt.timezone(dt.timedelta(hours=8), "CST")
"""The day in a generated filing id is the day in China Standard Time."""
SENT: Final = "SENT"
"""A filing's state until the host's receipt of its latest upload comes."""

FilingId = Annotated[str, Path(pattern=FILING_ID_PATTERN, max_length=69)]
RegionField = Annotated[str, Field(pattern=r"^\d{6}$")]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2026-05-02T09:30:00+08:00")
    return value


class _In(In):
    """A request body of this module (see :class:`adapters.gateway.problems.In`)."""


class FilingIn(_In):
    """A filing as the counter takes it (any channel)."""

    filing_id: str | None = Field(
        default=None,
        pattern=FILING_ID_PATTERN,
        max_length=69,
        description="default: F-<home_region>-<yyyymmdd>-<6 hex>; given: F-<a code of this "
        "province>-…; the same id again is idempotent",
    )
    person_id: str = Field(pattern=PERSON_ID_PATTERN, description="resident ID number")
    person_name: Name
    insurance_type: InsuranceType
    assistance_eligible: bool = Field(default=False, description="eligible for 医疗救助")
    home_region: RegionField = Field(description="insured region (参保地), of this province")
    host_region: RegionField = Field(
        description="destination: a province or city of another province (never a hospital)"
    )
    reason: FilingReason
    channel: FilingChannel = FilingChannel.COUNTER
    valid_from: dt.date
    valid_until: dt.date | None = Field(default=None, description="none: open-ended")
    referral_hospital: str | None = Field(
        default=None, pattern=HOSPITAL_CODE_PATTERN, description="a designated hospital"
    )
    filed_at: dt.datetime | None = Field(default=None, description="default: now")

    _check_at = field_validator("filed_at")(_aware)


class FilingUpdateIn(_In):
    """What an update changes; a field left out keeps its value (``null`` clears
    ``valid_until`` or ``referral_hospital``)."""

    host_region: RegionField | None = None
    valid_until: dt.date | None = None
    reason: FilingReason | None = None
    referral_hospital: str | None = Field(default=None, pattern=HOSPITAL_CODE_PATTERN)


class ReceiptOut(BaseModel):
    """The host's receipt of the latest upload."""

    status: FilingStatus
    received_at: dt.datetime | None
    """When the home recorded it (null for receipts recorded before the time was kept)."""


FilingState = Literal["SENT", "REGISTERED", "UPDATED", "REVOKED"]


class FilingOut(BaseModel):
    """A filing as it stands at the home agency."""

    filing_id: str
    action: FilingAction
    """The latest upload."""
    person_id: str
    person_name: str
    """Masked (family name only), whoever asks."""
    insurance_type: InsuranceType
    home_region: str
    host_region: str
    host: str
    """The host province."""
    host_name: str
    valid_from: dt.date
    valid_until: dt.date | None
    reason: FilingReason
    channel: FilingChannel
    referral_hospital: str | None
    filed_at: dt.datetime
    """When the latest upload was made."""
    state: FilingState
    receipt: ReceiptOut | None


def filing_state(stored: HomeFiling) -> FilingState:
    """``SENT`` until the host's receipt of the latest upload comes, then its status."""
    receipt = stored.receipt
    if receipt is None or receipt is FilingStatus.UNKNOWN:  # (a receipt never says UNKNOWN)
        return SENT
    return cast(FilingState, receipt.value)


def receipt_out(stored: HomeFiling) -> ReceiptOut | None:
    """The receipt part of a stored filing."""
    if stored.receipt is None:
        return None
    at_ms = stored.receipt_at_ms
    at = None if at_ms is None else dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC)
    return ReceiptOut(status=stored.receipt, received_at=at)


def filing_out(stored: HomeFiling, ctx: GatewayContext) -> FilingOut:
    """The API shape of a filing this agency made."""
    f = stored.filing
    host = province_of(f.host_region)
    return FilingOut(
        filing_id=f.filing_id,
        action=f.action,
        person_id=f.person_id,
        person_name=mask_name(f.person_name),
        insurance_type=f.insurance_type,
        home_region=f.home_region,
        host_region=f.host_region,
        host=host,
        host_name=ctx.directory.province_name(host),
        valid_from=f.valid_from,
        valid_until=f.valid_until,
        reason=f.reason,
        channel=f.channel,
        referral_hospital=f.referral_hospital,
        filed_at=f.filed_at,
        state=filing_state(stored),
        receipt=receipt_out(stored),
    )


# --- checks (each a 422 naming the field) --------------------------------------------------------
def _check_home_region(ctx: GatewayContext, home_region: str) -> None:
    region = ctx.directory.region(home_region)
    if region is None:
        raise bad_field("home_region", f"unknown region {home_region}")
    if region.province != ctx.province:
        raise bad_field("home_region", f"{home_region} is not a region of {ctx.province}")


def _check_host_region(ctx: GatewayContext, home_region: str, host_region: str) -> str:
    """The host province of a valid destination."""
    directory = ctx.directory
    host = province_of(host_region)
    if host == ctx.province:
        raise bad_field(
            "host_region", f"{host_region} is in {ctx.province} itself: not cross-province"
        )
    known = directory.region(host_region) is not None or (
        host_region == host and host in directory.provinces()
    )
    if not known:
        raise bad_field("host_region", f"unknown region {host_region}")
    if directory.agreement(home_region, host) is None:
        raise bad_field(
            "host_region",
            f"region {home_region} has no agreement with {host} "
            f"({directory.province_name(host)}): 统筹区未开通",
        )
    return host


def _check_referral(ctx: GatewayContext, code: str | None, host: str) -> None:
    if code is None:
        return
    hospital = ctx.directory.hospital(code)
    if hospital is None or hospital.province != host:
        raise bad_field("referral_hospital", f"{code} is not a designated hospital of {host}")


def _check_validity(valid_from: dt.date, valid_until: dt.date | None) -> None:
    if valid_until is not None and valid_until < valid_from:
        raise bad_field("valid_until", f"before valid_from ({valid_from.isoformat()})")


def _check_filing_id(ctx: GatewayContext, filing_id: str) -> None:
    if province_of(filing_id[2:8]) != ctx.province:
        raise bad_field(
            "filing_id", f"must start with F-<a region or province code of {ctx.province}>-"
        )


def _new_filing_id(home_region: str, filed_at: dt.datetime) -> str:
    day = filed_at.astimezone(CHINA_TIME).strftime("%Y%m%d")
    return f"F-{home_region}-{day}-{secrets.token_hex(3).upper()}"


def _upload(body: FilingIn, filing_id: str, filed_at: dt.datetime) -> FilingUpload:
    return FilingUpload(
        filing_id=filing_id,
        action=FilingAction.CREATE,
        person_id=body.person_id,
        person_name=body.person_name,
        insurance_type=body.insurance_type,
        home_region=body.home_region,
        host_region=body.host_region,
        reason=body.reason,
        channel=body.channel,
        valid_from=body.valid_from,
        valid_until=body.valid_until,
        referral_hospital=body.referral_hospital,
        filed_at=filed_at,
    )


def _filed_before(ctx: GatewayContext, body: FilingIn, stored: HomeFiling) -> FilingOut:
    """A POST of a filing id that exists: the filing as it stands if the body is the one
    first filed (``filed_at`` compared only when given), else 409."""
    filing_id = stored.filing.filing_id
    original = next(
        (f for f in ctx.system.backoffice.filings_of(body.person_id) if f.filing_id == filing_id),
        None,
    )
    if original is None or _upload(body, filing_id, body.filed_at or original.filed_at) != original:
        raise Problem(409, "conflict", f"filing {filing_id} exists with other content")
    return filing_out(stored, ctx)


# --- routes ------------------------------------------------------------------------------------
@router.post(
    "/filings",
    response_model=FilingOut,
    status_code=202,
    responses={200: {"model": FilingOut, "description": "filed before: as it stands"}},
)
async def create_filing(
    body: FilingIn,
    response: Response,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("agency")),
) -> FilingOut:
    """File a person to a host (先备案): enrol the person, record the filing and upload it to
    the host in one step; 202 once the broker has it. The host's receipt turns ``state`` from
    ``SENT`` to ``REGISTERED``."""
    _check_home_region(ctx, body.home_region)
    host = _check_host_region(ctx, body.home_region, body.host_region)
    _check_validity(body.valid_from, body.valid_until)
    _check_referral(ctx, body.referral_hospital, host)
    if body.filing_id is not None:
        _check_filing_id(ctx, body.filing_id)
    filed_at = body.filed_at or now()
    backoffice = ctx.system.backoffice
    node = ctx.system.node
    async with node.step() as step:  # the check and the filing in one step: no double filing
        if body.filing_id is None:
            filing_id = _new_filing_id(body.home_region, filed_at)
            while backoffice.home_filing(filing_id) is not None:
                filing_id = _new_filing_id(body.home_region, filed_at)
        else:
            filing_id = body.filing_id
            existing = backoffice.home_filing(filing_id)
            if existing is not None:
                response.status_code = 200
                return _filed_before(ctx, body, existing)
        filing = _upload(body, filing_id, filed_at)
        person = Person(
            person_id=body.person_id,
            name=body.person_name,
            insurance_type=body.insurance_type,
            home_region=body.home_region,
            assistance_eligible=body.assistance_eligible,
        )
        await ctx.system.home.file(filing, person=person)
    await node.delivered(step)
    log.info("filing_sent", filing_id=filing_id, action="CREATE", host=host)
    return _current(ctx, filing_id)


@router.get("/filings/{filing_id}", response_model=FilingOut)
async def get_filing(
    filing_id: FilingId,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("agency", "ops")),
) -> FilingOut:
    """A filing as it stands: its latest upload, and the host's receipt once come."""
    return filing_out(_existing(ctx, filing_id), ctx)


@router.put("/filings/{filing_id}", response_model=FilingOut, status_code=202)
async def update_filing(
    filing_id: FilingId,
    body: FilingUpdateIn,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("agency")),
) -> FilingOut:
    """Change a filing (备案变更): destination (a province or city of the same host province),
    end of validity, reason, referral hospital; an UPDATE upload to the host, 202 once the
    broker has it. 409 once revoked."""
    given = body.model_fields_set
    if not given:
        raise bad_field("body", "nothing to change")
    for required in ("host_region", "reason"):
        if required in given and getattr(body, required) is None:
            raise bad_field(required, "may not be null")
    node = ctx.system.node
    async with node.step() as step:
        current = _existing(ctx, filing_id)
        if current.filing.action is FilingAction.REVOKE:
            raise Problem(409, "conflict", f"filing {filing_id} is revoked")
        old = current.filing
        changes: dict[str, Any] = body.model_dump(include=given)
        merged = {**old.model_dump(), **changes}
        host = _check_host_region(ctx, old.home_region, merged["host_region"])
        if host != province_of(old.host_region):
            raise bad_field(
                "host_region",
                f"moves the filing from {province_of(old.host_region)} to {host}: revoke it "
                "and file anew",
            )
        _check_validity(old.valid_from, merged["valid_until"])
        _check_referral(ctx, merged["referral_hospital"], host)
        filing = FilingUpload.model_validate(
            {**merged, "action": FilingAction.UPDATE, "filed_at": now()}
        )
        await ctx.system.home.file(filing)
    await node.delivered(step)
    log.info("filing_sent", filing_id=filing_id, action="UPDATE", host=host)
    return _current(ctx, filing_id)


@router.post(
    "/filings/{filing_id}/revoke",
    response_model=FilingOut,
    status_code=202,
    responses={200: {"model": FilingOut, "description": "revoked before: nothing sent"}},
)
async def revoke_filing(
    filing_id: FilingId,
    response: Response,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("agency")),
) -> FilingOut:
    """Revoke a filing (备案撤销): a REVOKE upload to the host, 202 once the broker has it;
    a filing revoked before is 200 and nothing is sent."""
    node = ctx.system.node
    async with node.step() as step:
        current = _existing(ctx, filing_id)
        if current.filing.action is FilingAction.REVOKE:
            response.status_code = 200
            return filing_out(current, ctx)
        filing = current.filing.model_copy(
            update={"action": FilingAction.REVOKE, "filed_at": now()}
        )
        await ctx.system.home.file(filing)
    await node.delivered(step)
    log.info("filing_sent", filing_id=filing_id, action="REVOKE")
    return _current(ctx, filing_id)


def _existing(ctx: GatewayContext, filing_id: str) -> HomeFiling:
    stored = ctx.system.backoffice.home_filing(filing_id)
    if stored is None:
        raise not_found(f"no filing {filing_id} at {ctx.province}")
    return stored


def _current(ctx: GatewayContext, filing_id: str) -> FilingOut:
    stored = ctx.system.backoffice.home_filing(filing_id)
    assert stored is not None
    return filing_out(stored, ctx)
