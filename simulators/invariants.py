"""The demo's facts, the invariants checked on them, and the report a person reads.

:func:`check_invariants` is a pure function of :class:`Facts`, so a test can plant a fault in
the facts and see the check fail.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.rules import MAX_ADVANCE_PERMILLE, max_advance_fen
from bus.models import yuan

TERMINAL = ("SETTLED", "REFUSED", "CLOSED_BY_OPERATOR", "REVERSED")
"""Host claim states that end a claim (adapters.backoffice.TERMINAL_STATES)."""
PAID = ("SETTLED", "REFUSED")
"""Terminal states whose money the conservation check covers (a claim closed by an operator
was never reviewed: no fund share, the patient's net is the advance or nothing)."""


@dataclass
class ClaimFact:
    """What the host and the home recorded about one claim."""

    claim_id: str
    host: str
    home: str
    mode: str
    state: str
    expected: str
    """SETTLED, or the error code the injected fault should produce."""
    error_code: str | None
    total_fen: int
    fund_fen: int = 0
    critical_illness_fen: int = 0
    assistance_fen: int = 0
    personal_fen: int = 0
    payments: list[tuple[str, int]] = field(default_factory=list)
    notices_at_home: int = 0
    reviews_at_home: int = 0
    advance_cap_permille: int = MAX_ADVANCE_PERMILLE


@dataclass
class Facts:
    """Everything the checker and the report read."""

    claims: list[ClaimFact] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)
    """(expected code, actual code) of admissions refused at the desk."""
    refusal_reports: Counter[str] = field(default_factory=Counter)
    """Admission ErrorReports received by the homes, by code."""
    dead_letters_expected: int = 0
    dead_letters_seen: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    """Every ErrorReport on the error topics: code, origin, responsible, correlation id."""
    latencies: dict[str, list[float]] = field(default_factory=dict)
    duration_s: float = 0.0
    fallbacks: int = 0
    review_decisions: Counter[str] = field(default_factory=Counter)
    """Decisions of the simulated reviewers: approve, adjust, reject (closed, failed)."""
    max_backlog: int = 0
    """The most reviews waiting at the homes' desks at once."""
    acknowledged: int = 0
    """Host claims whose request the home acknowledged (held for review)."""
    open_reviews_left: int = 0
    """Reviews still open at the homes' desks when the day ended (should be none)."""
    reversals_planted: int = 0
    """Settled claims cancelled at the end of the day (and confirmed by their homes)."""
    planted_mismatch: tuple[str, str, str] | None = None
    """(host, home, claim id) of the settlement notice lost on purpose before reconciling."""
    clearing: list[dict[str, Any]] = field(default_factory=list)
    """The month's clearing per pair (host side, latest version): host, home, month, outcome,
    version, claims, stated_fen, confirmed_fen, disputed_fen."""
    reconciliations: list[dict[str, Any]] = field(default_factory=list)
    """Every statement of the day: host, home, round (first, again; ``peer N`` with a
    province run elsewhere), outcome, count, fund_fen, differences (claim_id, kind,
    responsible)."""
    day_heard: list[dict[str, str]] = field(default_factory=list)
    """As home, with provinces run elsewhere: per host that receipted our filings, the outcome
    of the latest statement of its day that our home answered (host, home, outcome;
    ``NOT STATED``: none came)."""


@dataclass
class Check:
    """One invariant and whether it holds."""

    name: str
    ok: bool
    detail: str


def _paid_by_patient(c: ClaimFact) -> int:
    sign = {
        "ADVANCE": 1, "TOP_UP": 1, "FULL": 1, "REFUND": -1,
        "REVERSAL_REFUND": -1, "REVERSAL_RECOVERY": 1,
    }  # fmt: skip
    return sum(sign.get(kind, 0) * fen for kind, fen in c.payments)


def check_invariants(facts: Facts) -> list[Check]:
    """Every claim terminal exactly once, money conserved, advances within the cap, every
    injected fault surfaced as its code."""
    checks: list[Check] = []
    not_terminal = [c.claim_id for c in facts.claims if c.state not in TERMINAL]
    checks.append(
        Check(
            "every claim reached exactly one terminal state",
            not not_terminal
            and all(
                sum(1 for k, _ in c.payments if k in ("TOP_UP", "REFUND", "FULL")) <= 1
                for c in facts.claims
            )
            and all(c.notices_at_home <= 1 and c.reviews_at_home <= 1 for c in facts.claims),
            f"{len(facts.claims) - len(not_terminal)}/{len(facts.claims)} terminal"
            + (f"; open: {', '.join(not_terminal[:5])}" if not_terminal else ""),
        )
    )
    bad_money = []
    for c in facts.claims:
        paid = _paid_by_patient(c)
        if c.state == "SETTLED":
            split = c.fund_fen + c.critical_illness_fen + c.assistance_fen + c.personal_fen
            if split != c.total_fen or paid != c.personal_fen:
                bad_money.append(c.claim_id)
        elif (c.state == "REFUSED" and paid != c.total_fen) or (
            c.state == "REVERSED" and paid != 0
        ):
            bad_money.append(c.claim_id)
    total = sum(c.total_fen for c in facts.claims if c.state in PAID)
    funds = sum(
        c.fund_fen + c.critical_illness_fen + c.assistance_fen
        for c in facts.claims
        if c.state == "SETTLED"
    )
    patients = sum(_paid_by_patient(c) for c in facts.claims if c.state in PAID)
    checks.append(
        Check(
            "money is conserved per claim and in total",
            not bad_money and total == funds + patients,
            f"total {yuan(total)} = funds {yuan(funds)} + patients {yuan(patients)}"
            + (f"; broken: {', '.join(bad_money[:5])}" if bad_money else ""),
        )
    )
    over = [
        c.claim_id
        for c in facts.claims
        for kind, fen in c.payments
        if kind == "ADVANCE" and fen > max_advance_fen(c.total_fen, c.advance_cap_permille)
    ]
    checks.append(
        Check(
            "no advance above 25% of the total (or the host's lower cap)",
            not over,
            f"{sum(1 for c in facts.claims for k, _ in c.payments if k == 'ADVANCE')} advances"
            + (f"; over: {', '.join(over[:5])}" if over else ""),
        )
    )
    wrong = [
        f"{c.claim_id}: expected {c.expected}, got {c.error_code or c.state}"
        for c in facts.claims
        if (c.error_code or c.state) != c.expected
    ]
    wrong += [f"admission: expected {e}, got {a}" for e, a in facts.refusals if e != a]
    expected_reports = Counter(e for e, _ in facts.refusals)
    missing_reports = {
        code: n - facts.refusal_reports[code]
        for code, n in expected_reports.items()
        if facts.refusal_reports[code] < n
    }
    if missing_reports:
        wrong.append(f"homes missed admission reports: {missing_reports}")
    if facts.dead_letters_seen != facts.dead_letters_expected:
        wrong.append(
            f"dead letters: expected {facts.dead_letters_expected}, saw {facts.dead_letters_seen}"
        )
    injected = sum(1 for c in facts.claims if c.expected != "SETTLED") + len(facts.refusals)
    checks.append(
        Check(
            "every injected fault surfaced as the expected error code",
            not wrong,
            f"{injected} faults + {facts.dead_letters_expected} undecodable records"
            + (f"; wrong: {'; '.join(wrong[:5])}" if wrong else ""),
        )
    )
    decided = sum(facts.review_decisions[k] for k in ("approve", "adjust", "reject"))
    checks.append(
        Check(
            "no review left open at the homes' desks, no decision failed",
            facts.open_reviews_left == 0 and facts.review_decisions["failed"] == 0,
            f"{facts.open_reviews_left} open; {decided} decided by this run's reviewers, "
            f"{facts.review_decisions['failed']} failed; {facts.acknowledged} of our claims "
            "acknowledged by their homes",
        )
    )
    checks.append(_reconciled(facts))
    checks.append(_cleared(facts))
    return checks


def _cleared(facts: Facts) -> Check:
    """Month-end clearing: every pair CONFIRMED, and what each home confirmed it owes equals
    the fund, critical-illness and assistance shares of the claims its host settled with it
    (reversed ones owe nothing)."""
    name = "month-end clearing: each home owes its hosts the settled claims, net of reversals"
    if not facts.clearing:
        return Check(name, True, "no claims settled between simulated provinces")
    owed: Counter[tuple[str, str]] = Counter()
    for c in facts.claims:
        if c.state == "SETTLED":
            owed[(c.host, c.home)] += c.fund_fen + c.critical_illness_fen + c.assistance_fen
    problems = []
    for row in facts.clearing:
        pair = (row["host"], row["home"])
        if row["outcome"] != "CONFIRMED" or row["confirmed_fen"] != owed[pair]:
            problems.append(
                f"{pair[0]}->{pair[1]}: {row['outcome']}, confirmed {yuan(row['confirmed_fen'])}"
                f", settled {yuan(owed[pair])}"
            )
    stated = {(r["host"], r["home"]) for r in facts.clearing}
    problems += [f"{h}->{m}: not stated" for (h, m), fen in owed.items() if (h, m) not in stated]
    total = sum(r["confirmed_fen"] for r in facts.clearing)
    return Check(
        name,
        not problems,
        f"{len(facts.clearing)} pairs, {yuan(total)} yuan confirmed, "
        f"{facts.reversals_planted} reversed claims owing nothing"
        + (f"; {'; '.join(problems[:4])}" if problems else ""),
    )


def _reconciled(facts: Facts) -> Check:
    """The day reconciles for every pair: the first round finds exactly the planted lost
    notice, as MISSING_AT_HOME with its host responsible, reported to it; after the host
    re-sent it, every pair's latest statement is MATCHED."""
    name = "the day reconciles for every pair; the planted lost notice found and attributed"
    if not facts.reconciliations and not facts.day_heard:
        return Check(name, True, "no claims settled between simulated provinces")
    first = [r for r in facts.reconciliations if r["round"] == "first"]
    found = [(r["host"], d) for r in first for d in r["differences"]]
    latest: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for r in facts.reconciliations:  # per pair and day (a run across midnight states two)
        latest[(r["host"], r["home"], r.get("day"))] = r
    unmatched = [
        f"{h}->{m}" + (f" {d}" if d else "") + f": {r['outcome']}"
        for (h, m, d), r in latest.items()
        if r["outcome"] != "MATCHED"
    ]
    planted = facts.planted_mismatch
    problems = list(unmatched)
    problems += [
        f"{h['host']}->{h['home']}: {h['outcome']} (as home)"
        for h in facts.day_heard
        if h["outcome"] != "MATCHED"
    ]
    if planted is not None:
        host, _, claim_id = planted
        expected = [(host, {"claim_id": claim_id, "kind": "MISSING_AT_HOME", "responsible": host})]
        if found != expected:
            problems.append(f"found {found[:3]}, expected the lost notice of {claim_id}")
        reported = any(
            e.get("code") == "RECONCILIATION_MISMATCH" and e.get("responsible") == host
            for e in facts.errors
        )
        if not reported:
            problems.append(f"no RECONCILIATION_MISMATCH report to {host}")
    elif found:
        problems.append(f"unplanted differences: {found[:3]}")
    return Check(
        name,
        not problems,
        f"{len({(h, m) for h, m, _ in latest})} pairs, {len(first)} statements, "
        f"{sum(r['count'] for r in latest.values())} claims stated"
        + (f"; {len(facts.day_heard)} days stated to us" if facts.day_heard else "")
        + (f"; {len(found)} difference found and put right" if planted and not problems else "")
        + (f"; {'; '.join(problems[:4])}" if problems else ""),
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_report(facts: Facts, checks: list[Check], meta: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable report."""
    by_mode: dict[str, Counter[str]] = defaultdict(Counter)
    for c in facts.claims:
        by_mode[c.mode][c.error_code or c.state] += 1
    money = Counter[str]()
    for c in facts.claims:
        if c.state not in TERMINAL:
            continue
        money["total"] += c.total_fen
        money["fund"] += c.fund_fen
        money["critical_illness"] += c.critical_illness_fen
        money["assistance"] += c.assistance_fen
        money["personal"] += _paid_by_patient(c)
        for kind, fen in c.payments:
            money[{"ADVANCE": "advances", "REFUND": "refunds", "TOP_UP": "top_ups",
                   "REVERSAL_REFUND": "reversal_refunds",
                   "REVERSAL_RECOVERY": "reversal_recoveries"}.get(
                kind, "paid_in_full")] += fen  # fmt: skip
    errors = Counter((e["code"], e["responsible"]) for e in facts.errors)
    return {
        "meta": meta,
        "claims_by_mode": {m: dict(v) for m, v in sorted(by_mode.items())},
        "admissions_refused": dict(Counter(a for _, a in facts.refusals)),
        "money_fen": dict(money),
        "errors_by_code_and_responsible": [
            {"code": code, "responsible": resp, "count": n}
            for (code, resp), n in sorted(errors.items())
        ],
        "dead_letters": facts.dead_letters_seen,
        "fallbacks_instant_to_delayed": facts.fallbacks,
        "reviews": {
            "acknowledged": facts.acknowledged,
            "decisions": dict(facts.review_decisions),
            "max_backlog": facts.max_backlog,
        },
        "latency_s": {
            mode: {
                "p50": _pct(v, 0.5),
                "p95": _pct(v, 0.95),
                "p99": _pct(v, 0.99),
                "n": len(v),
            }
            for mode, v in sorted(facts.latencies.items())
        },
        "throughput_claims_per_s": round(len(facts.claims) / facts.duration_s, 1)
        if facts.duration_s
        else 0.0,
        "duration_s": round(facts.duration_s, 2),
        "reversals": facts.reversals_planted,
        "clearing": facts.clearing,
        "reconciliation": {
            "planted_lost_notice": None
            if facts.planted_mismatch is None
            else dict(zip(("host", "home", "claim_id"), facts.planted_mismatch, strict=True)),
            "statements": facts.reconciliations,
            "stated_to_us": facts.day_heard,
        },
        "invariants": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def render(report: dict[str, Any]) -> str:
    """The report a person reads at a glance."""
    lines = ["", "== xsettle: a day of cross-province settlement =="]
    meta = report["meta"]
    lines.append(
        f"claims {meta.get('claims')}  seed {meta.get('seed')}  broker {meta.get('broker')}  "
        f"{report['duration_s']} s  {report['throughput_claims_per_s']} claims/s"
    )
    lines.append("\nClaims by mode and outcome")
    for mode, outcomes in report["claims_by_mode"].items():
        parts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        lines.append(f"  {mode:<16}{parts}")
    if report["admissions_refused"]:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(report["admissions_refused"].items()))
        lines.append(f"  {'refused at desk':<16}{parts}")
    lines.append(
        f"  instant claims that fell back to delayed: {report['fallbacks_instant_to_delayed']}"
    )
    rv = report.get("reviews", {})
    if rv.get("decisions") or rv.get("acknowledged"):
        d = rv["decisions"]
        lines.append(
            f"  held for review: {rv['acknowledged']} claims acknowledged by their homes at "
            f"once; the reviewers decided later: {d.get('approve', 0)} approved, "
            f"{d.get('adjust', 0)} adjusted, {d.get('reject', 0)} rejected; backlog up to "
            f"{rv['max_backlog']}"
        )
    lines.append("\nMoney (yuan)")
    for key in ("total", "fund", "critical_illness", "assistance", "personal", "advances",
                "refunds", "top_ups", "paid_in_full", "reversal_refunds",
                "reversal_recoveries"):  # fmt: skip
        lines.append(f"  {key:<18}{yuan(report['money_fen'].get(key, 0)):>18}")
    lines.extend(_render_day_close(report))
    lines.append("\nError reports by code and responsible province")
    for row in report["errors_by_code_and_responsible"]:
        lines.append(f"  {row['code']:<26}{row['responsible']:<10}{row['count']:>6}")
    lines.append(f"  dead letters: {report['dead_letters']}")
    lines.append("\nAnswer latency (s)")
    for mode, q in report["latency_s"].items():
        lines.append(
            f"  {mode:<16}p50 {q['p50']:.3f}  p95 {q['p95']:.3f}  p99 {q['p99']:.3f}  n={q['n']}"
        )
    lines.append("\nInvariants")
    for c in report["invariants"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
    lines.append("")
    lines.append("ALL INVARIANTS HOLD" if report["ok"] else "INVARIANTS FAILED")
    return "\n".join(lines)


def _render_day_close(report: dict[str, Any]) -> list[str]:
    """The end of the day: reversals and the reconciliation table (host -> home)."""
    rec = report.get("reconciliation") or {}
    statements = rec.get("statements") or []
    heard = rec.get("stated_to_us") or []
    if not statements and not heard and not report.get("reversals"):
        return []
    lines = [f"\nEnd of the day: {report.get('reversals', 0)} settled claims reversed (duplicate "
             "bills), then daily reconciliation (对账), host -> home"]  # fmt: skip
    lines.append(f"  {'pair':<16}{'claims':>7}{'fund (yuan)':>16}  outcome")
    final: dict[tuple[str, str], dict[str, Any]] = {}
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in statements:
        key = (r["host"], r["home"])
        final[key] = r
        first.setdefault(key, r)
    for (host, home), r in sorted(final.items()):
        was = first.get((host, home), r)
        outcome = r["outcome"]
        if was is not r:
            outcome = f"{was['outcome']} -> {r['outcome']} (restated)"
        lines.append(f"  {host}->{home:<8}{r['count']:>7}{yuan(r['fund_fen']):>16}  {outcome}")
    for h in sorted(heard, key=lambda h: (h["host"], h["home"])):
        pair = f"{h['host']}->{h['home']}"
        lines.append(f"  {pair:<39}{h['outcome']} (stated to us, answered here)")
    planted = rec.get("planted_lost_notice")
    if planted:
        found = [d for r in statements if r["round"] == "first" for d in r["differences"]]
        seen = ", ".join(
            f"{d['kind']} of {d['claim_id']}, {d['responsible']} to act" for d in found
        )
        lines.append(
            f"  planted: the notice of {planted['claim_id']} lost on its way to "
            f"{planted['home']}; found: {seen or 'nothing'}; {planted['host']} re-sent the "
            "notice and stated the day again"
        )
    clearing = report.get("clearing") or []
    if clearing:
        lines.append(f"\nMonth-end clearing (清算) {clearing[0]['month']}: what each home's funds "
                     "owe its host, net of reversals")  # fmt: skip
        lines.append(f"  {'pair':<16}{'claims':>7}{'stated (yuan)':>16}{'confirmed':>16}  outcome")
        for r in sorted(clearing, key=lambda r: (r["host"], r["home"])):
            lines.append(
                f"  {r['host']}->{r['home']:<8}{r['claims']:>7}{yuan(r['stated_fen']):>16}"
                f"{yuan(r['confirmed_fen']):>16}  {r['outcome']} (v{r['version']})"
            )
    return lines
