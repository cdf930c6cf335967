"""Settlement rules: amount checks, review split, caps across claims, Lao Zhang's exact bill."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters.fixtures import hebei_policy, lao_zhang_claim
from adapters.rules import (
    Assistance,
    BalanceKind,
    CriticalIllness,
    Policy,
    PolicyTier,
    PolicyTierMissingError,
    Review,
    YearUsage,
    check_amounts,
    item_amount_fen,
    max_advance_fen,
    review,
    review_result,
    settle_balance,
    share,
)
from bus.models import (
    CatalogueClass,
    ClaimItem,
    ClaimPackage,
    InsuranceType,
    ItemCategory,
    ReviewDecision,
    SettlementMode,
    VisitType,
    yuan,
)

A, B, SELF = CatalogueClass.A, CatalogueClass.B, CatalogueClass.SELF_PAY
EMP = InsuranceType.EMPLOYEE
T0 = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.UTC)


def make_policy(
    *,
    deductible: int = 0,
    ratio: int = 1000,
    cap: int = 10**9,
    b_self: int = 100,
    ci: tuple[int, int, int] = (10**9, 0, 0),
    aid: tuple[int, int] = (0, 0),
) -> Policy:
    """A one-tier policy (EMPLOYEE, level 3) for region 130100."""
    return Policy(
        home_region="130100",
        tiers=(
            PolicyTier(
                insurance_type=EMP,
                hospital_level=3,
                deductible_fen=deductible,
                ratio_permille=ratio,
                annual_cap_fen=cap,
            ),
        ),
        class_b_self_permille=b_self,
        critical_illness=CriticalIllness(
            threshold_fen=ci[0], ratio_permille=ci[1], annual_cap_fen=ci[2]
        ),
        assistance=Assistance(ratio_permille=aid[0], annual_cap_fen=aid[1]),
    )


def make_claim(
    lines: Sequence[tuple[CatalogueClass, int]],
    *,
    mode: SettlementMode = SettlementMode.INSTANT,
    advance: int = 0,
    total: int | None = None,
) -> ClaimPackage:
    """A claim with one item per (class, amount) line, quantity 1 at that price."""
    items = tuple(
        ClaimItem(
            item_code=f"X{i:03d}",
            item_name=f"item {i}",
            category=ItemCategory.TREATMENT,
            catalogue_class=cls,
            quantity_milli=1000,
            unit_price_fen=amount,
            amount_fen=amount,
        )
        for i, (cls, amount) in enumerate(lines)
    )
    return ClaimPackage(
        claim_id="C1",
        filing_id="F1",
        person_id="P1",
        home_region="130100",
        host_region="460100",
        hospital_code="H46010001",
        hospital_level=3,
        settlement_mode=mode,
        visit_type=VisitType.INPATIENT,
        admitted_at=T0,
        discharged_at=T0 + dt.timedelta(days=3),
        diagnoses=("K35.8",),
        items=items,
        total_fen=sum(i.amount_fen for i in items) if total is None else total,
        advance_fen=advance,
        submitted_at=T0 + dt.timedelta(days=3),
    )


def run(
    claim: ClaimPackage,
    policy: Policy,
    usage: YearUsage | None = None,
    *,
    aid: bool = False,
    classes: dict[str, CatalogueClass] | None = None,
) -> Review:
    """Review as an employee."""
    return review(
        claim,
        policy,
        usage or YearUsage(),
        insurance_type=EMP,
        assistance_eligible=aid,
        catalogue_classes=classes,
    )


def assert_conserved(r: Review) -> None:
    """The one-bill split adds up to the total and the balance is personal minus advance."""
    assert r.total_fen == r.fund_fen + r.critical_illness_fen + r.assistance_fen + r.personal_fen
    assert r.balance_fen == r.personal_fen - r.advance_fen


# --- Basic fund ---------------------------------------------------------------------------------
def test_deductible_then_ratio() -> None:
    """The fund pays the ratio of the eligible amount above the deductible."""
    r = run(make_claim([(A, 10_000)]), make_policy(deductible=2_000, ratio=800))
    assert (r.eligible_fen, r.deductible_fen, r.fund_fen, r.personal_fen) == (
        10_000,
        2_000,
        6_400,
        3_600,
    )
    assert r.decision == ReviewDecision.APPROVED
    assert r.adjustments == ()
    assert_conserved(r)


def test_deductible_is_at_most_the_eligible_amount() -> None:
    """A bill below the deductible pays nothing from the fund and counts only what is eligible."""
    r = run(make_claim([(A, 1_000)]), make_policy(deductible=2_000, ratio=800))
    assert (r.deductible_fen, r.fund_fen, r.personal_fen) == (1_000, 0, 1_000)


def test_cap_reached_mid_claim() -> None:
    """With 500 fen of the annual cap left the fund pays exactly 500."""
    policy = make_policy(ratio=900, cap=100_000)
    r = run(make_claim([(A, 50_000)]), policy, YearUsage(fund_used_fen=99_500))
    assert r.fund_fen == 500
    assert r.new_usage.fund_used_fen == 100_000
    assert r.personal_fen == 49_500
    assert_conserved(r)


def test_cap_carried_across_claims() -> None:
    """A second and third claim see what the first used of the same year's cap."""
    policy = make_policy(ratio=1000, cap=80_000)
    first = run(make_claim([(A, 50_000)]), policy)
    second = run(make_claim([(A, 50_000)]), policy, first.new_usage)
    third = run(make_claim([(A, 50_000)]), policy, second.new_usage)
    assert (first.fund_fen, second.fund_fen, third.fund_fen) == (50_000, 30_000, 0)
    assert third.new_usage.fund_used_fen == 80_000
    assert third.decision == ReviewDecision.APPROVED


def test_missing_tier_is_a_clear_error() -> None:
    """A policy without a tier for the visit names the region, type and level."""
    with pytest.raises(PolicyTierMissingError, match=r"130100.*RESIDENT.*level 2"):
        make_policy().tier(InsuranceType.RESIDENT, 2)


def test_duplicate_tiers_are_rejected() -> None:
    """Two tiers for the same insurance type and level make an invalid policy."""
    raw = make_policy().model_dump()
    with pytest.raises(ValidationError, match="two tiers"):
        Policy.model_validate(raw | {"tiers": raw["tiers"] * 2})


def test_review_refuses_claim_of_another_home() -> None:
    """A claim is reviewed only under its own home region's policy."""
    claim = make_claim([(A, 100)]).model_copy(update={"home_region": "620100"})
    with pytest.raises(ValueError, match="620100"):
        run(claim, make_policy())


def test_review_refuses_inconsistent_amounts() -> None:
    """A claim whose total is not the sum of its items cannot be reviewed."""
    with pytest.raises(ValueError, match="inconsistent"):
        run(make_claim([(A, 100)], total=99), make_policy())


# --- Catalogue classes --------------------------------------------------------------------------
def test_class_b_self_share_rounds_up() -> None:
    """A class B item's self share rounds up, so its eligible part rounds down."""
    r = run(make_claim([(B, 1_005)]), make_policy(b_self=100))
    assert r.eligible_fen == 904
    (adj,) = r.adjustments
    assert (adj.item_code, adj.approved_fen, adj.reason_code) == ("X000", 904, "B_SELF_SHARE")
    assert r.decision == ReviewDecision.PARTIAL


def test_self_pay_only_is_rejected() -> None:
    """A bill of self-pay items only is REJECTED, with one SELF_PAY adjustment per item."""
    r = run(make_claim([(SELF, 3_000), (SELF, 500)]), make_policy())
    assert r.decision == ReviewDecision.REJECTED
    assert (r.eligible_fen, r.fund_fen, r.personal_fen) == (0, 0, 3_500)
    assert [(a.reason_code, a.approved_fen) for a in r.adjustments] == [("SELF_PAY", 0)] * 2


def test_host_catalogue_class_overrides_claim() -> None:
    """The home reviews under the host catalogue class, not the class written on the claim."""
    claim = make_claim([(A, 1_000), (A, 2_000)])
    r = run(claim, make_policy(), classes={"X000": SELF})
    assert r.eligible_fen == 2_000
    assert [a.item_code for a in r.adjustments] == ["X000"]


def test_items_missing_from_catalogue_keep_claim_class() -> None:
    """Items the catalogue mapping lacks are reviewed under the claim's class."""
    r = run(make_claim([(B, 1_000)]), make_policy(b_self=200), classes={})
    assert r.eligible_fen == 800


def test_nothing_paid_but_some_eligible_is_partial() -> None:
    """An eligible amount under the deductible with items cut is PARTIAL, not REJECTED."""
    r = run(make_claim([(A, 100), (SELF, 100)]), make_policy(deductible=500))
    assert (r.fund_fen, r.decision) == (0, ReviewDecision.PARTIAL)


# --- Critical illness and assistance -----------------------------------------------------------
def test_critical_illness_pays_above_threshold() -> None:
    """Critical illness pays its ratio of the co-payment above the threshold."""
    policy = make_policy(deductible=1_000, ratio=800, ci=(5_000, 600, 10**9))
    r = run(make_claim([(A, 51_000)]), policy)
    assert r.fund_fen == 40_000
    assert r.copayment_fen == 10_000
    assert r.critical_illness_fen == 3_000  # 600‰ of (10,000 - 5,000)
    assert r.personal_fen == 51_000 - 40_000 - 3_000
    assert_conserved(r)


def test_critical_illness_threshold_is_yearly() -> None:
    """Co-payments accumulate over the year towards the critical-illness threshold."""
    policy = make_policy(ratio=500, ci=(6_000, 500, 10**9))
    first = run(make_claim([(A, 8_000)]), policy)
    second = run(make_claim([(A, 8_000)]), policy, first.new_usage)
    assert first.critical_illness_fen == 0
    assert first.new_usage.copayment_fen == 4_000
    assert second.critical_illness_fen == 1_000  # 500‰ of (8,000 - 6,000)


def test_critical_illness_cap() -> None:
    """Critical illness stops at its annual cap."""
    policy = make_policy(ratio=0, ci=(0, 1000, 700))
    r = run(make_claim([(A, 5_000)]), policy, YearUsage(critical_illness_used_fen=200))
    assert r.critical_illness_fen == 500


def test_fund_cap_overflow_goes_to_critical_illness() -> None:
    """What the basic fund cannot pay above its cap counts as co-payment for critical illness."""
    policy = make_policy(ratio=1000, cap=10_000, ci=(0, 500, 10**9))
    r = run(make_claim([(A, 30_000)]), policy)
    assert (r.fund_fen, r.copayment_fen, r.critical_illness_fen) == (10_000, 20_000, 10_000)


def test_assistance_only_for_eligible_persons() -> None:
    """Assistance pays its ratio of the eligible amount still personal, only when eligible."""
    policy = make_policy(deductible=1_000, ratio=800, aid=(500, 10**9))
    claim = make_claim([(A, 11_000), (SELF, 2_000)])
    without = run(claim, policy)
    with_aid = run(claim, policy, aid=True)
    assert without.assistance_fen == 0
    assert with_aid.fund_fen == 8_000
    assert with_aid.assistance_fen == 1_500  # 500‰ of (11,000 - 8,000)
    assert with_aid.personal_fen == 13_000 - 8_000 - 1_500
    assert with_aid.new_usage.assistance_used_fen == 1_500
    assert_conserved(with_aid)


def test_assistance_cap() -> None:
    """Assistance stops at its annual cap."""
    policy = make_policy(ratio=0, aid=(1000, 1_000))
    r = run(make_claim([(A, 5_000)]), policy, YearUsage(assistance_used_fen=400), aid=True)
    assert r.assistance_fen == 600


def test_one_bill_split_all_three_funds() -> None:
    """Fund, critical illness and assistance settle on one bill that adds up exactly."""
    policy = make_policy(deductible=1_000, ratio=700, ci=(2_000, 550, 10**9), aid=(333, 10**9))
    r = run(make_claim([(A, 21_000), (B, 1_000), (SELF, 777)]), policy, aid=True)
    assert r.eligible_fen == 21_900
    assert r.fund_fen == 14_630  # 700‰ of 20,900
    assert r.copayment_fen == 6_270  # 21,900 - 1,000 - 14,630
    assert r.critical_illness_fen == 2_348  # 550‰ of (6,270 - 2,000) = 2,348.5, rounded down
    assert r.assistance_fen == 1_639  # 333‰ of (21,900 - 14,630 - 2,348) = 1,639.026
    assert r.personal_fen == 22_777 - 14_630 - 2_348 - 1_639
    assert_conserved(r)


# --- Rounding -------------------------------------------------------------------------------
def test_fund_shares_round_down_personal_absorbs() -> None:
    """Fund shares round down to the fen and the patient absorbs the remainder."""
    r = run(make_claim([(A, 1_001)]), make_policy(ratio=333))
    assert r.fund_fen == 333  # 333.333 rounded down
    assert r.personal_fen == 668
    assert share(999, 999) == 998
    assert yuan(-125_001) == "-1,250.01"


# --- Lao Zhang (seed 000) ------------------------------------------------------------------
def test_lao_zhang_delayed() -> None:
    """Lao Zhang in DELAYED mode: fund 17,500, personal 7,500, advance 6,250, top-up 1,250 yuan."""
    claim = lao_zhang_claim(SettlementMode.DELAYED)
    assert check_amounts(claim) == []
    r = review(claim, hebei_policy(), YearUsage(), insurance_type=EMP, assistance_eligible=False)
    assert r.total_fen == 2_500_000
    assert r.eligible_fen == 2_307_500
    assert r.deductible_fen == 120_000
    assert r.fund_fen == 1_750_000
    assert (r.critical_illness_fen, r.assistance_fen) == (0, 0)
    assert r.personal_fen == 750_000
    assert r.advance_fen == 625_000
    assert r.balance_fen == 125_000
    assert settle_balance(r.personal_fen, r.advance_fen) == (BalanceKind.TOP_UP, 125_000)
    assert r.decision == ReviewDecision.PARTIAL
    reasons = {a.reason_code for a in r.adjustments}
    assert reasons == {"B_SELF_SHARE", "SELF_PAY"}
    assert sum(a.approved_fen for a in r.adjustments if a.reason_code == "B_SELF_SHARE") == 270_000


def test_lao_zhang_instant() -> None:
    """Lao Zhang in INSTANT mode advances nothing and pays his 7,500 yuan at discharge."""
    claim = lao_zhang_claim(SettlementMode.INSTANT)
    assert claim.advance_fen == 0
    assert check_amounts(claim) == []
    r = review(claim, hebei_policy(), YearUsage(), insurance_type=EMP, assistance_eligible=False)
    assert (r.fund_fen, r.personal_fen, r.balance_fen) == (1_750_000, 750_000, 750_000)


def test_review_result_carries_the_split() -> None:
    """review_result() copies every figure of the review into the wire ReviewResult."""
    claim = lao_zhang_claim()
    r = review(claim, hebei_policy(), YearUsage(), insurance_type=EMP, assistance_eligible=False)
    result = review_result(r, claim.claim_id, "130000", T0)
    assert result.claim_id == claim.claim_id
    assert (result.fund_fen, result.personal_fen, result.balance_fen) == (
        1_750_000,
        750_000,
        125_000,
    )
    assert result.adjustments == r.adjustments
    assert result.reviewer == "130000"


# --- Amount checks --------------------------------------------------------------------------
def test_check_amounts_total_mismatch() -> None:
    """A total that is not the sum of the items is reported."""
    problems = check_amounts(make_claim([(A, 100), (B, 200)], total=301))
    assert len(problems) == 1
    assert "sum of item amounts 300" in problems[0]


def test_check_amounts_negative() -> None:
    """Negative amounts and quantities are reported."""
    item = ClaimItem(
        item_code="N1",
        item_name="negative",
        category=ItemCategory.DRUG,
        catalogue_class=A,
        quantity_milli=-1000,
        unit_price_fen=100,
        amount_fen=-100,
    )
    claim = make_claim([]).model_copy(update={"items": (item,), "total_fen": -100})
    problems = " | ".join(check_amounts(claim))
    assert "negative quantity_milli" in problems
    assert "negative amount_fen" in problems
    assert "negative total_fen" in problems


def test_check_amounts_item_amount_rounds_half_up() -> None:
    """An item's amount is quantity x price / 1000 rounded half up; anything else is reported."""
    assert item_amount_fen(1500, 333) == 500  # 499.5 -> 500
    assert item_amount_fen(1499, 333) == 499  # 499.167 -> 499
    good = ClaimItem(
        item_code="D1",
        item_name="half box",
        category=ItemCategory.DRUG,
        catalogue_class=A,
        quantity_milli=1500,
        unit_price_fen=333,
        amount_fen=500,
    )
    claim = make_claim([]).model_copy(update={"items": (good,), "total_fen": 500})
    assert check_amounts(claim) == []
    bad = good.model_copy(update={"amount_fen": 499})
    claim = claim.model_copy(update={"items": (bad,), "total_fen": 499})
    assert check_amounts(claim) == [
        "items[0] D1: amount_fen 499 != quantity_milli 1500 x unit_price_fen 333 / 1000 = 500"
    ]


def test_check_amounts_delayed_advance_limit() -> None:
    """In DELAYED mode the advance may be at most 25% of the total (or the host's limit)."""
    delayed = SettlementMode.DELAYED
    assert check_amounts(make_claim([(A, 10_000)], mode=delayed, advance=2_500)) == []
    assert check_amounts(make_claim([(A, 10_000)], mode=delayed, advance=2_501))
    assert check_amounts(
        make_claim([(A, 10_000)], mode=delayed, advance=2_500), max_advance_permille=200
    )
    assert check_amounts(make_claim([(A, 10_000)], mode=delayed, advance=-1))


@pytest.mark.parametrize("mode", [SettlementMode.INSTANT, SettlementMode.POINT_TO_POINT])
def test_check_amounts_advance_only_in_delayed(mode: SettlementMode) -> None:
    """INSTANT and POINT_TO_POINT claims collect no advance."""
    assert check_amounts(make_claim([(A, 10_000)], mode=mode)) == []
    (problem,) = check_amounts(make_claim([(A, 10_000)], mode=mode, advance=1))
    assert f"must be 0 in {mode.value} mode" in problem


def test_max_advance_rounds_down() -> None:
    """The largest advance is 25% of the total rounded down to the fen."""
    assert max_advance_fen(1_003) == 250
    assert max_advance_fen(2_500_000) == 625_000
    assert max_advance_fen(1_000, 200) == 200


def test_settle_balance() -> None:
    """The balance is a top-up, a refund or nothing."""
    assert settle_balance(750_000, 625_000) == (BalanceKind.TOP_UP, 125_000)
    assert settle_balance(100, 300) == (BalanceKind.REFUND, 200)
    assert settle_balance(5, 5) == (BalanceKind.NONE, 0)


# --- Properties -----------------------------------------------------------------------------
money = st.integers(min_value=0, max_value=5_000_000)
permille = st.integers(min_value=0, max_value=1000)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    """Random one-tier policies."""
    return make_policy(
        deductible=draw(money),
        ratio=draw(permille),
        cap=draw(money),
        b_self=draw(permille),
        ci=(draw(money), draw(permille), draw(money)),
        aid=(draw(permille), draw(money)),
    )


@st.composite
def claims(draw: st.DrawFn) -> ClaimPackage:
    """Random consistent bills with a valid advance for their mode."""
    lines = draw(
        st.lists(
            st.tuples(st.sampled_from([A, B, SELF]), st.integers(min_value=0, max_value=2_000_000)),
            max_size=12,
        )
    )
    mode = draw(st.sampled_from([m for m in SettlementMode if m is not SettlementMode.UNKNOWN]))
    total = sum(amount for _, amount in lines)
    advance = 0
    if mode == SettlementMode.DELAYED:
        advance = draw(st.integers(min_value=0, max_value=max_advance_fen(total)))
    return make_claim(lines, mode=mode, advance=advance)


usages = st.builds(
    YearUsage,
    fund_used_fen=money,
    critical_illness_used_fen=money,
    assistance_used_fen=money,
    copayment_fen=money,
)


@settings(max_examples=300, deadline=None)
@given(claim=claims(), policy=policies(), usage=usages, aid=st.booleans())
def test_money_is_conserved(
    claim: ClaimPackage, policy: Policy, usage: YearUsage, aid: bool
) -> None:
    """For any bill the shares are non-negative, within their caps and add up to the total."""
    assert check_amounts(claim) == []
    r = run(claim, policy, usage, aid=aid)
    assert_conserved(r)
    shares = (r.fund_fen, r.critical_illness_fen, r.assistance_fen, r.personal_fen)
    assert all(s >= 0 for s in shares)
    assert r.deductible_fen <= r.eligible_fen <= r.total_fen
    assert r.fund_fen + r.critical_illness_fen + r.assistance_fen <= r.eligible_fen
    tier = policy.tiers[0]
    assert r.fund_fen <= max(tier.annual_cap_fen - usage.fund_used_fen, 0)
    ci_cap = policy.critical_illness.annual_cap_fen
    assert r.critical_illness_fen <= max(ci_cap - usage.critical_illness_used_fen, 0)
    aid_cap = policy.assistance.annual_cap_fen
    assert r.assistance_fen <= max(aid_cap - usage.assistance_used_fen, 0)
    assert aid or r.assistance_fen == 0
    assert r.new_usage.fund_used_fen == usage.fund_used_fen + r.fund_fen
    assert r.new_usage.copayment_fen == usage.copayment_fen + r.copayment_fen


@settings(max_examples=200, deadline=None)
@given(claim=claims(), policy=policies())
def test_adjustments_explain_the_eligible_amount(claim: ClaimPackage, policy: Policy) -> None:
    """The eligible amount is the total minus what the adjustments did not approve."""
    r = run(claim, policy)
    amounts = {item.item_code: item.amount_fen for item in claim.items}
    cut = sum(amounts[a.item_code] - a.approved_fen for a in r.adjustments)
    assert r.eligible_fen == r.total_fen - cut
    assert (r.decision == ReviewDecision.APPROVED) == (r.eligible_fen == r.total_fen)
    if r.decision == ReviewDecision.REJECTED:
        assert r.eligible_fen == 0
