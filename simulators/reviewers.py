"""Simulated reviewers of a home agency: they work its review desk through the reviewers' API.

A :class:`SimulatedReviewer` takes the open reviews whose answers are expected first and
decides them as a person at the desk would, at ``pace_per_s`` decisions a second, through a
:class:`ReviewQueue`: in the demo and the peer commands that is the gateway's review API
(:class:`simulators.desks.ReviewerClient`: ``GET /v1/reviews``, ``GET /v1/reviews/{id}``,
``POST /v1/reviews/{id}/decision``); :class:`LocalQueue` calls a
:class:`~adapters.review_desk.ReviewDesk` in the process (unit tests of the desk, no HTTP).
Scenario knobs (per home province):

- ``pace_per_s``: decisions per second of one reviewer (> 0); several reviewers may work one
  desk: reviewer ``seat`` of ``seats`` takes the reviews whose claim id hashes to its seat,
  and one another reviewer decided first is skipped (counted ``closed``);
- ``adjust_share``: share (0..1) of decisions that cut one to three items to 50–90% of their
  proposed amount (reason ``OVER_QUANTITY``/``NOT_INDICATED``/``OVER_STANDARD``): usually
  PARTIAL, a smaller fund share and a top-up for the patient;
- ``reject_share``: share (0..1) of decisions that reject the claim (reason
  ``REVIEW_REJECTED``, a note from a short list): the patient pays in full;
- the rest are approvals of the proposal. ``adjust_share + reject_share`` is at most 1.

Seeded: with ``seed`` each claim's decision is drawn from a generator seeded by the seed and
what the queue shows of the claim (host, masked person, total; not the claim id, which the
gateway draws at admission), so a claim gets the same decision whichever reviewer takes it, in
whatever order and in whichever run (the demo's same-seed-same-money promise); without it,
from ``rng`` in queue order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import zlib
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from adapters.review_desk import ReviewClosed, ReviewDesk, UnknownReview
from bus.models import ItemAdjustment
from simulators.desks import OpenReview, ProposedItem

log = structlog.get_logger(__name__)

IDLE_POLL_S: Final = 1.0
"""How often an idle reviewer looks at the queue again (each look is a request to the
gateway: 22 reviewers of the demo looking 5 times a second made half its requests)."""
FETCH: Final = 10
"""A reviewer lists ``FETCH`` × seats reviews from the queue's head and keeps its seat's share:
one list request serves about this many decisions."""

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


class ReviewQueue(Protocol):
    """What a reviewer does at a desk. A decision on a review decided already raises
    :class:`~adapters.review_desk.ReviewClosed`, on an unknown one
    :class:`~adapters.review_desk.UnknownReview`."""

    async def open_reviews(self, limit: int) -> list[OpenReview]:
        """Open reviews, the earliest expected answer first."""
        ...

    async def proposed_items(self, claim_id: str) -> list[ProposedItem]:
        """A review's item codes with their billed and proposed amounts."""
        ...

    async def approve(self, claim_id: str, reviewer: str) -> None:
        """Approve the rules' proposal."""
        ...

    async def adjust(
        self, claim_id: str, adjustments: Sequence[ItemAdjustment], reviewer: str
    ) -> None:
        """Set the approved amount of some items."""
        ...

    async def reject(self, claim_id: str, reason: str, reviewer: str) -> None:
        """Reject the claim."""
        ...


class LocalQueue:
    """A :class:`ReviewQueue` over a desk in this process (no HTTP): for unit tests of the
    desk and of the simulated reviewer."""

    def __init__(self, desk: ReviewDesk) -> None:
        self.desk = desk

    async def open_reviews(self, limit: int) -> list[OpenReview]:
        """Open reviews, the earliest expected answer first."""
        return [
            OpenReview(r.claim_id, r.host, r.person, r.total_fen)
            for r in self.desk.open_reviews(limit)
        ]

    async def proposed_items(self, claim_id: str) -> list[ProposedItem]:
        """A review's item codes with their billed and proposed amounts."""
        return [
            ProposedItem(i.item_code, i.amount_fen, i.proposed_fen)
            for i in self.desk.get(claim_id).items
        ]

    async def approve(self, claim_id: str, reviewer: str) -> None:
        """Approve the rules' proposal."""
        await self.desk.approve(claim_id, reviewer)

    async def adjust(
        self, claim_id: str, adjustments: Sequence[ItemAdjustment], reviewer: str
    ) -> None:
        """Set the approved amount of some items."""
        await self.desk.adjust(claim_id, adjustments, reviewer)

    async def reject(self, claim_id: str, reason: str, reviewer: str) -> None:
        """Reject the claim."""
        await self.desk.reject(claim_id, reason, reviewer)


class SimulatedReviewer:
    """One reviewer working a desk's queue as an asyncio task (:meth:`start`, :meth:`stop`).

    ``desk`` is a :class:`ReviewQueue` (a :class:`~adapters.review_desk.ReviewDesk` is worked
    through a :class:`LocalQueue`); ``seat`` of ``seats``: this reviewer's share of a team
    working one desk."""

    def __init__(
        self,
        desk: ReviewQueue | ReviewDesk,
        *,
        pace_per_s: float,
        adjust_share: float,
        reject_share: float,
        rng: random.Random,
        name: str = "sim-reviewer",
        seed: str | None = None,
        seat: int = 0,
        seats: int = 1,
    ) -> None:
        self.settings = ReviewerSettings(pace_per_s, adjust_share, reject_share)
        if not 0 <= seat < seats:
            raise ValueError(f"seat {seat} is not one of {seats} seats")
        self.desk: ReviewQueue = LocalQueue(desk) if isinstance(desk, ReviewDesk) else desk
        self.rng = rng
        self.name = name
        self.seed = seed
        self.seat = seat
        self.seats = seats
        self.decided: Counter[str] = Counter()
        """Decisions made, by ``approve``, ``adjust``, ``reject``; ``closed``: a review another
        reviewer decided first; ``failed``: a decision that raised."""
        self._failed: set[str] = set()
        self._todo: deque[OpenReview] = deque()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        desk: ReviewQueue | ReviewDesk,
        settings: ReviewerSettings,
        rng: random.Random,
        name: str,
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

    async def _next(self) -> OpenReview | None:
        """The next review to decide: from the list fetched last, else from a fresh one: this
        seat's share of it (by a hash of the claim id, stable while the queue moves), or its
        last review when the share is empty."""
        while self._todo:
            review = self._todo.popleft()
            if review.claim_id not in self._failed:
                return review
        waiting = [
            r
            for r in await self.desk.open_reviews(FETCH * self.seats)
            if r.claim_id not in self._failed
        ]
        mine = [r for r in waiting if zlib.crc32(r.claim_id.encode()) % self.seats == self.seat]
        self._todo.extend(mine or waiting[-1:])  # nothing of mine: help at the queue's tail
        return self._todo.popleft() if self._todo else None

    async def work_one(self) -> str | None:
        """Decide the next open review (skipping ones that failed before); returns its claim
        id, or None when there was nothing to decide (or another reviewer decided it first)."""
        review = await self._next()
        if review is None:
            return None
        claim_id = review.claim_id
        if self.seed is not None:
            self.rng = random.Random(
                f"{self.seed}:{review.host}:{review.person}:{review.total_fen}"
            )
        roll = self.rng.random()
        s = self.settings
        try:
            if roll < s.reject_share:
                await self.desk.reject(claim_id, self.rng.choice(REJECT_NOTES), self.name)
                self.decided["reject"] += 1
            elif roll < s.reject_share + s.adjust_share and (cuts := await self._cuts(claim_id)):
                await self.desk.adjust(claim_id, cuts, self.name)
                self.decided["adjust"] += 1
            else:
                await self.desk.approve(claim_id, self.name)
                self.decided["approve"] += 1
        except (ReviewClosed, UnknownReview):
            self.decided["closed"] += 1
            return None
        except Exception as exc:  # a simulated person notes it and goes on with the next
            self._failed.add(claim_id)
            self.decided["failed"] += 1
            log.warning("simulated_review_failed", claim_id=claim_id, error=repr(exc))
            return None
        return claim_id

    async def _cuts(self, claim_id: str) -> list[ItemAdjustment]:
        """One to three items with a proposed amount, cut to 50-90% of it."""
        items = [i for i in await self.desk.proposed_items(claim_id) if i.proposed_fen > 0]
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
            await asyncio.sleep(gap if result is not None or self._todo else max(gap, IDLE_POLL_S))

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a task (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"reviewer-{self.name}")
        return self._task

    async def stop(self) -> None:
        """Stop working (a decision in progress finishes or rolls back whole), and forget the
        list fetched last (it is stale when work resumes). Idempotent."""
        task, self._task = self._task, None
        self._todo.clear()
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Decide until the queue is empty (tests and the end of a simulated day)."""
        async with asyncio.timeout(timeout_s):
            while await self.work_one() is not None or self._todo or await self._waiting():
                pass

    async def _waiting(self) -> bool:
        return any(r.claim_id not in self._failed for r in await self.desk.open_reviews(FETCH))
