"""A scenario: how much traffic, which faults at which rates, and the timing knobs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Rate = float


class ScenarioError(ValueError):
    """A scenario file that cannot be read or does not validate (the message names it)."""


class Faults(BaseModel):
    """Share of visits (0..1) that carry each injected fault."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unfiled: Rate = Field(default=0.03, ge=0, le=1)
    """The person never filed: NOT_FILED at admission."""
    revoked: Rate = Field(default=0.02, ge=0, le=1)
    """The filing was revoked before the visit: FILING_EXPIRED at admission."""
    not_designated: Rate = Field(default=0.02, ge=0, le=1)
    """A hospital that is not designated in the host: HOSPITAL_NOT_DESIGNATED."""
    not_allowed: Rate = Field(default=0.02, ge=0, le=1)
    """A designated hospital the home's agreement does not allow: HOSPITAL_NOT_DESIGNATED."""
    bad_amount: Rate = Field(default=0.02, ge=0, le=1)
    """A total that is not the sum of the items: AMOUNT_MISMATCH from the home."""
    undecodable: Rate = Field(default=0.01, ge=0, le=1)
    """An extra garbage record on the home's claim topic: dead letter + INVALID_MESSAGE."""
    duplicate_resend: Rate = Field(default=0.03, ge=0, le=1)
    """The claim is re-sent (same id, attempt 2): answered once, settled once."""
    silent_home: str | None = "530000"
    """A home province that stops answering for a while (None: none)."""
    silence_s: float = Field(default=6.0, ge=0)
    """How long it stays silent."""


class Reviews(BaseModel):
    """The home agencies' review desks: DELAYED claims wait there for a (simulated) reviewer,
    who approves, adjusts or rejects them through the desk's API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    desk: bool = True
    """Hold DELAYED claims for reviewers (False: every claim reviewed at once by the rules)."""
    reviewers_per_home: int = Field(default=2, ge=1)
    """Simulated reviewers working each home's queue."""
    pace_per_s: float = Field(default=15.0, gt=0)
    """Decisions per second of one reviewer."""
    adjust_share: Rate = Field(default=0.15, ge=0, le=1)
    """Share of decisions that cut some items (PARTIAL: a smaller fund share, a top-up)."""
    reject_share: Rate = Field(default=0.03, ge=0, le=1)
    """Share of decisions that reject the claim (the patient pays in full)."""
    auto_approve_clean: bool = False
    """Approve at once the DELAYED claims the rules adjust nothing in."""
    review_period_s: float = Field(default=3 * 86_400.0, gt=0)
    """When the answer is promised (the acknowledgement's expected_by), after acceptance."""


class Scenario(BaseModel):
    """Size, seed, faults and timing of one simulated day."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    claims: int = Field(default=5000, ge=1)
    """Visits to simulate (each becomes a claim or an admission refusal)."""
    seed: int = 20170523
    """Seed of every random choice: same seed, same claims and totals."""
    concurrency: int = Field(default=48, ge=1)
    """Visits in flight at once."""
    instant_deadline_s: float = Field(default=2.0, gt=0)
    """Answer deadline of instant and point-to-point claims."""
    settle_timeout_s: float = Field(default=120.0, gt=0)
    """Longest wait for every claim to reach a terminal state."""
    faults: Faults = Faults()
    """Injected faults."""
    reviews: Reviews = Reviews()
    """The homes' review desks and their reviewers."""

    @classmethod
    def load(cls, path: Path | None, **overrides: object) -> Scenario:
        """A scenario from a TOML file (or the defaults), then overrides (None ignored)."""
        data: dict[str, object] = {}
        if path is not None:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ScenarioError(f"{path}: cannot read the scenario: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ScenarioError(
                f"{path or 'scenario'}: {where}: {first['msg']} (got {first.get('input')!r})"
            ) from exc
