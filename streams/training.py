"""The single trainer: learns each closed deal once, and checkpoints the model on a cadence."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from models.fields import Encoder, FieldPolicy
from models.learner import Trainer
from streams.clients import kafka_kwargs
from streams.pipeline import Message
from streams.priority import lower_this_thread
from streams.retry import with_retry
from streams.settings import Settings
from streams.state import ModelStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainingLoop:
    """The single trainer: learns each training message once, checkpoints on a cadence.

    A checkpoint (trainer with ``last_offset``, serving model, report) is saved every
    ``checkpoint_every_deals`` deals or ``checkpoint_every_s`` seconds after the first unsaved one.
    Exactly-once learning rests on that offset alone: a message at or below it was learned; a
    message *after* ``last_offset + 1`` means Faust resumed past the checkpoint (its committed
    offset runs ahead of our saves after a crash) or another worker trained meanwhile: the trainer
    is reloaded from Redis and the gap is read again with a plain consumer (no group) before going on.
    """

    def __init__(self, models: ModelStore, settings: Settings, policy: FieldPolicy,
                 on_bad: Callable[[Message, Exception], Awaitable[None]]) -> None:
        self.models, self.settings, self.policy, self.on_bad = models, settings, policy, on_bad
        self.trainer: Trainer | None = None
        self.unsaved = 0
        self.unsaved_since = 0.0
        self.lock = asyncio.Lock()  # the agent and the timer never learn or save at the same time
        # Learning and refits in a thread of their own at the trainer's priority (LEADSTREAM_TRAINER_NICE):
        # in a worker that also scores, a refit then waits for a free core instead of taking the scorer's.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="trainer", initializer=lower_this_thread,
                                           initargs=(settings.trainer_nice,))

    async def in_trainer_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def tick(self, owns_partition: bool) -> None:
        """Every second: on owning the training partition, resume from the checkpoint up to the
        partition's end (Faust may resume *after* it and have nothing to deliver); on losing it,
        forget the trainer (its unsaved deals are replayed by the new owner); save when due."""
        async with self.lock:
            if owns_partition and self.trainer is None:
                self.trainer = await self.load()
                end = await self.end_offset()
                if end > self.trainer.last_offset + 1:
                    await self.catch_up(self.settings.topic_training, 0, end)
            elif not owns_partition and self.trainer is not None:
                log.info("trainer: the training partition moved to another worker")
                self.trainer = None
            if self.trainer is not None:
                await self.save_if_due()

    async def end_offset(self) -> int:
        consumer = AIOKafkaConsumer(**kafka_kwargs(self.settings), group_id=None)
        await consumer.start()
        try:
            tp = TopicPartition(self.settings.topic_training, 0)
            return (await consumer.end_offsets([tp]))[tp]
        finally:
            await consumer.stop()

    async def load(self) -> Trainer:
        trainer = await with_retry(self.models.load_trainer, "model:trainer")
        if trainer is None:  # a new trainer continues the version numbers, so consumers see them rise
            trainer = Trainer(min_outcomes=self.settings.model_min_outcomes, version=await self.models.version(),
                              encoder=Encoder(self.policy), batch_every=self.settings.model_batch_every)
        trainer.min_outcomes = self.settings.model_min_outcomes  # the setting wins over the checkpoint's
        trainer.set_batch_every(self.settings.model_batch_every)
        trainer.defer_refits_to_caller()  # batch refits run in a thread (learn), not on the event loop
        if trainer.encoder.policy != self.policy:
            log.warning("trainer: the field policy changed since the checkpoint; the new one applies from now on")
            trainer.encoder.policy = self.policy
        self.unsaved = 0
        log.info("trainer: resuming at model version %d (offset %d)", trainer.version, trainer.last_offset)
        return trainer

    async def handle(self, m: Message) -> None:
        async with self.lock:
            if self.trainer is None or m.offset > self.trainer.last_offset + 1:
                self.trainer = await self.load()
                if m.offset > self.trainer.last_offset + 1:
                    await self.catch_up(m.topic, m.partition, m.offset)
            await self.learn(m)

    async def learn(self, m: Message) -> None:
        trainer = self.trainer
        assert trainer is not None
        if m.offset <= trainer.last_offset:
            return  # learned before the last checkpoint
        try:
            example = orjson.loads(m.value)
            drifts = trainer.drifts
            # In a thread: a deal's test-then-train over every learner takes milliseconds, which
            # the scoring loop in the same process would otherwise wait for.
            if await self.in_trainer_thread(lambda: trainer.learn(example["snapshots"], example["won"])):
                log.info("trainer: champion is now %s (model version %d)", trainer.tournament.champion, trainer.version)
            if trainer.refits_due():  # the batch learner's refit (0.1-3 s) in a thread: the event loop goes on
                log.info("trainer: batch learner refitted in %.2f s", await self.in_trainer_thread(trainer.refit))
            if trainer.drifts > drifts:
                log.warning("trainer: drift in the serving model's error (drift #%d); the champion is chosen again",
                            trainer.drifts)
        except Exception as exc:  # a training message the trainer cannot use: keep it, keep learning
            await self.on_bad(m, exc)
        trainer.last_offset = m.offset
        if not self.unsaved:
            self.unsaved_since = time.monotonic()
        self.unsaved += 1
        if self.unsaved >= self.settings.checkpoint_every_deals:
            await self.save()

    async def catch_up(self, topic: str, partition: int, until: int) -> None:
        """Learn the messages from ``last_offset + 1`` up to (not including) ``until``."""
        assert self.trainer is not None
        start = self.trainer.last_offset + 1
        log.info("trainer: replaying %s/%d offsets %d..%d (after the last checkpoint)", topic, partition, start, until - 1)
        consumer = AIOKafkaConsumer(**kafka_kwargs(self.settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            empty_polls = 0
            while self.trainer.last_offset + 1 < until and empty_polls < 30:
                records = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
                empty_polls = 0 if records else empty_polls + 1
                for r in records:
                    if r.offset >= until:
                        return
                    await self.learn(Message(r.topic, r.partition, r.offset, r.key, r.value))
            if self.trainer.last_offset + 1 < until:
                log.error("trainer: offsets %d..%d could not be read again (retention?); going on",
                          self.trainer.last_offset + 1, until - 1)
        finally:
            await consumer.stop()

    async def save_if_due(self) -> None:
        if self.unsaved and time.monotonic() - self.unsaved_since >= self.settings.checkpoint_every_s:
            await self.save()

    async def save(self) -> None:
        assert self.trainer is not None
        trainer, deals = self.trainer, self.unsaved
        figures = await with_retry(lambda: self.models.save(
            trainer, every_deals=self.settings.checkpoint_every_deals,
            every_seconds=self.settings.checkpoint_every_s), "model checkpoint")
        self.unsaved -= deals  # a deal learned while the write was in flight is in the next checkpoint
        log.info("trainer: checkpoint at offset %d, model version %d, %d deals since the last one "
                 "(trainer %d bytes, serving %d bytes, %.1f ms)", trainer.last_offset, trainer.version, deals,
                 figures["trainer_bytes"], figures["serving_bytes"], figures["save_ms_with_write"])
