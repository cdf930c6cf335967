"""The directory: default Hainan network, queries, JSON view, and errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.directory import (
    DEFAULT_PATH,
    Agreement,
    Directory,
    DirectoryError,
    default,
    load,
    province_of,
)
from adapters.fixtures import LAO_ZHANG_HOSPITAL, hebei_policy, lao_zhang_claim
from adapters.rules import YearUsage, review
from bus.models import CatalogueClass, InsuranceType, SettlementMode

HAINAN = "460000"

SMALL = """\
[[regions]]
code = "460100"
name = "海口市"

[[regions]]
code = "130100"
name = "石家庄市"

[[hospitals]]
code = "H46010001"
name = "海南省人民医院"
level = 3
region = "460100"

[[hospitals]]
code = "H46010002"
name = "海南医学院第一附属医院"
level = 3
region = "460100"

[[agreements]]
home = "130100"
host = "460000"
mode = "DELAYED"
hospitals = ["H46010001"]

[[policies]]
home_region = "130100"
class_b_self_permille = 100
critical_illness = { threshold_fen = 1500000, ratio_permille = 600, annual_cap_fen = 30000000 }
assistance = { ratio_permille = 700, annual_cap_fen = 5000000 }

[[policies.tiers]]
insurance_type = "EMPLOYEE"
hospital_level = 3
deductible_fen = 120000
ratio_permille = 800
annual_cap_fen = 30000000

[[catalogues]]
host = "460000"

[[catalogues.items]]
item_code = "D001"
item_name = "阿莫西林胶囊"
category = "DRUG"
catalogue_class = "A"
unit_price_fen = 1250
"""


def write(tmp_path: Path, text: str) -> Path:
    """Write a directory file into tmp_path."""
    path = tmp_path / "directory.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_small_file_loads(tmp_path: Path) -> None:
    """A minimal valid file loads and answers queries."""
    d = load(write(tmp_path, SMALL))
    assert d.region("460100") is not None
    assert d.max_advance_permille(HAINAN) == 250
    assert d.province_name(HAINAN) == HAINAN


def test_default_loads_and_is_cached() -> None:
    """The packaged default directory loads once and is shared."""
    d = default()
    assert d is Directory.default()
    assert d.source == str(DEFAULT_PATH)
    assert d.province_name(HAINAN) == "海南省"


def test_default_hainan_network() -> None:
    """Hainan has designated hospitals of level 3 and 2 in Haikou, Sanya and Qionghai."""
    d = default()
    hospitals = d.hospitals_of(HAINAN)
    assert len(hospitals) >= 12
    assert {h.region for h in hospitals} == {"460100", "460200", "469002"}
    assert sum(h.level in (2, 3) for h in hospitals) >= len(hospitals) - 1
    general = d.hospital("H46010001")
    assert general is not None
    assert (general.name, general.level, general.province) == ("海南省人民医院", 3, HAINAN)


@pytest.mark.parametrize(
    ("home", "mode"),
    [
        ("440100", SettlementMode.INSTANT),
        ("500100", SettlementMode.INSTANT),
        ("650100", SettlementMode.INSTANT),
        ("530100", SettlementMode.INSTANT),
        ("620100", SettlementMode.DELAYED),
        ("210100", SettlementMode.DELAYED),
        ("150100", SettlementMode.DELAYED),
        ("610100", SettlementMode.DELAYED),
        ("140100", SettlementMode.DELAYED),
        ("130100", SettlementMode.DELAYED),
    ],
)
def test_hainan_partners_and_modes(home: str, mode: SettlementMode) -> None:
    """Each partner of seed 003 settles in Hainan in the article's mode and has a policy."""
    d = default()
    agreement = d.agreement(home, HAINAN)
    assert agreement is not None
    assert agreement.mode == mode
    assert d.policy(home) is not None
    assert d.allowed_hospitals(home, HAINAN)


def test_point_to_point_zhanjiang() -> None:
    """Haikou insured settle point-to-point with exactly three Zhanjiang hospitals."""
    d = default()
    agreement = d.agreement("460100", "440000")
    assert agreement is not None
    assert agreement.mode == SettlementMode.POINT_TO_POINT
    allowed = d.allowed_hospitals("460100", "440000")
    assert len(allowed) == 3
    assert {h.region for h in allowed} == {"440800"}
    assert not d.allows(agreement, "H44010001")  # a Guangzhou hospital


def test_traffic_flows_both_ways() -> None:
    """Hainan is home as well as host, so it appears on both sides of agreements."""
    d = default()
    assert {a.host for a in d.agreements_as_home(HAINAN)} == {"440000", "530000", "130000"}
    assert len(d.agreements_as_host(HAINAN)) == 10
    assert d.home_regions_of(HAINAN) == ("460100",)
    for host in ("440000", "530000", "130000", HAINAN):
        assert d.catalogue(host), host
        assert d.hospitals_of(host), host


def test_allows_all_and_lists() -> None:
    """'all' allows every hospital of the host province only; a list allows just its codes."""
    d = default()
    everything = d.agreement("210100", HAINAN)
    listed = d.agreement("620100", HAINAN)
    assert everything is not None
    assert listed is not None
    assert everything.hospitals == "all"
    assert all(d.allows(everything, h.code) for h in d.hospitals_of(HAINAN))
    assert not d.allows(everything, "H53010001")  # Kunming, another province
    assert not d.allows(everything, "H99999999")
    assert isinstance(listed.hospitals, tuple)
    assert 3 <= len(listed.hospitals) <= 5
    assert d.allows(listed, listed.hospitals[0])
    assert not d.allows(listed, "H46900201")
    assert [h.code for h in d.allowed_hospitals("620100", HAINAN)] == sorted(listed.hospitals)


def test_agreement_lookup_normalises_host_region() -> None:
    """A host given as a city code finds the province's agreement; no agreement gives None."""
    d = default()
    assert d.agreement("130100", "460100") == d.agreement("130100", HAINAN)
    assert d.agreement("620100", "530000") is None
    assert d.allowed_hospitals("620100", "530000") == ()
    assert province_of("469002") == HAINAN


def test_provinces_and_settings() -> None:
    """provinces() lists every province code sorted; advance limits are at most 25%."""
    d = default()
    provinces = d.provinces()
    assert list(provinces) == sorted(provinces)
    assert {"460000", "130000", "440000", "500000", "650000", "530000"} <= set(provinces)
    assert all(d.max_advance_permille(p) <= 250 for p in provinces)
    assert d.max_advance_permille(HAINAN) == 250


def test_catalogues_are_realistic() -> None:
    """Each host catalogue holds 25-40+ items mixing A, B and self-pay with positive prices."""
    d = default()
    for host in ("440000", "530000", "130000", HAINAN):
        items = d.catalogue(host)
        assert 25 <= len(items) <= 50
        assert {i.catalogue_class for i in items.values()} == set(CatalogueClass) - {
            CatalogueClass.UNKNOWN
        }
        assert all(i.unit_price_fen > 0 for i in items.values())
    classes = d.catalogue_classes(HAINAN)
    assert classes["D001"] == CatalogueClass.A
    assert d.catalogue("620000") == {}


def test_every_home_region_has_full_policy() -> None:
    """Every home region's policy has a tier for each insurance type and hospital level."""
    d = default()
    for agreement in d.agreements():
        policy = d.policy(agreement.home)
        assert policy is not None
        for insurance_type in set(InsuranceType) - {InsuranceType.UNKNOWN}:
            for level in (1, 2, 3):
                policy.tier(insurance_type, level)


def test_hebei_policy_is_lao_zhangs() -> None:
    """Shijiazhuang's policy in the default file is the Lao Zhang fixture policy."""
    d = default()
    assert d.policy("130100") == hebei_policy()
    tier = hebei_policy().tier(InsuranceType.EMPLOYEE, 3)
    assert (tier.deductible_fen, tier.ratio_permille) == (120_000, 800)


def test_lao_zhang_under_default_directory() -> None:
    """Lao Zhang's bill reviewed under the Hainan catalogue gives the seed's 17,500 / 7,500."""
    d = default()
    claim = lao_zhang_claim()
    agreement = d.agreement(claim.home_region, claim.host_region)
    assert agreement is not None
    assert d.allows(agreement, LAO_ZHANG_HOSPITAL)
    assert {i.item_code for i in claim.items} <= set(d.catalogue(HAINAN))
    policy = d.policy(claim.home_region)
    assert policy is not None
    r = review(
        claim,
        policy,
        YearUsage(),
        insurance_type=InsuranceType.EMPLOYEE,
        assistance_eligible=False,
        catalogue_classes=d.catalogue_classes(HAINAN),
    )
    assert (r.fund_fen, r.personal_fen) == (1_750_000, 750_000)


def test_to_json_dict_shape() -> None:
    """to_json_dict() has the documented keys and is JSON-serialisable."""
    data = default().to_json_dict()
    json.dumps(data, ensure_ascii=False)
    assert {"regions", "hospitals", "agreements", "catalogues"} <= set(data)
    assert {"code", "name", "province"} <= set(data["regions"][0])
    assert {"code", "name", "level", "region"} <= set(data["hospitals"][0])
    modes = {a["mode"] for a in data["agreements"]}
    assert modes == {"INSTANT", "DELAYED", "POINT_TO_POINT"}
    assert any(a["hospitals"] == "all" for a in data["agreements"])
    assert any(isinstance(a["hospitals"], list) for a in data["agreements"])
    item = data["catalogues"][0]["items"][0]
    assert {"item_code", "item_name", "category", "catalogue_class"} <= set(item)


# --- Errors -----------------------------------------------------------------------------------
def test_invalid_level_names_file_line_and_field(tmp_path: Path) -> None:
    """A hospital level outside 1-3 is reported with the file, the field path and the line."""
    text = SMALL.replace(
        'code = "H46010002"\nname = "海南医学院第一附属医院"\nlevel = 3',
        ('code = "H46010002"\nname = "海南医学院第一附属医院"\nlevel = 4'),
    )
    path = write(tmp_path, text)
    with pytest.raises(DirectoryError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "hospitals[1].level" in message
    assert "line 18" in message  # `level = 4`
    assert "entry starts at line 15" in message  # the second [[hospitals]]
    (problem,) = caught.value.problems
    assert (problem.path, problem.line, problem.entry_line) == ("hospitals[1].level", 18, 15)


def test_nested_field_line(tmp_path: Path) -> None:
    """An error inside a policy tier points at the tier's own line."""
    text = SMALL.replace("ratio_permille = 800", "ratio_permille = 1800")
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, text))
    (problem,) = caught.value.problems
    assert problem.path == "policies[0].tiers[0].ratio_permille"
    assert (problem.line, problem.entry_line) == (37, 27)


def test_inline_array_row_line(tmp_path: Path) -> None:
    """An error in one row of an inline-table array points at that row's line."""
    lines = DEFAULT_PATH.read_text(encoding="utf-8").splitlines()
    first_policy = lines.index("[[policies]]")
    row = next(i for i, line in enumerate(lines) if "RESIDENT" in line and i > first_policy)
    lines[row] = lines[row].replace("ratio_permille = ", "ratio_permille = 1")
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, "\n".join(lines)))
    (problem,) = caught.value.problems
    assert problem.path == "policies[0].tiers[3].ratio_permille"
    assert (problem.line, problem.entry_line) == (row + 1, first_policy + 1)


def test_float_money_rejected(tmp_path: Path) -> None:
    """Money must be integer fen: a float price is an error."""
    with pytest.raises(DirectoryError, match=r"catalogues\[0\]\.items\[0\]\.unit_price_fen"):
        load(write(tmp_path, SMALL.replace("unit_price_fen = 1250", "unit_price_fen = 12.5")))


def test_duplicate_hospital_code_rejected(tmp_path: Path) -> None:
    """Two hospitals with one code are rejected at the second one's line."""
    text = SMALL.replace('code = "H46010002"', 'code = "H46010001"')
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, text))
    (problem,) = caught.value.problems
    assert problem.path == "hospitals[1]"
    assert problem.line == 15
    assert "duplicate hospital code H46010001" in problem.message


def test_cross_reference_errors(tmp_path: Path) -> None:
    """Unknown regions, hospitals of another province and a home without policy are reported."""
    text = (
        SMALL.replace(
            'region = "460100"\n\n[[agreements]]', 'region = "469999"\n\n[[agreements]]'
        ).replace('hospitals = ["H46010001"]', 'hospitals = ["H46010001", "H13019999"]')
        + '\n[[agreements]]\nhome = "460100"\nhost = "130000"\nmode = "INSTANT"\n'
        + 'hospitals = "all"\n'
    )
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, text))
    paths = {p.path: p.message for p in caught.value.problems}
    assert paths["hospitals[1].region"] == "unknown region 469999"
    assert paths["agreements[0].hospitals[1]"] == "unknown hospital H13019999"
    assert "460100 has no policy" in paths["agreements[1].home"]
    assert "130000 has no hospitals" in paths["agreements[1].host"]
    assert all(p.line is not None for p in caught.value.problems)


def test_hospital_outside_host_province_rejected() -> None:
    """An agreement may list only hospitals of its host province."""
    d = Directory.from_toml(SMALL)
    data = d.data
    outside = data.hospitals[0].model_copy(update={"code": "H13010001", "region": "130100"})
    agreement = Agreement(
        home="130100", host="460000", mode=SettlementMode.INSTANT, hospitals=("H13010001",)
    )
    changed = data.model_copy(
        update={"hospitals": (*data.hospitals, outside), "agreements": (agreement,)}
    )
    with pytest.raises(DirectoryError, match="not in host province 460000"):
        Directory(changed)


def test_unknown_section_and_bad_toml(tmp_path: Path) -> None:
    """A misspelt section and broken TOML syntax are both reported with a line."""
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, SMALL + '\n[[hospital]]\ncode = "X"\n'))
    (problem,) = caught.value.problems
    assert problem.path == "hospital"
    assert problem.line == SMALL.count("\n") + 2
    with pytest.raises(DirectoryError, match="line 2"):
        load(write(tmp_path, '[[regions]]\ncode = "460100\n'))
    with pytest.raises(DirectoryError, match="No such file"):
        load(tmp_path / "missing.toml")


# --- Agencies (经办机构) ------------------------------------------------------------------------
AGENCY = """
[[agencies]]
code = "AG-460000"
name = "海南省医疗保障局异地就医结算中心"
region = "460100"
phone = "0898-12333001"
address = "海南省海口市美兰区海府路 59 号"
"""


def test_default_agencies_one_per_province_plus_two_cities() -> None:
    """Every province of the default directory has an agency; Shijiazhuang and Haikou have a
    city agency too; the query filters by province (a region code counts as its province)."""
    d = default()
    agencies = d.agencies()
    assert {a.province for a in agencies} == {p.code for p in d.data.provinces}
    assert {a.region for a in agencies if a.name.startswith(("石家庄", "海口"))} == {
        "130100",
        "460100",
    }
    hebei = d.agencies("130000")
    assert next(a.name for a in hebei) == "河北省医疗保障局异地就医结算中心"
    assert len(hebei) == 2
    assert d.agencies("460100") == d.agencies("460000")
    assert all(a.phone and a.address for a in agencies)
    assert d.agencies("990000") == ()


def test_agencies_are_optional_and_load(tmp_path: Path) -> None:
    """A file without [[agencies]] loads with none; one with a valid entry lists it."""
    assert load(write(tmp_path, SMALL)).agencies() == ()
    (agency,) = load(write(tmp_path, SMALL + AGENCY)).agencies()
    assert (agency.code, agency.province, agency.hours) == ("AG-460000", HAINAN, None)


def test_agency_unknown_region_names_its_line(tmp_path: Path) -> None:
    """An agency in a region the directory lacks is reported at its region's line."""
    text = SMALL + AGENCY.replace('region = "460100"', 'region = "469999"')
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, text))
    (problem,) = caught.value.problems
    assert problem.path == "agencies[0].region"
    assert problem.message == "unknown region 469999"
    start = SMALL.count("\n") + 2  # the [[agencies]] header
    assert (problem.line, problem.entry_line) == (start + 3, start)
    assert f"line {start + 3}: agencies[0].region" in str(caught.value)


def test_agency_duplicate_code_and_bad_phone(tmp_path: Path) -> None:
    """A second agency with the same code, and a phone with letters, are both reported."""
    text = SMALL + AGENCY + AGENCY.replace('"0898-12333001"', '"call us"')
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, text))
    (problem,) = caught.value.problems  # field errors first: cross-checks need valid data
    assert problem.path == "agencies[1].phone"
    assert problem.line == SMALL.count("\n") + AGENCY.count("\n") + 6
    with pytest.raises(DirectoryError) as caught:
        load(write(tmp_path, SMALL + AGENCY + AGENCY))
    (problem,) = caught.value.problems
    assert problem.path == "agencies[1]"
    assert "duplicate agency code AG-460000" in problem.message
    assert problem.line == SMALL.count("\n") + AGENCY.count("\n") + 2
