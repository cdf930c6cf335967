"""Simulated reviewers of a home agency: they work its review desk through the reviewers' API.

A :class:`SimulatedReviewer` takes the open review whose answer is expected first
(:meth:`ReviewDesk.open_reviews`), and decides it as a person at the desk would, through the
same calls — :meth:`ReviewDesk.approve`, :meth:`ReviewDesk.adjust`, :meth:`ReviewDesk.reject` —
at ``pace_per_s`` decisions a second. Scenario knobs (per home province):

- ``pace_per_s``: decisions per second of one reviewer (> 0); several reviewers may work one
  desk (each skips a review another decided first);
- ``adjust_share``: share (0..1) of decisions that cut one to three items to 50–90% of their
  proposed amount (reason ``OVER_QUANTITY``/``NOT_INDICATED``/``OVER_STANDARD``): usually
  PARTIAL, a smaller fund share and a top-up for the patient;
- ``reject_share``: share (0..1) of decisions that reject the claim (reason
  ``REVIEW_REJECTED``, a note from a short list): the patient pays in full;
- the rest are approvals of the proposal. ``adjust_share + reject_share`` is at most 1.

Seeded: with ``seed`` each claim's decision is drawn from a generator seeded by the seed and
the claim id, so a claim gets the same decision whichever reviewer takes it and in whatever
order (the demo's same-seed-same-money promise); without it, from ``rng`` in queue order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass

import structlog

from adapters.review_desk import ReviewClosed, ReviewDesk, UnknownReview
from bus.models import ItemAdjustment, ReviewResult

log = structlog.get_logger(__name__)

IDLE_POLL_S = 0.2
"""How often an idle reviewer looks at the queue again."""

ADJUST_REASONS = (
    ("OVER_QUANTITY", "数量超出诊疗常规"),
    ("NOT_INDICATED", "与诊断不符"),
    ("OVER_STANDARD", "超出收费标准"),
)
"""Reason codes (and notes) of the simulated adjustments."""

REJECT_NOTES = ("备案信息与就诊信息不符", "病历资料不全", "非医保支付范围")
"""Notes of the simulated rejections."""


@dataclass(frozen=True, slots=True)
class ReviewerSettings:
    """The scenario's knobs for one home's reviewers."""

    pace_per_s: float = 20.0
    adjust_share: float = 0.2
    reject_share: float = 0.05

    def __post_init__(self) -> None:
        if not self.pace_per_s > 0:
            raise ValueError(f"pace_per_s must be positive, not {self.pace_per_s}")
        for name in ("adjust_share", "reject_share"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be within 0..1, not {value}")
        if self.adjust_share + self.reject_share > 1:
            raise ValueError(
                f"adjust_share {self.adjust_share} + reject_share {self.reject_share} exceed 1"
            )


class SimulatedReviewer:
    """One reviewer working a desk's queue as an asyncio task (:meth:`start`, :meth:`stop`)."""

    def __init__(
        self,
        desk: ReviewDesk,
        *,
        pace_per_s: float,
        adjust_share: float,
        reject_share: float,
        rng: random.Random,
        name: str = "sim-reviewer",
        seed: str | None = None,
    ) -> None:
        self.settings = ReviewerSettings(pace_per_s, adjust_share, reject_share)
        self.desk = desk
        self.rng = rng
        self.name = name
        self.seed = seed
        self.decided: Counter[str] = Counter()
        """Decisions made, by ``approve``, ``adjust``, ``reject``; ``closed``: a review another
        reviewer decided first; ``failed``: a decision that raised."""
        self._failed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, desk: ReviewDesk, settings: ReviewerSettings, rng: random.Random, name: str
    ) -> SimulatedReviewer:
        """A reviewer with the scenario's knobs."""
        return cls(
            desk,
            pace_per_s=settings.pace_per_s,
            adjust_share=settings.adjust_share,
            reject_share=settings.reject_share,
            rng=rng,
            name=name,
        )

    async def work_one(self) -> ReviewResult | None:
        """Decide the open review expected first (skipping ones that failed before); None when
        there is nothing to decide."""
        waiting = [r for r in self.desk.open_reviews(50) if r.claim_id not in self._failed]
        if not waiting:
            return None
        claim_id = waiting[0].claim_id
        if self.seed is not None:
            self.rng = random.Random(f"{self.seed}:{claim_id}")
        roll = self.rng.random()
        s = self.settings
        try:
            if roll < s.reject_share:
                result = await self.desk.reject(claim_id, self.rng.choice(REJECT_NOTES), self.name)
                self.decided["reject"] += 1
            elif roll < s.reject_share + s.adjust_share and (cuts := self._cuts(claim_id)):
                result = await self.desk.adjust(claim_id, cuts, self.name)
                self.decided["adjust"] += 1
            else:
                result = await self.desk.approve(claim_id, self.name)
                self.decided["approve"] += 1
        except (ReviewClosed, UnknownReview):
            self.decided["closed"] += 1
            return None
        except Exception as exc:  # a simulated person notes it and goes on with the next
            self._failed.add(claim_id)
            self.decided["failed"] += 1
            log.warning("simulated_review_failed", claim_id=claim_id, error=repr(exc))
            return None
        return result

    def _cuts(self, claim_id: str) -> list[ItemAdjustment]:
        """One to three items with a proposed amount, cut to 50-90% of it."""
        items = [i for i in self.desk.get(claim_id).items if i.proposed_fen > 0]
        if not items:
            return []
        chosen = self.rng.sample(items, min(len(items), self.rng.randint(1, 3)))
        cuts = []
        for item in chosen:
            code, note = self.rng.choice(ADJUST_REASONS)
            approved = item.proposed_fen * self.rng.randint(50, 90) // 100
            cuts.append(
                ItemAdjustment(
                    item_code=item.item_code, approved_fen=approved, reason_code=code, note=note
                )
            )
        return cuts

    async def run(self) -> None:
        """Work the queue until cancelled: one decision every ``1 / pace_per_s`` seconds, a
        look at the queue every :data:`IDLE_POLL_S` when it is empty."""
        gap = 1.0 / self.settings.pace_per_s
        while True:
            result = await self.work_one()
            await asyncio.sleep(gap if result is not None else max(gap, IDLE_POLL_S))

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a task (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"reviewer-{self.name}")
        return self._task

    async def stop(self) -> None:
        """Stop working (a decision in progress finishes or rolls back whole). Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Decide until the queue is empty (tests and the end of a simulated day)."""
        async with asyncio.timeout(timeout_s):
            while await self.work_one() is not None or self._waiting():
                pass

    def _waiting(self) -> bool:
        return any(r.claim_id not in self._failed for r in self.desk.open_reviews(50))
