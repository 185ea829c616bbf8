"""The agents: scoring (every partition, every event) and training (one partition, one learner).

Scorers run with concurrency 1 so a lead's events are applied in partition order; producers key
events by lead_id, so no repartitioning (group_by) is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
from streams.dashboard import dashboard_data, render_dashboard
from streams.reports import funnel
from streams.pipeline import ContentionError, EventPipeline, Message, Out, dead_letter
from streams.settings import Settings
from streams.state import LeadStore, ModelStore
from streams.topics import declare_topics

log = logging.getLogger(__name__)
T = TypeVar("T")


def register_agents(app: faust.App, settings: Settings) -> EventPipeline:
    """Declare topics, agents, the checkpoint poller and the web views on ``app``."""
    topics = declare_topics(app, settings)
    client = aioredis.Redis.from_url(settings.redis_url)
    models = ModelStore(client)
    scorer = Scorer(load_rules(settings.scoring_config.read_text()))
    pipeline = EventPipeline(LeadStore(client, settings.dedupe_ttl_s), scorer,
                             topic_kinds={settings.topic_web: "web", settings.topic_crm: "crm"},
                             max_event_bytes=settings.max_event_bytes)

    @app.agent(topics.inputs, concurrency=1)
    async def score_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            m = event.message
            outs = await handle_with_retry(pipeline, Message(m.topic, m.partition, m.offset, m.key, m.value))
            for out in outs:
                await topics.by_kind(out.kind).send(key=out.key, value=out.value)

    @app.agent(topics.training, concurrency=1)
    async def train(stream: faust.StreamT) -> None:
        # A new trainer continues the version numbers, so consumers always see them rise.
        trainer = await models.load_trainer() or Trainer(min_outcomes=settings.model_min_outcomes,
                                                         batch_every=settings.model_batch_every,
                                                         version=await models.version())
        trainer.min_outcomes = settings.model_min_outcomes  # the setting wins over the checkpoint's
        trainer.defer_refits_to_caller()  # batch refits run in a thread (learn_one), not on the event loop
        trainer.set_batch_every(settings.model_batch_every)
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

    checked = {"version": -1}  # the last checkpoint version looked at, loadable or not

    @app.timer(interval=settings.model_poll_s)
    async def refresh_model() -> None:
        version = await models.version()
        if version != checked["version"]:
            checked["version"] = version
            serving = await models.load_serving()
            if serving is not None:
                scorer.model = serving
                log.info("scorer: now serving model version %d", serving.version)

    @app.page("/model")
    async def model_report(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json(await models.report() or {"version": 0})

    @app.page("/funnel")
    async def funnel_report(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json(await funnel(settings, float(request.query.get("stall_days", 14))))

    @app.page("/dashboard")
    async def dashboard(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        data = await dashboard_data(settings, float(request.query.get("stall_days", 14)))
        return web.html(render_dashboard(data))

    @app.page("/health")
    async def health(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json({"ok": True, "counts": dict(pipeline.counts)})

    return pipeline


async def with_retry(attempt: Callable[[], Awaitable[T]], what: str, max_backoff_s: float = 30.0) -> T:
    """Run ``attempt`` until it gets through Redis outages and lead contention: a message is never
    skipped because of them (no data lost); the partition waits instead."""
    backoff = 0.1
    while True:
        try:
            return await attempt()
        except (RedisConnectionError, RedisTimeoutError, ContentionError) as exc:
            log.warning("%s: %r; retrying in %.1f s", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)


async def handle_with_retry(pipeline: EventPipeline, msg: Message) -> list[Out]:
    return await with_retry(lambda: pipeline.handle(msg), f"{msg.topic}/{msg.partition}/{msg.offset}")


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
    if trainer.refits_due():  # the batch learner's refit (0.1-3 s): in a thread, the event loop keeps going
        log.info("trainer: batch learner refitted in %.2f s", await asyncio.to_thread(trainer.refit))
    await models.save(trainer, learned_event_id=example["event_id"])
    if trainer.drifts > drifts:
        log.warning("trainer: drift in the serving model's error (drift #%d); the challenger takes over", trainer.drifts)
    if promoted:
        log.info("trainer: champion is now %s (model version %d)", trainer.tournament.champion, trainer.version)
    return True
