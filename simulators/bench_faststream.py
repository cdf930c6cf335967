"""The peer row of ``xsettle bench``: FastStream's documented Kafka RPC recipe on the same broker.

FastStream (measured with the version installed, 0.7.8 when this was written) has no request
method for a real Kafka broker: ``KafkaBroker.request`` goes to its producer's ``request``,
which raises ``FeatureNotSupportedException`` ("Kafka doesn't support `request` method without
test client"). Its documentation gives a recipe instead, "Kafka RPC Requests"
(https://faststream.ag2.ai/latest/howto/kafka/rpc/, the same page from 0.5 on), and that is
what is measured here:

- the responder is a ``@broker.subscriber`` on the request topic whose handler returns the
  answer; FastStream publishes a handler's return value to the message's ``reply_to`` topic
  with its ``correlation_id``;
- the requester keeps a subscriber on a reply topic that resolves a Future per
  ``correlation_id``, and sends each request with
  ``broker.publish(body, topic, reply_to=..., correlation_id=...)`` then waits on its Future
  (the recipe's ``RPCWorker.request``).

The bodies are the bus round trip's own pydantic models, as JSON (FastStream's way): a
:class:`~bus.models.ClaimPackage` from :func:`~simulators.bench.bench_claim` each with its own
claim id, which the responder's handler receives validated, and the
:class:`~bus.models.ReviewResult` of :func:`~simulators.bench.bench_review` for it, which the
reply subscriber receives validated. :data:`~simulators.bench.WINDOW` requests are in flight,
as in the raw and bus rows.

Settings: FastStream's own defaults but where this broker or the comparison needs otherwise.
The producer gets the bench's ``acks`` (answers as durable as the bus's) and no idempotence
(the broker refuses idempotent producers; FastStream's default is off anyway), but keeps
FastStream's ``linger_ms`` (0) and batch size: at the default concurrency every answer's send
is awaited before the next message, so the bench's linger (2 ms) would be waited out once per
message (about 320 round trips/s instead of about 1,000 on the 2-core machine of issue 17),
while the best ``max_workers`` hardly moves. Both subscribers get the bench's
``fetch_max_wait_ms`` and ``fetch_max_records`` (FastStream's default wait, 500 ms, is what an
empty fetch would be held for on this broker) and read their fresh topics from the earliest
offset, so the warm-up request cannot be skipped. They join no consumer group (FastStream's
default), so nothing waits for a group assignment.
FastStream's per-message access log is turned off (``logger=None``): at its default, INFO,
it writes two lines per message, which would be a cost of the terminal, not of FastStream.

"Default" is the responder's subscriber as declared (``max_workers`` unset: one message at a
time, each answer's publish awaited before the next message); the sweep sets ``max_workers``
on that subscriber (FastStream's documented option for concurrent consumption: one consumer,
that many handler tasks). The reply subscriber stays as declared: its handler only resolves a
Future.

faststream is a bench (dev) dependency, imported here only when the figure is measured, so
that the package itself does not need it; without it the figure says so.
"""

import asyncio
import functools
import importlib.metadata
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from bus.models import ClaimPackage, ReviewResult
from bus.settings import BusSettings
from bus.transport import Admin
from simulators.bench import WINDOW, bench_claim, bench_review, repeat_async, stat

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker
    from faststream.security import BaseSecurity

RECIPE = (
    "Kafka RPC Requests (howto/kafka/rpc): @broker.subscriber handler returning the answer "
    "(sent to reply_to), reply subscriber resolving a Future per correlation_id, "
    "broker.publish(..., reply_to=, correlation_id=)"
)
"""What the peer row measures, in the JSON."""
WORKERS = (4, 16, 64, 256)
"""``max_workers`` of the responder's subscriber tried after the default (unset, which is one
worker); bounded by :data:`~simulators.bench.WINDOW`, the most that can be waiting."""
REQUEST_TIMEOUT_S = 60.0
"""How long one request waits for its answer before the run fails (the recipe's
``wait_for``); far above a round trip even with the whole window queued at one worker."""
WARM_UP = 100
"""Requests before each setting's timed runs (connections, metadata, first fetches)."""
NOT_INSTALLED = "faststream not installed"
"""The figure's note when faststream cannot be imported."""


def faststream_version() -> str | None:
    """The installed faststream's version; None when it is not installed."""
    try:
        return importlib.metadata.version("faststream")
    except importlib.metadata.PackageNotFoundError:
        return None


def _security(settings: BusSettings) -> "BaseSecurity | None":
    """The bench's Kafka security as FastStream's security object (None for PLAINTEXT)."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    kwargs = settings.kafka_security()
    protocol = kwargs["security_protocol"]
    context = kwargs.get("ssl_context")
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return sasl[kwargs["sasl_mechanism"]](
        kwargs["sasl_plain_username"],
        kwargs["sasl_plain_password"],
        ssl_context=context,
        use_ssl=protocol == "SASL_SSL",
    )


class FastStreamEcho:
    """FastStream's Kafka RPC recipe: a responder answering each ClaimPackage with a
    ReviewResult, and a requester keeping :data:`~simulators.bench.WINDOW` requests in flight.
    ``max_workers``: the responder subscriber's (None: FastStream's default)."""

    def __init__(self, settings: BusSettings, bootstrap: str, max_workers: int | None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.max_workers = max_workers
        tag = uuid.uuid4().hex[:8]
        self.req_topic = f"bench.faststream-req.{tag}"
        self.rep_topic = f"bench.faststream-rep.{tag}"
        self._template = bench_claim("130100", "460100", "C-0", "1" * 18)
        self._responses: dict[str, asyncio.Future[ReviewResult]] = {}
        self._sem = asyncio.Semaphore(WINDOW)
        self._seq = 0
        self._broker: KafkaBroker | None = None
        self.handled = 0
        """Requests the responder's handler answered."""
        self.answered = 0
        """Answers the requester received for its own requests (the claim id matching)."""

    async def start(self) -> None:
        """Create the two topics, declare both subscribers, start FastStream's broker."""
        from faststream import Context
        from faststream.kafka import KafkaBroker, Topic

        s = self.settings
        async with Admin(s, self.bootstrap) as admin:
            await admin.create_topics([self.req_topic, self.rep_topic])
        broker = KafkaBroker(
            self.bootstrap,
            acks=s.acks,
            enable_idempotence=False,
            security=_security(s),
            logger=None,
        )

        # The topics are the bench's (its partitions), so FastStream is not to create them.
        @broker.subscriber(
            Topic(self.req_topic, declare=False),
            max_workers=self.max_workers,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_poll_records=s.fetch_max_records,
        )
        async def review(claim: ClaimPackage) -> ReviewResult:
            self.handled += 1
            return bench_review(claim.claim_id)

        @broker.subscriber(
            Topic(self.rep_topic, declare=False),
            auto_offset_reset="earliest",
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_poll_records=s.fetch_max_records,
        )
        async def answered(
            answer: ReviewResult,
            correlation_id: Annotated[str, Context("message.correlation_id")],
        ) -> None:
            future = self._responses.pop(correlation_id, None)
            if future is not None and not future.done():
                future.set_result(answer)

        self._broker = broker
        await broker.start()

    async def stop(self) -> None:
        """Stop FastStream's broker (its subscribers and producer)."""
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None

    async def _request(self, claim: ClaimPackage) -> None:
        """One request as the recipe's ``RPCWorker.request`` makes it; frees a window slot."""
        assert self._broker is not None, "start() first"
        try:
            correlation_id = str(uuid.uuid4())
            future = self._responses[correlation_id] = asyncio.get_running_loop().create_future()
            await self._broker.publish(
                claim, self.req_topic, reply_to=self.rep_topic, correlation_id=correlation_id
            )
            try:
                answer = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
            finally:
                self._responses.pop(correlation_id, None)
            if answer.claim_id == claim.claim_id:
                self.answered += 1
        finally:
            self._sem.release()

    async def run(self, n: int) -> float:
        """``n`` round trips with up to :data:`~simulators.bench.WINDOW` in flight; round trips
        per second. Raises when a request is not answered in :data:`REQUEST_TIMEOUT_S`."""
        began = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        for _ in range(n):
            await self._sem.acquire()
            self._seq += 1
            claim = self._template.model_copy(update={"claim_id": f"C-fs-{self._seq}"})
            tasks.append(asyncio.create_task(self._request(claim)))
        await asyncio.gather(*tasks)
        return n / (time.perf_counter() - began)


async def bench_faststream(
    settings: BusSettings,
    bootstrap: str,
    n: int,
    repeat: int,
    *,
    workers: Sequence[int] = WORKERS,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The peer figure: FastStream's recipe at its default concurrency, then with each of
    ``workers`` as the responder's ``max_workers``; ``repeat`` runs of ``n`` round trips each,
    after a warm-up. The best setting is the one with the highest median (the default counts,
    as one worker). Without faststream: ``{"installed": False, "note": ...}``."""
    version = faststream_version()
    if version is None:
        return {"installed": False, "note": NOT_INSTALLED}
    runs: dict[int, list[float]] = {}
    answered = 0
    for setting in (None, *workers):
        log(f"FastStream RPC, max_workers={setting or 'default'}")
        echo = FastStreamEcho(settings, bootstrap, setting)
        await echo.start()
        try:
            await echo.run(min(n, WARM_UP))
            runs[setting or 1] = await repeat_async(repeat, functools.partial(echo.run, n))
        finally:
            await echo.stop()
        answered += echo.answered
    best = max(runs, key=lambda w: statistics.median(runs[w]))
    return {
        "installed": True,
        "version": version,
        "recipe": RECIPE,
        "window": WINDOW,
        "requests": n,
        "answered": answered,
        "default": stat(runs[1], "1/s"),
        "best": stat(runs[best], "1/s"),
        "best_max_workers": best,
        "sweep": {str(w): statistics.median(r) for w, r in runs.items()},
    }


__all__ = ["NOT_INSTALLED", "WORKERS", "FastStreamEcho", "bench_faststream", "faststream_version"]
