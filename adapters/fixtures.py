"""Lao Zhang of seed 000: the Hebei policy and his 25,000-yuan Hainan bill, for tests and demo.

Insured in Shijiazhuang (130100, Hebei) as an employee, admitted to a grade-3 Hainan hospital in
May 2017: class A 20,375 + class B 3,000 + self-pay 1,625 = 25,000 yuan. Under
:func:`hebei_policy` the fund pays 17,500 and he pays 7,500 (eligible 23,075, deductible 1,200).
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from adapters.rules import (
    Assistance,
    CriticalIllness,
    Policy,
    PolicyTier,
    item_amount_fen,
    max_advance_fen,
)
from bus.models import (
    CatalogueClass,
    ClaimItem,
    ClaimPackage,
    InsuranceType,
    ItemCategory,
    SettlementMode,
    VisitType,
)

CST: Final = dt.timezone(dt.timedelta(hours=8), "CST")
"""China Standard Time (UTC+8)."""

LAO_ZHANG_PERSON_ID: Final = "130102195203151234"
LAO_ZHANG_HOME_REGION: Final = "130100"
LAO_ZHANG_HOSPITAL: Final = "H46010001"
"""海南省人民医院, grade 3, Haikou."""


def hebei_policy() -> Policy:
    """Shijiazhuang's (130100) policy; identical to its entry in the default directory."""
    tiers = [
        PolicyTier(
            insurance_type=InsuranceType.EMPLOYEE,
            hospital_level=level,
            deductible_fen=deductible,
            ratio_permille=ratio,
            annual_cap_fen=30_000_000,
        )
        for level, deductible, ratio in ((1, 80_000, 900), (2, 100_000, 850), (3, 120_000, 800))
    ]
    tiers += [
        PolicyTier(
            insurance_type=InsuranceType.RESIDENT,
            hospital_level=level,
            deductible_fen=deductible,
            ratio_permille=ratio,
            annual_cap_fen=20_000_000,
        )
        for level, deductible, ratio in ((1, 100_000, 700), (2, 130_000, 600), (3, 160_000, 500))
    ]
    tiers += [
        PolicyTier(
            insurance_type=InsuranceType.RETIRED_CADRE,
            hospital_level=level,
            deductible_fen=0,
            ratio_permille=1000,
            annual_cap_fen=50_000_000,
        )
        for level in (1, 2, 3)
    ]
    return Policy(
        home_region=LAO_ZHANG_HOME_REGION,
        tiers=tuple(tiers),
        class_b_self_permille=100,
        critical_illness=CriticalIllness(
            threshold_fen=1_500_000, ratio_permille=600, annual_cap_fen=30_000_000
        ),
        assistance=Assistance(ratio_permille=700, annual_cap_fen=5_000_000),
    )


# code, name, category, class, quantity (whole units), unit price fen (Hainan catalogue)
_A, _B, _S = CatalogueClass.A, CatalogueClass.B, CatalogueClass.SELF_PAY
_DRUG, _TREAT, _FAC = ItemCategory.DRUG, ItemCategory.TREATMENT, ItemCategory.FACILITY
_BILL: Final = (
    ("F001", "普通病房床位费", _FAC, _A, 15, 3_500),
    ("F004", "一级护理", _FAC, _A, 15, 2_800),
    ("F006", "住院诊查费", _FAC, _A, 15, 1_000),
    ("F005", "重症监护(ICU)床位费", _FAC, _A, 2, 40_000),
    ("T017", "冠状动脉造影术", _TREAT, _A, 1, 150_000),
    ("T005", "经皮冠状动脉支架置入术", _TREAT, _A, 1, 350_000),
    ("T018", "冠状动脉药物洗脱支架", _TREAT, _A, 1, 1_178_560),
    ("T006", "常规心电图检查", _TREAT, _A, 4, 2_500),
    ("T007", "血细胞分析(血常规)", _TREAT, _A, 6, 2_000),
    ("T008", "肝功能检查", _TREAT, _A, 3, 9_000),
    ("T013", "彩色多普勒超声检查", _TREAT, _A, 2, 18_000),
    ("T009", "静脉输液", _TREAT, _A, 30, 1_200),
    ("D008", "氯化钠注射液(0.9% 250ml)", _DRUG, _A, 40, 350),
    ("D009", "葡萄糖注射液(5% 250ml)", _DRUG, _A, 20, 380),
    ("D002", "注射用头孢曲松钠(1g)", _DRUG, _A, 20, 860),
    ("D015", "阿司匹林肠溶片(100mg×30片)", _DRUG, _A, 2, 1_560),
    ("D006", "硝苯地平控释片(30mg×7片)", _DRUG, _A, 2, 3_260),
    ("T001", "X线计算机体层(CT)平扫", _TREAT, _B, 2, 24_000),
    ("D016", "硫酸氢氯吡格雷片(75mg×7片)", _DRUG, _B, 12, 11_900),
    ("D005", "阿托伐他汀钙片(20mg×7片)", _DRUG, _B, 6, 2_450),
    ("D011", "注射用奥美拉唑钠(40mg)", _DRUG, _B, 20, 2_600),
    ("T011", "康复理疗", _TREAT, _B, 5, 5_000),
    ("T012", "针刺(针灸)", _TREAT, _B, 5, 3_500),
    ("F007", "陪护费", _FAC, _S, 10, 10_000),
    ("D020", "阿胶(250g)", _DRUG, _S, 1, 62_500),
)

LAO_ZHANG_TOTAL_FEN: Final = 2_500_000
"""25,000 yuan: class A 2,037,500 + class B 300,000 + self-pay 162,500 fen."""


def lao_zhang_items() -> tuple[ClaimItem, ...]:
    """The itemised bill (25 lines, 25,000 yuan in total)."""
    return tuple(
        ClaimItem(
            item_code=code,
            item_name=name,
            category=category,
            catalogue_class=cls,
            quantity_milli=quantity * 1000,
            unit_price_fen=price,
            amount_fen=item_amount_fen(quantity * 1000, price),
        )
        for code, name, category, cls, quantity, price in _BILL
    )


def lao_zhang_claim(
    mode: SettlementMode = SettlementMode.DELAYED,
    advance_fen: int | None = None,
    *,
    claim_id: str = "C-460000-20170523-000001",
    filing_id: str = "F-130100-20170502-000001",
    hospital_code: str = LAO_ZHANG_HOSPITAL,
    hospital_level: int = 3,
    host_region: str = "460100",
    submitted_at: dt.datetime | None = None,
) -> ClaimPackage:
    """Lao Zhang's claim; the advance defaults to 25% of the total in DELAYED mode, else 0."""
    items = lao_zhang_items()
    total = sum(item.amount_fen for item in items)
    if advance_fen is None:
        advance_fen = max_advance_fen(total) if mode == SettlementMode.DELAYED else 0
    discharged = dt.datetime(2017, 5, 23, 10, 0, tzinfo=CST)
    return ClaimPackage(
        claim_id=claim_id,
        filing_id=filing_id,
        person_id=LAO_ZHANG_PERSON_ID,
        home_region=LAO_ZHANG_HOME_REGION,
        host_region=host_region,
        hospital_code=hospital_code,
        hospital_level=hospital_level,
        settlement_mode=mode,
        visit_type=VisitType.INPATIENT,
        admitted_at=dt.datetime(2017, 5, 8, 9, 30, tzinfo=CST),
        discharged_at=discharged,
        diagnoses=("I25.1", "I10"),
        items=items,
        total_fen=total,
        advance_fen=advance_fen,
        submitted_at=submitted_at or discharged + dt.timedelta(minutes=30),
    )
