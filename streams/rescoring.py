"""Sending a batch's records, and rescoring leads when no event arrives (time decay, a new model).

Rescoring goes through the pipeline's own write path (same compare-and-set, so it never races a
lead's events) and emits score messages with ``trigger`` ``decay`` or ``model``. A worker rescores
only the leads of the input partitions assigned to it, so workers never do the same lead twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from streams import metrics
from streams.clients import KeyPartitioner, key_hash
from streams.pipeline import EventPipeline, Out
from streams.settings import Settings
from streams.state import SHARDS, tag, view_key
from streams.topics import Topics

log = logging.getLogger(__name__)
# Leads rescored per write: small, so the scoring loop gets the event loop between two chunks (a chunk
# is 30-50 ms of CPU); larger ones cut no measurable per-chunk cost (bench: same CPU per lead at 500).
RESCORE_CHUNK = 100
# While events arrive, a chunk holds the event loop for its whole CPU time (~0.4 ms per lead): 20
# leads keep that under ~10 ms for the events behind it (p99 at 500 events/s: docs/performance.md).
RESCORE_CHUNK_BUSY = 20
# A tick that keeps up with a backlog (see Rescorer.tick) hands back to the timer this often at most,
# in rounds of this many seconds' worth of leads: a round under way when events arrive runs to its end
# (at LEADSTREAM_RESCORE_RATE 5,000, 1,000 leads: about 0.2 s of the worker's CPU).
RESCORE_TICK_MAX_S = 30.0
RESCORE_ROUND_S = 0.2
# While events arrive, a round's chunks are spread over this part of the tick's interval (the rest is
# left so the round ends before the next tick).
RESCORE_SPREAD = 0.5
PARTITIONER = KeyPartitioner()  # the app's producer_partitioner (streams/app.py)
PASS_TTL_S = 86_400  # a model pass's snapshot of the leaderboard outlives a crashed worker by a day at most


class Sender:
    """Produce a batch's records without awaiting them one by one, then wait for all acks.

    The records with a key go into one record batch per output partition (aiokafka's batch API:
    ~8 µs of CPU a record, against ~30 µs through ``send``, which also makes a future per record),
    on the partition the producer's partitioner gives the key (Kafka's default: every consumer
    finds a lead's records where any other client puts them). A partition's records keep their
    order, and its batches reach the producer in the order of the calls (a full batch is handed
    over before the next is started), as ``send`` would; a record without a key, or one too big
    for a batch of its own, goes through ``send``.
    """

    def __init__(self, app: faust.App, topics: Topics) -> None:
        self.app = app
        self.names = {kind: topics.by_kind(kind).get_topic_name() for kind in ("scores", "hot", "dead_letter", "training")}

    async def enqueue(self, outs: list[Out]) -> list[Awaitable[object]]:
        """Hand the records to the producer, in order; returns their acknowledgements to await."""
        producer = self.app.producer._ensure_producer()  # the aiokafka producer under Faust's
        acks: list[Awaitable[object]] = []
        batches: dict[tuple[str, int], Any] = {}
        partitions: dict[str, list[int]] = {}
        for out in outs:
            topic = self.names[out.kind]
            if out.key is None:
                acks.append(await producer.send(topic, out.value, key=None))
                continue
            if topic not in partitions:  # as aiokafka's partitioner gets them: sorted, all of them
                partitions[topic] = sorted(await producer.partitions_for(topic))
            tp = (topic, PARTITIONER(out.key, partitions[topic], partitions[topic]))
            batch = batches.get(tp)
            if batch is None:
                batch = batches[tp] = producer.create_batch()
            if batch.append(key=out.key, value=out.value, timestamp=None) is None:  # full
                acks.append(await producer.send_batch(batch, tp[0], partition=tp[1]))
                batch = batches[tp] = producer.create_batch()
                if batch.append(key=out.key, value=out.value, timestamp=None) is None:  # alone too big:
                    del batches[tp]  # send's own checks and errors (e.g. MessageSizeTooLargeError)
                    acks.append(await producer.send(tp[0], out.value, key=out.key, partition=tp[1]))
        for (topic, partition), batch in batches.items():
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        return acks


def partition_of(lead_id: str, partitions: int) -> int:
    """The input partition a lead's events are on (the Kafka clients' default partitioner on the key)."""
    return key_hash(lead_id.encode()) % partitions


class Rescorer:
    """Rescore due leads (decay) and, after a new model version, every open lead, most valuable first.

    Both are bounded by ``LEADSTREAM_RESCORE_RATE`` leads per second per worker, and both yield to
    events: while events are arriving a tick rescores a tenth of that, in small chunks between the
    event batches, and ends there; without events it goes on, paced at the rate, while work is left.
    A model pass runs to its end even if newer versions arrive meanwhile; the next one starts when
    the version moved on, at most every ``LEADSTREAM_RESCORE_MODEL_EVERY_SECONDS``.
    """

    def __init__(self, settings: Settings, pipeline: EventPipeline, client: aioredis.Redis, sender: Sender,
                 owned: Callable[[], set[TopicPartition]]) -> None:
        self.settings, self.pipeline, self.client, self.sender = settings, pipeline, client, sender
        self.assigned = owned  # the input partitions this worker's scoring loop holds now
        self._model_ranks: list[int] | None = None  # per shard: next rank of the pass's snapshot to rescore
        self._pass_token = uuid.uuid4().hex[:12]  # this worker's snapshot keys
        self._pass_version = -1  # the model version the last pass started with
        self._model_moved = False
        self._pass_started = float("-inf")
        self._pass_size = 0  # leads in the pass's snapshot of the leaderboards (every worker's)
        self.clock, self.sleep = time.monotonic, asyncio.sleep  # the tick's pacing (tests give their own)

    def model_changed(self) -> None:
        self._model_moved = True

    async def _maybe_start_pass(self) -> None:
        """A pass starts when the model moved on, none runs, and the last one started at least
        ``LEADSTREAM_RESCORE_MODEL_EVERY_SECONDS`` ago (checkpoints come every 100 deals: one pass
        per version would rescore every open lead over and over)."""
        if not self._model_moved or self._model_ranks is not None:
            return
        if time.monotonic() - self._pass_started < self.settings.rescore_model_every_s:
            return
        self._pass_size = await self._take_snapshot()
        self._model_ranks = [0] * SHARDS  # from the top of every shard
        self._pass_version = self.pipeline.scorer.version
        self._pass_started = time.monotonic()
        self._model_moved = False
        metrics.set_model_pass(self._pass_version, self._pass_size)

    def owned(self) -> set[int]:
        return {tp.partition for tp in self.assigned() if tp.topic == self.settings.topic_web}

    async def tick(self) -> None:
        """Rescore the due leads, then the model pass's next ones, at most ``LEADSTREAM_RESCORE_RATE``
        a second. While no event arrives and work is left, the tick goes on, paced at that rate, up
        to :data:`RESCORE_TICK_MAX_S`: the timer waits its interval after a tick *ends*, so one
        budget per tick held a long pass to about half the rate (2,400-3,100 leads/s at a setting of
        5,000: ``leadstream bench --only promotion``)."""
        started, done = self.clock(), 0
        while True:
            owned = self.owned()  # each round: a rebalance may have taken partitions meanwhile
            if not owned:
                return
            rescored, more = await self._round(owned, self.pipeline.busy(self.settings.rescore_poll_s))
            done += rescored
            elapsed = self.clock() - started
            if not more or not rescored or elapsed >= RESCORE_TICK_MAX_S or \
                    self.pipeline.busy(self.settings.rescore_poll_s):  # events came meanwhile: theirs now
                return
            ahead = done / self.settings.rescore_rate - elapsed  # seconds ahead of the rate
            if ahead > 0:
                await self.sleep(ahead)

    async def _round(self, owned: set[int], busy: bool) -> tuple[int, bool]:
        """One budget: the due leads first, the model pass with what is left. Returns the leads
        rescored and whether work is left (the budget filled by due leads, or a pass under way)."""
        rate = self.settings.rescore_rate
        gap = 0.0
        if busy:  # events first, but quiet leads still move: a tenth of the rate, one round a tick,
            # its chunks spread over part of the tick (back to back they held every event batch of
            # the round's first ~100 ms behind a chunk: the event p99 during a pass 49-76 ms, 26 without)
            budget, chunk = max(1, int(rate * self.settings.rescore_poll_s) // 10), RESCORE_CHUNK_BUSY
            gap = self.settings.rescore_poll_s * RESCORE_SPREAD * chunk / budget
        else:  # short rounds: events that arrive meet at most one round under way
            budget, chunk = max(1, int(rate * min(self.settings.rescore_poll_s, RESCORE_ROUND_S))), RESCORE_CHUNK
        now_ms = int(time.time() * 1000)
        due = await self._due(now_ms, budget, owned)
        if due:
            await self._rescore(due, "decay", now_ms, chunk, gap)
        left = budget - len(due)
        await self._maybe_start_pass()
        model: list[str] = []
        if self._model_ranks is not None and left > 0 and self.pipeline.scorer.version > 0:
            model = await self._next_for_model(left, owned)
            if model:
                await self._rescore(model, "model", now_ms, chunk, gap)
        return len(due) + len(model), len(due) == budget or self._model_ranks is not None

    async def _due(self, now_ms: int, limit: int, owned: set[int]) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrangebyscore(view_key(shard, "due"), "-inf", now_ms, start=0, num=limit)
        leads = [m.decode() for members in await pipe.execute() for m in members]
        return [lead for lead in leads if partition_of(lead, self.settings.partitions) in owned][:limit]

    def _snapshot_key(self, shard: int) -> str:
        return f"rescore:{tag(shard)}:pass:{self._pass_token}"  # the leaderboard's slot (Redis Cluster)

    async def _take_snapshot(self) -> int:
        """Copy every shard's leaderboard for the pass to walk: the rescores move the leads' scores,
        so a walk by rank over the live leaderboard would skip leads that others overtake. Returns
        the leads copied."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrangestore(self._snapshot_key(shard), view_key(shard, "lb"), 0, -1)
            pipe.expire(self._snapshot_key(shard), PASS_TTL_S)
        return sum((await pipe.execute())[::2])  # ZRANGESTORE's counts; EXPIRE's flags between them

    async def _next_for_model(self, limit: int, owned: set[int]) -> list[str]:
        """The next leads of the pass, highest scores first in each shard (as they were when the pass
        started). ``limit`` counts this worker's leads: the others' are read and left to them."""
        ranks = self._model_ranks
        assert ranks is not None
        share = len(owned) / self.settings.partitions  # of the leads, the part on this worker's partitions
        per_shard = max(1, math.ceil(limit / share / SHARDS))
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrevrange(self._snapshot_key(shard), ranks[shard], ranks[shard] + per_shard - 1)
        leads: list[str] = []
        for shard, members in enumerate(await pipe.execute()):
            ranks[shard] += len(members)
            leads += [m.decode() for m in members]
        metrics.set_model_pass(self._pass_version, max(0, self._pass_size - sum(ranks)))
        if not leads:
            log.info("rescoring: every open lead is scored by model version %d", self._pass_version)
            self._model_ranks = None
            pipe = self.client.pipeline(transaction=False)
            for shard in range(SHARDS):  # one key per command: the shards are in different slots
                pipe.delete(self._snapshot_key(shard))
            await pipe.execute()
        return [lead for lead in leads if partition_of(lead, self.settings.partitions) in owned]

    async def _rescore(self, leads: list[str], trigger: str, now_ms: int, chunk: int = RESCORE_CHUNK,
                       gap_s: float = 0.0) -> None:
        acks: list[Awaitable[object]] = []

        async def emit(outs: list[Out]) -> None:
            # Called under the pipeline's send_order with the chunk's write: records reach the producer
            # in the order of the writes, so a lead's stale rescore never reaches the topic after the
            # tombstone of its deletion (a compacted consumer would keep it), as for event batches.
            acks.extend(await self.sender.enqueue(outs))

        await self.pipeline.rescore_chunks([leads[i:i + chunk] for i in range(0, len(leads), chunk)],
                                           trigger, now_ms, emit, gap_s=gap_s)
        # Kafka's acknowledgements awaited once, out of the lock: event batches and the next chunk
        # do not wait a broker round trip per chunk.
        if acks:
            await asyncio.gather(*acks)
