"""What a worker runs: the scoring loop (every input partition it is assigned, every event, in
partition order; see :mod:`streams.consumer`), the training agent (one partition, one learner), the
timers (checkpoints, model refresh, rescoring) and the web views.

Producers key events by lead_id, so a lead's events are on one partition and no repartitioning
(group_by) is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import faust
import mode
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.rules import load_rules
from models.scoring import Scorer
from streams import metrics
from streams.clients import redis_client
from streams.consumer import ScoringLoop
from streams.pipeline import EventPipeline, Message, dead_letter
from streams.rescoring import Rescorer, Sender
from streams.retry import with_retry
from streams.settings import Settings
from streams.training import TrainingLoop
from streams.state import LeadStore, ModelStore
from streams.topics import Topics, declare_topics
from streams.web import register_web

log = logging.getLogger(__name__)


def register_agents(app: faust.App, settings: Settings) -> EventPipeline:
    """Declare topics, the scoring loop and its timers, the training agent and its checkpoints (each
    as LEADSTREAM_WORKER_ROLES says), and the web views on ``app``."""
    topics = declare_topics(app, settings)
    client = redis_client(settings)
    models = ModelStore(client)
    scorer = Scorer(load_rules(settings.scoring_config.read_text()))
    pipeline = EventPipeline(LeadStore(client, settings.tombstone_ttl_s), scorer,
                             topic_kinds={settings.topic_web: "web", settings.topic_crm: "crm"},
                             max_event_bytes=settings.max_event_bytes, dedupe_ids=settings.dedupe_ids,
                             rescore_every_ms=settings.rescore_every_s * 1000,
                             max_future_skew_ms=settings.max_future_skew_s * 1000)
    lags: Callable[[], Iterable[tuple[str, int, int]]] = lambda: ()
    if settings.runs("scoring"):
        lags = _register_scoring(app, settings, topics, client, models, pipeline)
    if settings.runs("training"):
        _register_training(app, settings, topics, models, scorer)
    register_web(app, settings, pipeline, models, lags)
    return pipeline


def _register_scoring(app: faust.App, settings: Settings, topics: Topics, client: aioredis.Redis,
                      models: ModelStore, pipeline: EventPipeline) -> Callable[[], Iterable[tuple[str, int, int]]]:
    """The scoring loop (a service), the model poller and the rescoring timer; returns the loop's lags."""
    sender = Sender(app, topics)
    scoring = ScoringLoop(settings, pipeline, sender.enqueue, on_crash=app.crash)
    rescorer = Rescorer(settings, pipeline, client, sender, owned=scoring.assigned)
    scorer = pipeline.scorer

    @app.service
    class Scoring(mode.Service):
        """The scoring loop, started and stopped with the app (before its producer stops)."""

        async def on_start(self) -> None:
            await scoring.start()

        async def on_stop(self) -> None:
            await scoring.stop()

    checked = {"version": -1}  # the last checkpoint version looked at, loadable or not

    @app.timer(interval=settings.model_poll_s)
    async def refresh_model() -> None:
        try:
            version = await models.version()
            if version != checked["version"]:
                serving = await models.load_serving()
                checked["version"] = version
                if serving is not None:
                    scorer.model = serving
                    rescorer.model_changed()
                    log.info("scorer: now serving model version %d", serving.version)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # an exception here would crash the whole app
            log.warning("model poller: Redis unavailable (%r); next try in %.1f s", exc, settings.model_poll_s)

    @app.timer(interval=settings.rescore_poll_s)
    async def rescore() -> None:
        await survive(lambda: with_retry(rescorer.tick, "rescoring"), "rescoring")

    return scoring.lags


def _register_training(app: faust.App, settings: Settings, topics: Topics, models: ModelStore,
                       scorer: Scorer) -> None:
    """The training agent (one partition: one trainer in the group) and its checkpoint timer."""

    async def dead_letter_training(m: Message, exc: Exception) -> None:
        log.error("trainer: could not learn from %s/%s/%s: %r", m.topic, m.partition, m.offset, exc)
        doc = dead_letter(m, f"trainer could not learn from it: {exc!r}", int(time.time() * 1000))
        await topics.dead_letter.send(key=doc.key, value=doc.value)
        metrics.observe_dead_letter(f"trainer could not learn from it: {exc!r}")

    training = TrainingLoop(models, settings, scorer.rules.fields, dead_letter_training)

    @app.agent(topics.training, concurrency=1)
    async def train(stream: faust.StreamT) -> None:
        # Faust's assignment makes one worker the trainer; which deals to learn is decided by the
        # offset saved in the checkpoint, not by Faust's committed offset (see TrainingLoop).
        async for event in stream.events():
            m = event.message
            await training.handle(Message(m.topic, m.partition, m.offset, m.key, m.value))

    @app.timer(interval=min(1.0, settings.checkpoint_every_s))
    async def checkpoint_when_due() -> None:
        owns = any(tp.topic == settings.topic_training for tp in app.consumer.assignment())
        await survive(lambda: training.tick(owns), "trainer checkpoint")


async def survive(tick: Callable[[], Awaitable[object]], what: str) -> None:
    """Run a timer's work; a Kafka or Redis outage must not crash the app (Faust stops the whole
    worker when a timer raises): log it, and the next tick tries again."""
    try:
        await tick()
    except (KafkaError, OSError, RedisError) as exc:
        log.warning("%s: %r; trying again at the next tick", what, exc)
