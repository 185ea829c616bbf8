"""The scoring loop: input topics -> micro-batches -> the pipeline -> the output topics.

The input topics are read by a plain aiokafka consumer in its own group (``<app id>-scorer``),
not through Faust's per-message stream: Faust costs about 100 µs per message before the first
line of ours runs, more than the rest of the per-event work once that was cut (issue 8, README
"Speed and scale"). The loop takes whatever the consumer has fetched (up to
``LEADSTREAM_BATCH_MAX_EVENTS``), lets :class:`~streams.pipeline.EventPipeline` write it to Redis,
hands its records to the producer and goes on with the next batch while Kafka acknowledges them.

Offsets are committed by hand, and only for a batch whose every record Kafka acknowledged: a
crash anywhere redelivers what was not committed, and the pipeline's offset guard and re-send
material make that redelivery count once. Before partitions move to another worker
(rebalance, shutdown), the batches in flight are settled and committed first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from streams import metrics
from streams.clients import kafka_kwargs
from streams.pipeline import EventPipeline, Message, Out
from streams.retry import with_retry
from streams.settings import Settings

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # batches whose records may still await Kafka's acknowledgement while the next is computed
COMMIT_WAIT_S = 10.0  # how long a rebalance or a shutdown waits for the last commit (a replay is harmless)


@dataclass
class Batch:
    """A processed batch waiting for its records' acknowledgements before its offsets are committed."""

    acks: list[Awaitable[object]]
    offsets: dict[TopicPartition, int]  # next offset to read, per partition
    resent_material: list[tuple[str, list[str]]]  # the pipeline's re-send material to drop once acked
    messages: list[Message]
    outs: list[Out]
    seconds: float


class ScoringLoop:
    """Consume the input topics in micro-batches and score them (see the module docstring)."""

    def __init__(self, settings: Settings, pipeline: EventPipeline,
                 send: Callable[[list[Out]], Awaitable[list[Awaitable[object]]]],
                 on_crash: Callable[[BaseException], Awaitable[object]]) -> None:
        self.settings, self.pipeline, self.send, self.on_crash = settings, pipeline, send, on_crash
        self.topics = (settings.topic_web, settings.topic_crm)
        self.consumer: AIOKafkaConsumer | None = None
        self._in_flight: deque[Batch] = deque()
        self._settling = asyncio.Lock()  # one settler at a time: the loop, or a rebalance
        self._cycle = asyncio.Lock()  # held from a batch's fetch to its records being queued
        self._task: asyncio.Task[None] | None = None
        self._read: dict[TopicPartition, int] = {}  # next offset to read, per assigned partition
        self._to_commit: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self._committer: asyncio.Task[None] | None = None  # at most one commit at a time
        self._last_commit = float("-inf")  # monotonic time the last commit started

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            **kafka_kwargs(self.settings), group_id=f"{self.settings.app_id}-scorer",
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.settings.batch_max_events,
            session_timeout_ms=self.settings.session_timeout_s * 1000,
            heartbeat_interval_ms=max(1, self.settings.session_timeout_s // 6) * 1000)
        self.consumer.subscribe(list(self.topics), listener=_SettleOnRevoke(self))
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="scoring-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.consumer is not None:
            try:
                async with self._cycle:
                    await self._settle(keep=0)
                    await self.drain_commits()
            finally:
                await self.consumer.stop()

    def assigned(self) -> set[TopicPartition]:
        try:
            return set(self.consumer.assignment()) if self.consumer is not None else set()
        except Exception:  # not started, or between rebalances
            return set()

    def lags(self) -> Iterator[tuple[str, int, int]]:
        """(topic, partition, lag) of the assigned input partitions: highwater minus the next offset to read."""
        if self.consumer is None:  # not started yet: nothing assigned
            return
        for tp in sorted(self.assigned()):
            high = self.consumer.highwater(tp)
            if high is not None:
                yield tp.topic, tp.partition, max(0, high - self._read.get(tp, high))

    # ---- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.consumer is not None
        wait_ms = max(1, int(self.settings.batch_wait_s * 1000))
        while True:
            try:
                async with self._cycle:
                    fetched = await self._fetch(wait_ms)
                    if fetched:
                        await self._process(fetched)
                await self._settle(keep=IN_FLIGHT - 1 if fetched else 0)
            except KafkaError as exc:  # e.g. the broker restarting: the consumer reconnects by itself
                log.warning("scoring loop: %r; going on", exc)
                await asyncio.sleep(1.0)
            except Exception as exc:  # a bug, not bad input (that is dead-lettered): stop the worker,
                log.exception("scoring loop stopped by %r", exc)  # whose restart redelivers the batch
                await self.on_crash(exc)
                return

    async def _fetch(self, wait_ms: int) -> dict[TopicPartition, list]:
        """What the consumer has fetched, up to ``LEADSTREAM_BATCH_MAX_EVENTS``; a smaller batch first
        waits ``LEADSTREAM_BATCH_LINGER_SECONDS`` for more (records of a partition stay in order)."""
        assert self.consumer is not None
        limit = self.settings.batch_max_events
        fetched = await self.consumer.getmany(timeout_ms=wait_ms, max_records=limit)
        taken = sum(map(len, fetched.values()))
        if not fetched or self.settings.batch_linger_s <= 0 or taken >= limit:
            return fetched
        await asyncio.sleep(self.settings.batch_linger_s)
        for tp, records in (await self.consumer.getmany(timeout_ms=0, max_records=limit - taken)).items():
            fetched[tp] = fetched.get(tp, []) + records
        return fetched

    async def _process(self, fetched: dict[TopicPartition, list]) -> None:
        started = time.perf_counter()
        msgs = [Message(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                for records in fetched.values() for r in records]
        offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
        async with self.pipeline.send_order:  # a rescore never slips between a write and its send
            outs = await with_retry(lambda: self.pipeline.handle_batch(msgs), f"batch of {len(msgs)}")
            acks = await self.send(outs)
        self._read.update(offsets)
        self._in_flight.append(Batch(acks, offsets, self.pipeline.take_unacked(), msgs, outs,
                                     time.perf_counter() - started))

    async def _settle(self, keep: int) -> None:
        """Wait for the acknowledgements of all but the newest ``keep`` batches, then have their
        offsets committed in the background."""
        async with self._settling:
            done: dict[TopicPartition, int] = {}
            while len(self._in_flight) > keep:
                batch = self._in_flight[0]
                try:
                    await asyncio.gather(*batch.acks)
                except KafkaError as exc:  # not a transient error for the loop to go on from
                    raise OutputsNotAcknowledged(f"outputs of a batch of {len(batch.messages)}: {exc!r}") from exc
                self._in_flight.popleft()
                self.pipeline.acknowledged(batch.resent_material)
                done.update(batch.offsets)
                metrics.observe_batch(batch.messages, batch.outs, self.pipeline.counts, batch.seconds)
            self._to_commit.update(done)  # batches in order: later offsets win
            self._start_commits()  # also when idle: the last batches' offsets get their commit

    def _start_commits(self, now: bool = False) -> None:
        """Start a commit of what was acknowledged, at most every ``LEADSTREAM_COMMIT_EVERY_SECONDS``
        unless ``now``: at a few events per batch, a commit per batch (a Redis and a Kafka round trip)
        cost more than the events (worker CPU per event at 500 events/s: docs/performance.md)."""
        if not self._to_commit or (self._committer is not None and not self._committer.done()):
            return
        if now or time.monotonic() - self._last_commit >= self.settings.commit_every_s:
            self._last_commit = time.monotonic()
            self._committer = asyncio.create_task(self._commit_acknowledged(), name="scoring-commits")

    async def _commit_acknowledged(self) -> None:
        """Commit what was acknowledged, off the loop's path: the loop goes on with the next batch
        meanwhile, and the offsets acknowledged during a commit go in the next."""
        offsets, self._to_commit = self._to_commit, {}
        try:
            # Re-send material goes before the offsets are committed: a crash in between must
            # leave neither stale material nor an uncommitted offset without its material.
            await with_retry(self.pipeline.flush_acked, "dropping acknowledged re-send material")
            await self._commit(offsets)
        except BaseException as exc:  # kept for the next try (a replay would be harmless anyway)
            self._to_commit = offsets | self._to_commit
            if not isinstance(exc, Exception):
                raise
            log.warning("scoring loop: offsets not committed yet: %r", exc)

    async def drain_commits(self, timeout_s: float = COMMIT_WAIT_S) -> None:
        """Commit everything acknowledged before partitions move or the worker stops, waiting at most
        ``timeout_s``: a commit hanging on a re-forming group must not hold the rebalance (what is
        not committed is read again by the next owner, and the offset guard makes that harmless)."""
        deadline = time.monotonic() + timeout_s
        for _ in range(2):  # a commit under way, then what was acknowledged while it ran
            self._start_commits(now=True)
            committer = self._committer
            if committer is None or committer.done():  # nothing to commit, or a failed try already logged
                return
            try:
                await asyncio.wait_for(asyncio.shield(committer), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("scoring loop: the last commit took over %.0f s; left to the next owner", timeout_s)
                committer.cancel()
                await asyncio.wait([committer], timeout=1.0)  # its offsets back in _to_commit
                return

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        assigned = self.assigned()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            await self.consumer.commit(mine)
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (rebalance) or the broker is away: the new owner reads these
            # events again, and the offset guard makes that redelivery change nothing.
            log.warning("scoring loop: could not commit %s: %r", sorted(mine.items()), exc)


class OutputsNotAcknowledged(RuntimeError):
    """Kafka refused a batch's outputs after the producer's own retries: the worker stops, and its
    restart redelivers the batch, whose outputs are re-sent from the lead's re-send material."""


class _SettleOnRevoke(ConsumerRebalanceListener):
    """Before partitions leave this worker, its batches in flight are acknowledged and committed."""

    def __init__(self, loop: ScoringLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.loop._cycle:
            await with_retry(lambda: self.loop._settle(keep=0), "settling before a rebalance")
            await self.loop.drain_commits()
            self.loop.pipeline.forget_written()  # the next owner of these leads writes them now
        for tp in revoked:
            self.loop._read.pop(tp, None)
            self.loop._to_commit.pop(tp, None)  # the next owner's now

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("scoring loop: assigned %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)))
