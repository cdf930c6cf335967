"""Settlement rules of the home agency as pure functions: amount checks, review, balance.

Host catalogue, home benefits (就医地目录，参保地待遇): each item is classed under the host
catalogue; the home's policy (deductible, ratio, annual cap, critical illness, assistance)
splits the bill into one-bill shares (一单结算).

Rounding rule (the only one): every fund share (basic fund, critical illness, assistance,
the eligible part of a class B item) is rounded DOWN to the fen; the patient's personal share
absorbs the remainder, so ``total = fund + critical_illness + assistance + personal`` exactly.
Ratios are integer per-mille (‰); money is integer fen.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Final, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bus.models import (
    CatalogueClass,
    ClaimItem,
    ClaimPackage,
    InsuranceType,
    ItemAdjustment,
    ReviewDecision,
    ReviewResult,
    SettlementMode,
    yuan,
)

PERMILLE: Final = 1000
"""Ratios are integers out of this (‰)."""

ROUNDING_RULE: Final = "fund shares round down to the fen; the personal share absorbs the rest"
"""The module's single rounding rule, stated once."""

MAX_ADVANCE_PERMILLE: Final = 250
"""Delayed settlement: the patient advances at most 25% of the total (seed 003)."""

REASON_B_SELF_SHARE: Final = "B_SELF_SHARE"
REASON_SELF_PAY: Final = "SELF_PAY"

Money = Annotated[int, Field(strict=True, ge=0)]
"""A non-negative amount in fen."""

Permille = Annotated[int, Field(strict=True, ge=0, le=PERMILLE)]
"""A ratio in ‰, 0..1000."""

HospitalLevel = Annotated[int, Field(strict=True, ge=1, le=3)]
"""Hospital grade 1..3 (一级, 二级, 三级)."""


def share(amount_fen: int, permille: int) -> int:
    """A fund's ``permille`` share of ``amount_fen``, rounded down to the fen."""
    return amount_fen * permille // PERMILLE


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PolicyTier(_Frozen):
    """Basic-fund benefits for one insurance type at one hospital level."""

    insurance_type: InsuranceType
    hospital_level: HospitalLevel
    deductible_fen: Money
    ratio_permille: Permille
    annual_cap_fen: Money


class CriticalIllness(_Frozen):
    """大病保险: pays a ratio of the year's eligible co-payment above a threshold, capped yearly.

    The eligible co-payment of a claim is ``eligible - deductible - fund``: the eligible amount
    above the deductible that the basic fund did not pay (its ratio gap and anything above the
    fund's cap). It accumulates over the calendar year (``YearUsage.copayment_fen``).
    """

    threshold_fen: Money
    ratio_permille: Permille
    annual_cap_fen: Money


class Assistance(_Frozen):
    """医疗救助: for eligible persons, a ratio of what is still personal, capped yearly."""

    ratio_permille: Permille
    annual_cap_fen: Money


class PolicyTierMissingError(LookupError):
    """The home policy has no tier for this insurance type and hospital level."""


class Policy(_Frozen):
    """A home region's benefit policy (参保地待遇)."""

    home_region: str = Field(pattern=r"^\d{6}$")
    tiers: tuple[PolicyTier, ...]
    class_b_self_permille: Permille
    critical_illness: CriticalIllness
    assistance: Assistance

    @model_validator(mode="after")
    def _unique_tiers(self) -> Self:
        seen: set[tuple[InsuranceType, int]] = set()
        for tier in self.tiers:
            key = (tier.insurance_type, tier.hospital_level)
            if key in seen:
                raise ValueError(f"two tiers for {key[0].value} at hospital level {key[1]}")
            seen.add(key)
        return self

    def tier(self, insurance_type: InsuranceType, hospital_level: int) -> PolicyTier:
        """The tier for this insurance type and hospital level; raises if the policy lacks it."""
        for tier in self.tiers:
            if tier.insurance_type == insurance_type and tier.hospital_level == hospital_level:
                return tier
        raise PolicyTierMissingError(
            f"policy of region {self.home_region} has no tier for "
            f"{InsuranceType(insurance_type).value} at hospital level {hospital_level}"
        )


class YearUsage(_Frozen):
    """What one person already used in this calendar year (caps and thresholds are yearly)."""

    fund_used_fen: Money = 0
    critical_illness_used_fen: Money = 0
    assistance_used_fen: Money = 0
    copayment_fen: Money = 0
    """Eligible co-payment accumulated this year, counted against the critical-illness threshold."""


class Review(_Frozen):
    """The home's review of one claim: the one-bill split and the person's updated usage."""

    decision: ReviewDecision
    total_fen: Money
    eligible_fen: Money
    deductible_fen: Money
    fund_fen: Money
    critical_illness_fen: Money
    assistance_fen: Money
    personal_fen: Money
    advance_fen: Money
    balance_fen: int
    copayment_fen: Money
    adjustments: tuple[ItemAdjustment, ...]
    new_usage: YearUsage


class BalanceKind(StrEnum):
    """What happens after review in delayed settlement (多退少补)."""

    TOP_UP = "TOP_UP"
    REFUND = "REFUND"
    NONE = "NONE"


class Balance(NamedTuple):
    """The patient tops up or is refunded ``amount_fen`` (never negative)."""

    kind: BalanceKind
    amount_fen: int


def settle_balance(personal_fen: int, advance_fen: int) -> Balance:
    """Top-up if the personal share exceeds the advance, refund if below, else nothing."""
    diff = personal_fen - advance_fen
    if diff > 0:
        return Balance(BalanceKind.TOP_UP, diff)
    if diff < 0:
        return Balance(BalanceKind.REFUND, -diff)
    return Balance(BalanceKind.NONE, 0)


def max_advance_fen(total_fen: int, permille: int = MAX_ADVANCE_PERMILLE) -> int:
    """The largest advance a delayed claim may collect, rounded down to the fen."""
    return share(total_fen, permille)


def item_amount_fen(quantity_milli: int, unit_price_fen: int) -> int:
    """An item's amount: ``quantity_milli * unit_price_fen / 1000`` rounded half up to the fen."""
    product = quantity_milli * unit_price_fen
    whole, rest = divmod(abs(product), PERMILLE)
    rounded = whole + (1 if 2 * rest >= PERMILLE else 0)
    return rounded if product >= 0 else -rounded


def _structure_problems(claim: ClaimPackage) -> list[str]:
    problems: list[str] = []
    for index, item in enumerate(claim.items):
        where = f"items[{index}] {item.item_code}"
        if item.quantity_milli < 0:
            problems.append(f"{where}: negative quantity_milli {item.quantity_milli}")
        if item.unit_price_fen < 0:
            problems.append(f"{where}: negative unit_price_fen {item.unit_price_fen}")
        if item.amount_fen < 0:
            problems.append(f"{where}: negative amount_fen {item.amount_fen}")
        expected = item_amount_fen(item.quantity_milli, item.unit_price_fen)
        if item.amount_fen != expected:
            problems.append(
                f"{where}: amount_fen {item.amount_fen} != quantity_milli {item.quantity_milli}"
                f" x unit_price_fen {item.unit_price_fen} / 1000 = {expected}"
            )
    items_sum = sum(item.amount_fen for item in claim.items)
    if claim.total_fen < 0:
        problems.append(f"negative total_fen {claim.total_fen}")
    if claim.total_fen != items_sum:
        problems.append(f"total_fen {claim.total_fen} != sum of item amounts {items_sum}")
    return problems


def check_amounts(
    claim: ClaimPackage, *, max_advance_permille: int = MAX_ADVANCE_PERMILLE
) -> list[str]:
    """Problems with the claim's amounts in plain words (AMOUNT_MISMATCH); empty when fine.

    Checks: no negative amount or quantity; each item's amount is
    :func:`item_amount_fen` of its quantity and unit price; the total is the sum of the items;
    the advance is at most ``max_advance_permille`` of the total in DELAYED mode, 0 otherwise.
    """
    problems = _structure_problems(claim)
    if claim.advance_fen < 0:
        problems.append(f"negative advance_fen {claim.advance_fen}")
    if claim.settlement_mode == SettlementMode.DELAYED:
        limit = max_advance_fen(max(claim.total_fen, 0), max_advance_permille)
        if claim.advance_fen > limit:
            problems.append(
                f"advance_fen {claim.advance_fen} above {max_advance_permille}‰ of total_fen"
                f" {claim.total_fen} (at most {limit})"
            )
    elif claim.advance_fen != 0:
        problems.append(
            f"advance_fen {claim.advance_fen} must be 0 in {claim.settlement_mode.value} mode"
        )
    return problems


def _item_class(
    item: ClaimItem, catalogue_classes: Mapping[str, CatalogueClass] | None
) -> CatalogueClass:
    if catalogue_classes is None:
        return item.catalogue_class
    return catalogue_classes.get(item.item_code, item.catalogue_class)


def _checked_tier(claim: ClaimPackage, policy: Policy, insurance_type: InsuranceType) -> PolicyTier:
    if claim.home_region != policy.home_region:
        raise ValueError(
            f"claim {claim.claim_id} is for home region {claim.home_region},"
            f" policy is for {policy.home_region}"
        )
    structural = _structure_problems(claim)
    if structural:
        raise ValueError(f"claim {claim.claim_id} has inconsistent amounts: {structural}")
    return policy.tier(insurance_type, claim.hospital_level)


def classify_item(
    item: ClaimItem,
    policy: Policy,
    catalogue_classes: Mapping[str, CatalogueClass] | None = None,
) -> tuple[int, ItemAdjustment | None]:
    """An item's eligible amount under the host catalogue and the home policy, and the
    adjustment the rules make to it (None when the whole amount is eligible or it is 0).

    Class A: all of it; class B: all but the policy's self share (乙类先行自付); self-pay:
    nothing (自费)."""
    amount = item.amount_fen
    cls = _item_class(item, catalogue_classes)
    if cls == CatalogueClass.A:
        return amount, None
    if cls == CatalogueClass.B:
        approved = share(amount, PERMILLE - policy.class_b_self_permille)
        if approved == amount:
            return approved, None
        return approved, ItemAdjustment(
            item_code=item.item_code,
            approved_fen=approved,
            reason_code=REASON_B_SELF_SHARE,
            note=f"乙类先行自付 {policy.class_b_self_permille}‰: {yuan(amount - approved)} 元",
        )
    if amount == 0:
        return 0, None
    return 0, ItemAdjustment(
        item_code=item.item_code,
        approved_fen=0,
        reason_code=REASON_SELF_PAY,
        note=f"自费项目，基金不予支付: {yuan(amount)} 元",
    )


def _split(
    claim: ClaimPackage,
    policy: Policy,
    tier: PolicyTier,
    usage: YearUsage,
    eligible: int,
    adjustments: list[ItemAdjustment],
    assistance_eligible: bool,
) -> Review:
    """The one-bill split of a claim whose eligible amount is known."""
    total = claim.total_fen
    deductible = min(tier.deductible_fen, eligible)
    fund_room = max(tier.annual_cap_fen - usage.fund_used_fen, 0)
    fund = min(share(eligible - deductible, tier.ratio_permille), fund_room)

    copayment = eligible - deductible - fund
    ci_policy = policy.critical_illness
    before = max(usage.copayment_fen - ci_policy.threshold_fen, 0)
    after = max(usage.copayment_fen + copayment - ci_policy.threshold_fen, 0)
    ci_room = max(ci_policy.annual_cap_fen - usage.critical_illness_used_fen, 0)
    critical_illness = min(share(after - before, ci_policy.ratio_permille), ci_room)

    assistance = 0
    if assistance_eligible:
        aid = policy.assistance
        aid_room = max(aid.annual_cap_fen - usage.assistance_used_fen, 0)
        assistance = min(share(eligible - fund - critical_illness, aid.ratio_permille), aid_room)

    paid = fund + critical_illness + assistance
    personal = total - paid
    if eligible == total:
        decision = ReviewDecision.APPROVED
    elif paid == 0 and eligible == 0:
        decision = ReviewDecision.REJECTED
    else:
        decision = ReviewDecision.PARTIAL

    return Review(
        decision=decision,
        total_fen=total,
        eligible_fen=eligible,
        deductible_fen=deductible,
        fund_fen=fund,
        critical_illness_fen=critical_illness,
        assistance_fen=assistance,
        personal_fen=personal,
        advance_fen=claim.advance_fen,
        balance_fen=personal - claim.advance_fen,
        copayment_fen=copayment,
        adjustments=tuple(adjustments),
        new_usage=YearUsage(
            fund_used_fen=usage.fund_used_fen + fund,
            critical_illness_used_fen=usage.critical_illness_used_fen + critical_illness,
            assistance_used_fen=usage.assistance_used_fen + assistance,
            copayment_fen=usage.copayment_fen + copayment,
        ),
    )


def review(
    claim: ClaimPackage,
    policy: Policy,
    usage: YearUsage,
    *,
    insurance_type: InsuranceType,
    assistance_eligible: bool,
    catalogue_classes: Mapping[str, CatalogueClass] | None = None,
) -> Review:
    """Review a claim whose amounts passed :func:`check_amounts` under the home's policy.

    Items are classed under the host catalogue (``catalogue_classes``, item code to class;
    items it lacks keep the class written on the claim). The deductible applies per claim.
    Raises ``ValueError`` for a claim of another home region or with inconsistent amounts, and
    :class:`PolicyTierMissingError` when the policy has no tier for the visit.
    """
    tier = _checked_tier(claim, policy, insurance_type)
    eligible = 0
    adjustments: list[ItemAdjustment] = []
    for item in claim.items:
        approved, adjustment = classify_item(item, policy, catalogue_classes)
        eligible += approved
        if adjustment is not None:
            adjustments.append(adjustment)
    return _split(claim, policy, tier, usage, eligible, adjustments, assistance_eligible)


def code_amounts(claim: ClaimPackage) -> dict[str, int]:
    """Each item code's billed amount (the sum of the claim's lines with that code), in the
    order the codes first appear."""
    amounts: dict[str, int] = {}
    for item in claim.items:
        amounts[item.item_code] = amounts.get(item.item_code, 0) + item.amount_fen
    return amounts


def adjustment_problems(claim: ClaimPackage, overrides: Sequence[ItemAdjustment]) -> list[str]:
    """What is wrong with a reviewer's adjustments of ``claim`` in plain words (empty: none):
    each names an item code of the claim once, approves 0..the code's billed amount, and gives
    a reason code."""
    amounts = code_amounts(claim)
    problems: list[str] = []
    seen: set[str] = set()
    for adj in overrides:
        code = adj.item_code
        if code in seen:
            problems.append(f"item {code} is adjusted twice")
            continue
        seen.add(code)
        if code not in amounts:
            problems.append(f"claim {claim.claim_id} has no item {code}")
            continue
        if not 0 <= adj.approved_fen <= amounts[code]:
            problems.append(
                f"item {code}: approved_fen {adj.approved_fen} is not within 0..{amounts[code]}"
            )
        if not adj.reason_code.strip():
            problems.append(f"item {code}: the reason code is empty")
    return problems


def review_adjusted(
    claim: ClaimPackage,
    policy: Policy,
    usage: YearUsage,
    overrides: Sequence[ItemAdjustment],
    *,
    insurance_type: InsuranceType,
    assistance_eligible: bool,
    catalogue_classes: Mapping[str, CatalogueClass] | None = None,
) -> Review:
    """:func:`review` with a reviewer's word on some items: an overridden item code's
    ``approved_fen`` is its eligible amount (whatever its catalogue class; for a code on
    several lines, of all of them together), and the reviewer's adjustment replaces the rules'
    one for it; the other items are classed as in :func:`review`, and the split (deductible,
    ratio, caps, critical illness, assistance, rounding) is the same.

    An override approving a code's whole amount leaves no adjustment for it (an adjustment
    always approves less than billed). The decision follows the amounts as in :func:`review`:
    PARTIAL, or APPROVED when everything ends eligible, REJECTED when nothing does. Raises
    ``ValueError`` with the :func:`adjustment_problems`.
    """
    tier = _checked_tier(claim, policy, insurance_type)
    problems = adjustment_problems(claim, overrides)
    if problems:
        raise ValueError(f"claim {claim.claim_id}: " + "; ".join(problems))
    amounts = code_amounts(claim)
    by_code = {adj.item_code: adj for adj in overrides}
    eligible = 0
    adjustments: list[ItemAdjustment] = []
    done: set[str] = set()
    for item in claim.items:
        override = by_code.get(item.item_code)
        if override is None:
            approved, adjustment = classify_item(item, policy, catalogue_classes)
            eligible += approved
            if adjustment is not None:
                adjustments.append(adjustment)
        elif item.item_code not in done:
            done.add(item.item_code)
            eligible += override.approved_fen
            if override.approved_fen != amounts[item.item_code]:
                adjustments.append(override)
    return _split(claim, policy, tier, usage, eligible, adjustments, assistance_eligible)


def spent(review: Review) -> YearUsage:
    """What a review adds to the person's year: its fund, critical-illness and assistance
    shares and its eligible co-payment (``review.new_usage`` minus the usage it started from)."""
    return YearUsage(
        fund_used_fen=review.fund_fen,
        critical_illness_used_fen=review.critical_illness_fen,
        assistance_used_fen=review.assistance_fen,
        copayment_fen=review.copayment_fen,
    )


def add_usage(*parts: YearUsage) -> YearUsage:
    """The sum of year usages (committed usage plus reservations, say)."""
    return YearUsage(
        fund_used_fen=sum(p.fund_used_fen for p in parts),
        critical_illness_used_fen=sum(p.critical_illness_used_fen for p in parts),
        assistance_used_fen=sum(p.assistance_used_fen for p in parts),
        copayment_fen=sum(p.copayment_fen for p in parts),
    )


def remove_usage(committed: YearUsage, reversed_part: YearUsage) -> YearUsage:
    """The person's year after a reversal gave ``reversed_part`` back (never below zero: a
    year pruned or corrected by hand keeps what is left)."""
    return YearUsage(
        fund_used_fen=max(0, committed.fund_used_fen - reversed_part.fund_used_fen),
        critical_illness_used_fen=max(
            0, committed.critical_illness_used_fen - reversed_part.critical_illness_used_fen
        ),
        assistance_used_fen=max(
            0, committed.assistance_used_fen - reversed_part.assistance_used_fen
        ),
        copayment_fen=max(0, committed.copayment_fen - reversed_part.copayment_fen),
    )


REVERSAL_WINDOW_DAYS = 30
"""A settled claim may be reversed (冲正) this many days after its review; the home refuses
later ones (``WINDOW_CLOSED``). A contract rule (docs/contract.md)."""


class ReversalRefusal(StrEnum):
    """Why a home refuses a reversal (``ReversalResult.refusal_code``)."""

    NOT_REVIEWED = "NOT_REVIEWED"
    """The home has no review of the claim from this host."""
    ALREADY_REVERSED = "ALREADY_REVERSED"
    """Another reversal cancelled the claim already (a reversal of a reversal)."""
    WINDOW_CLOSED = "WINDOW_CLOSED"
    """Past :data:`REVERSAL_WINDOW_DAYS` after the review."""
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    """The amounts to reverse are not the ones the home reviewed."""
    WRONG_REQUEST = "WRONG_REQUEST"
    """The claim was reviewed under another request than the one named."""


def review_result(
    review: Review, claim_id: str, reviewer: str, reviewed_at: dt.datetime
) -> ReviewResult:
    """The wire ``ReviewResult`` for a review."""
    return ReviewResult(
        claim_id=claim_id,
        decision=review.decision,
        total_fen=review.total_fen,
        eligible_fen=review.eligible_fen,
        deductible_fen=review.deductible_fen,
        fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen,
        assistance_fen=review.assistance_fen,
        personal_fen=review.personal_fen,
        advance_fen=review.advance_fen,
        balance_fen=review.balance_fen,
        adjustments=review.adjustments,
        reviewer=reviewer,
        reviewed_at=reviewed_at,
    )
