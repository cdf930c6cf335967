"""Synthetic persons, filings and hospital bills: seeded, reproducible, valid-looking.

ID numbers follow GB 11643-1999 (18 characters: 6-digit region, birth date, 3-digit sequence,
ISO 7064 MOD 11-2 check character). Bills are drawn from the host catalogue with amounts
computed by the same rule the home checks (:func:`adapters.rules.item_amount_fen`). The ids
made here carry nothing of the person (:func:`opaque_token`, :func:`keyed_token`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import random
from collections.abc import Mapping, Sequence

from adapters.backoffice import Person
from adapters.directory import CatalogueItem
from adapters.rules import item_amount_fen
from bus.models import (
    ClaimItem,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ItemCategory,
    VisitType,
)

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英建国建华志强海燕红梅玉兰"

REASON_MIX: tuple[tuple[FilingReason, int], ...] = (
    (FilingReason.RELOCATED_RETIREE, 30),
    (FilingReason.LONG_TERM_RESIDENT, 20),
    (FilingReason.STATIONED_WORKER, 15),
    (FilingReason.REFERRAL, 15),
    (FilingReason.MIGRANT_WORKER, 12),
    (FilingReason.TEMPORARY, 6),
    (FilingReason.EMERGENCY, 2),
)
"""Filing reasons and their weights: retirees living with children dominate (seed 000)."""

CHANNEL_MIX: tuple[tuple[FilingChannel, int], ...] = (
    (FilingChannel.APP, 40),
    (FilingChannel.WEB, 20),
    (FilingChannel.COUNTER, 25),
    (FilingChannel.PHONE, 10),
    (FilingChannel.FAX, 5),
)
INSURANCE_MIX: tuple[tuple[InsuranceType, int], ...] = (
    (InsuranceType.EMPLOYEE, 55),
    (InsuranceType.RESIDENT, 43),
    (InsuranceType.RETIRED_CADRE, 2),
)
VISIT_MIX: tuple[tuple[VisitType, int], ...] = (
    (VisitType.INPATIENT, 45),
    (VisitType.OUTPATIENT, 25),
    (VisitType.CHRONIC_OUTPATIENT, 20),
    (VisitType.PHARMACY, 10),
)
ID_LETTERS = "bcdfghjkmnpqrstvwxz"
"""The characters of the opaque part of a generated id: consonants only, so it spells no word
and holds no digit (no run of an ID number's digits can appear in it, by chance or not)."""
ID_TOKEN_LENGTH = 10
"""Letters of that part: 19^10 (6e12) values, so ids drawn for a day never collide."""
DIAGNOSES = ("I10", "E11.9", "I25.1", "J18.9", "K35.8", "N18.5", "C34.9", "S72.0", "I63.9")
ASSISTANCE_SHARE = 0.06
"""Share of persons marked eligible for medical assistance."""


def pick(rng: random.Random, mix: Sequence[tuple[object, int]]) -> object:
    """A weighted choice."""
    return rng.choices([m for m, _ in mix], weights=[w for _, w in mix])[0]


def check_char(first17: str) -> str:
    """The GB 11643 check character of the first 17 digits."""
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True)) % 11]


def id_number(region: str, birth: dt.date, sequence: int) -> str:
    """An 18-character resident ID number with a correct check character."""
    first17 = f"{region}{birth:%Y%m%d}{sequence % 1000:03d}"
    return first17 + check_char(first17)


def valid_id(value: str) -> bool:
    """True when ``value`` is 18 characters with a correct check character."""
    return len(value) == 18 and value[:17].isdigit() and check_char(value[:17]) == value[17].upper()


def make_person(rng: random.Random, region: str, sequence: int) -> Person:
    """One insured person of ``region``."""
    insurance = pick(rng, INSURANCE_MIX)
    assert isinstance(insurance, InsuranceType)
    age = rng.randint(60, 85) if insurance is InsuranceType.RETIRED_CADRE else rng.randint(18, 88)
    birth = dt.date(2026 - age, rng.randint(1, 12), rng.randint(1, 28))
    name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.randint(1, 2)))
    return Person(
        person_id=id_number(region, birth, sequence),
        name=name,
        insurance_type=insurance,
        home_region=region,
        assistance_eligible=rng.random() < ASSISTANCE_SHARE,
    )


def opaque_token(rng: random.Random) -> str:
    """The opaque part of a generated id (a filing's): drawn from the seeded generator, so
    the same seed gives the same ids, and nothing of the person (ID number, name, birth date)
    is in it or can be derived from it."""
    return "".join(rng.choice(ID_LETTERS) for _ in range(ID_TOKEN_LENGTH))


def keyed_token(key: str, value: str) -> str:
    """An opaque token that is always the same for ``value`` under ``key`` (HMAC-SHA256,
    spelt in :data:`ID_LETTERS`): for an id that must be found again from the person (a
    visit resumed after a restart) without carrying anything of them. A plain hash would not
    do: an ID number has few enough possible values to hash them all and look one up."""
    digest = int.from_bytes(hmac.new(key.encode(), value.encode(), hashlib.sha256).digest())
    letters = []
    for _ in range(ID_TOKEN_LENGTH):
        digest, index = divmod(digest, len(ID_LETTERS))
        letters.append(ID_LETTERS[index])
    return "".join(letters)


def make_filing(
    rng: random.Random,
    person: Person,
    host: str,
    *,
    filed_at: dt.datetime,
    action: FilingAction = FilingAction.CREATE,
    filing_id: str | None = None,
) -> FilingUpload:
    """A filing of ``person`` to ``host`` (a province or city code, never a hospital). Its
    default id is ``F-<home region>-<opaque token>-<host>`` (:func:`opaque_token`): an id
    travels in logs, URLs and reports beside the masked person, and once carried the last six
    characters of the ID number."""
    reason = pick(rng, REASON_MIX)
    channel = pick(rng, CHANNEL_MIX)
    assert isinstance(reason, FilingReason)
    assert isinstance(channel, FilingChannel)
    temporary = reason in (FilingReason.TEMPORARY, FilingReason.REFERRAL, FilingReason.EMERGENCY)
    valid_from = filed_at.date() - dt.timedelta(days=rng.randint(0, 200))
    return FilingUpload(
        filing_id=filing_id or f"F-{person.home_region}-{opaque_token(rng)}-{host}",
        action=action,
        person_id=person.person_id,
        person_name=person.name,
        insurance_type=person.insurance_type,
        home_region=person.home_region,
        host_region=host,
        reason=reason,
        channel=channel,
        valid_from=valid_from,
        valid_until=filed_at.date() + dt.timedelta(days=180) if temporary else None,
        referral_hospital=None,
        filed_at=filed_at,
    )


_LINES_BY_VISIT = {
    VisitType.INPATIENT: (6, 14),
    VisitType.OUTPATIENT: (1, 4),
    VisitType.CHRONIC_OUTPATIENT: (2, 5),
    VisitType.PHARMACY: (1, 3),
}


def make_bill(
    rng: random.Random, catalogue: Mapping[str, CatalogueItem], visit: VisitType, days: int
) -> tuple[ClaimItem, ...]:
    """A bill drawn from the host catalogue: drugs, treatments, and facility fees per day."""
    items = sorted(catalogue.values(), key=lambda i: i.item_code)
    drugs = [i for i in items if i.category is ItemCategory.DRUG]
    others = [i for i in items if i.category is not ItemCategory.DRUG]
    facility = [i for i in items if i.category is ItemCategory.FACILITY]
    low, high = _LINES_BY_VISIT[visit]
    pool = drugs if visit is VisitType.PHARMACY else drugs + others
    chosen = rng.sample(pool, min(len(pool), rng.randint(low, high)))
    if visit is VisitType.INPATIENT and facility:
        chosen += [f for f in facility if f not in chosen][:2]
    lines = []
    for item in chosen:
        if item.category is ItemCategory.FACILITY and visit is VisitType.INPATIENT:
            quantity = days * 1000
        elif item.category is ItemCategory.DRUG:
            quantity = rng.randint(1, 20) * 1000 + rng.choice((0, 0, 500))
        else:
            quantity = rng.randint(1, 3) * 1000
        lines.append(
            ClaimItem(
                item_code=item.item_code,
                item_name=item.item_name,
                category=item.category,
                catalogue_class=item.catalogue_class,
                quantity_milli=quantity,
                unit_price_fen=item.unit_price_fen,
                amount_fen=item_amount_fen(quantity, item.unit_price_fen),
            )
        )
    return tuple(lines)


def make_visit(rng: random.Random) -> tuple[VisitType, int, tuple[str, ...]]:
    """Visit type, length in days, diagnoses."""
    visit = pick(rng, VISIT_MIX)
    assert isinstance(visit, VisitType)
    days = rng.randint(2, 21) if visit is VisitType.INPATIENT else 0
    return visit, days, tuple(rng.sample(DIAGNOSES, rng.randint(1, 2)))
