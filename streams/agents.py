"""The agents: scoring (every partition, every event) and training (one partition, one learner).

Scorers run with concurrency 1 so a lead's events are applied in partition order; producers key
events by lead_id, so no repartitioning (group_by) is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import faust
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.learner import Trainer
from models.rules import load_rules
from models.scoring import Scorer
from streams import metrics
from streams.pipeline import ContentionError, EventPipeline, Message, dead_letter
from streams.rescoring import Rescorer, Sender
from streams.settings import Settings
from streams.state import LeadStore, ModelStore
from streams.topics import declare_topics
from streams.web import register_web

log = logging.getLogger(__name__)
T = TypeVar("T")


def register_agents(app: faust.App, settings: Settings) -> EventPipeline:
    """Declare topics, agents, the checkpoint poller, the rescoring timer and the web views on ``app``."""
    topics = declare_topics(app, settings)
    client = aioredis.Redis.from_url(settings.redis_url)
    models = ModelStore(client)
    scorer = Scorer(load_rules(settings.scoring_config.read_text()))
    pipeline = EventPipeline(LeadStore(client, settings.tombstone_ttl_s), scorer,
                             topic_kinds={settings.topic_web: "web", settings.topic_crm: "crm"},
                             max_event_bytes=settings.max_event_bytes, dedupe_ids=settings.dedupe_ids,
                             rescore_every_ms=settings.rescore_every_s * 1000, worker_id=uuid.uuid4().hex[:8])
    sender = Sender(app, topics)
    rescorer = Rescorer(app, settings, pipeline, client, sender)

    @app.agent(topics.inputs, concurrency=1)
    async def score_events(stream: faust.StreamT) -> None:
        # A micro-batch per take: Faust acks (and so commits) its offsets only after this body
        # returns, i.e. after Kafka acknowledged every output of the batch.
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_wait_s):
            msgs = [Message(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value)
                    for e in events]
            started = time.perf_counter()
            outs = await with_retry(lambda: pipeline.handle_batch(msgs), f"batch of {len(msgs)}")
            await sender.send_all(outs)
            pipeline.acknowledged()
            metrics.observe_batch([e.message for e in events], outs, pipeline.counts, time.perf_counter() - started)

    @app.agent(topics.training, concurrency=1)
    async def train(stream: faust.StreamT) -> None:
        # A new trainer continues the version numbers, so consumers always see them rise.
        trainer = await models.load_trainer() or Trainer(min_outcomes=settings.model_min_outcomes,
                                                         version=await models.version())
        trainer.min_outcomes = settings.model_min_outcomes  # the setting wins over the checkpoint's
        log.info("trainer: resuming at model version %d (offset %d)", trainer.version, trainer.last_offset)
        async for event in stream.events():
            m = event.message
            try:
                await with_retry(lambda: learn_one(trainer, models, m.offset, m.value), f"{m.topic}/{m.offset}")
            except Exception as exc:  # a training message the trainer cannot use: keep it, keep learning
                log.exception("trainer: could not learn from %s/%s/%s", m.topic, m.partition, m.offset)
                doc = dead_letter(Message(m.topic, m.partition, m.offset, m.key, m.value),
                                  f"trainer could not learn from it: {exc!r}", int(time.time() * 1000))
                await topics.dead_letter.send(key=doc.key, value=doc.value)
                metrics.observe_dead_letter(f"trainer could not learn from it: {exc!r}")

    checked = {"version": -1}  # the last checkpoint version looked at, loadable or not

    @app.timer(interval=settings.model_poll_s)
    async def refresh_model() -> None:
        version = await models.version()
        if version != checked["version"]:
            checked["version"] = version
            serving = await models.load_serving()
            if serving is not None:
                scorer.model = serving
                rescorer.model_changed()
                log.info("scorer: now serving model version %d", serving.version)

    @app.timer(interval=settings.rescore_poll_s)
    async def rescore() -> None:
        await pipeline.flush_acked()
        await with_retry(rescorer.tick, "rescoring")

    register_web(app, settings, pipeline, models)
    return pipeline


async def with_retry(attempt: Callable[[], Awaitable[T]], what: str, max_backoff_s: float = 30.0) -> T:
    """Run ``attempt`` until it gets through Redis outages and lead contention: a message is never
    skipped because of them (no data lost); the partition waits instead."""
    backoff = 0.1
    while True:
        try:
            return await attempt()
        except (RedisConnectionError, RedisTimeoutError, ContentionError) as exc:
            metrics.observe_retry(redis_error=not isinstance(exc, ContentionError))
            log.warning("%s: %r; retrying in %.1f s", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)


async def learn_one(trainer: Trainer, models: ModelStore, offset: int, value: bytes) -> bool:
    """Learn from one closed deal unless this offset or this deal was already learned.

    The trainer's state, including ``last_offset``, and the deal's id are saved in one
    transaction, so a restart resumes exactly after the last deal learned.
    """
    if offset <= trainer.last_offset:
        return False
    example = orjson.loads(value)
    trainer.last_offset = offset
    if await models.client.sismember("model:learned", example["event_id"]):
        await models.save(trainer)
        return False
    drifts = trainer.drifts
    promoted = trainer.learn(example["snapshots"], example["won"])
    await models.save(trainer, learned_event_id=example["event_id"])
    if trainer.drifts > drifts:
        log.warning("trainer: drift in the serving model's error (drift #%d); the challenger takes over", trainer.drifts)
    if promoted:
        log.info("trainer: model version %d promoted", trainer.version)
    return True
