"""Generated ids carry nothing of the person: no run of the ID number's digits, no plain hash."""

from __future__ import annotations

import datetime as dt
import random
import re

from adapters.directory import Directory
from simulators.peers import foreign_visit
from simulators.population import keyed_token, make_filing, make_person

FILED = dt.datetime(2026, 5, 5, 8, 0, tzinfo=dt.UTC)


def _runs(text: str, length: int = 4) -> set[str]:
    """Every run of ``length`` consecutive characters of ``text``."""
    return {text[i : i + length] for i in range(len(text) - length + 1)}


def test_no_id_holds_four_digits_of_the_id_number() -> None:
    """The ids of a demo-sized population (every agreement of the directory, 60 persons
    each, seed 20170523), filings and foreign visits, once the region codes they are meant
    to name are taken out, share no run of 4 characters with the person's ID number."""
    directory = Directory.default()
    rng = random.Random(20170523)
    sequence = 0
    checked = 0
    for a in directory.agreements():
        for _ in range(60):
            sequence += 1
            person = make_person(rng, a.home, sequence)
            filing = make_filing(rng, person, a.host, filed_at=FILED)
            for made in (filing.filing_id, foreign_visit(person.person_id, 20170523)):
                rest = made.replace(a.home, "").replace(a.host, "")
                shared = _runs(rest) & _runs(person.person_id)
                assert not shared, (made, person.person_id[-6:])
                checked += 1
    assert checked > 1000


def test_ids_are_the_same_for_a_seed_and_differ_between_persons() -> None:
    def filing_ids(seed: int) -> list[str]:
        rng = random.Random(seed)
        people = [make_person(rng, "130100", n) for n in range(500)]
        return [make_filing(rng, p, "460000", filed_at=FILED).filing_id for p in people]

    first = filing_ids(7)
    assert first == filing_ids(7)
    assert len(set(first)) == len(first)
    assert first != filing_ids(8)
    assert re.fullmatch(r"F-130100-[a-z]{10}-460000", first[0])


def test_a_keyed_token_needs_its_key() -> None:
    """The same person gives the same visit token under one seed, another under another."""
    person = "130102195001011234"
    assert keyed_token("k1", person) == keyed_token("k1", person)
    assert keyed_token("k1", person) != keyed_token("k2", person)
    assert not any(c.isdigit() for c in keyed_token("k1", person))
