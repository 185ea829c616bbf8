"""The topics of the public contract, from settings, plus their creation at start."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    inputs: faust.TopicT  # web and CRM events, consumed by one agent so a lead's events never race
    scores: faust.TopicT
    hot: faust.TopicT
    dead_letter: faust.TopicT
    training: faust.TopicT  # one partition: a single trainer sees every closed deal in order

    def by_kind(self, kind: str) -> faust.TopicT:
        return {"scores": self.scores, "hot": self.hot, "dead_letter": self.dead_letter,
                "training": self.training}[kind]


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    return Topics(
        inputs=app.topic(settings.topic_web, settings.topic_crm, **raw),
        scores=app.topic(settings.topic_scores, partitions=settings.partitions, **raw),
        hot=app.topic(settings.topic_hot, partitions=settings.partitions, **raw),
        dead_letter=app.topic(settings.topic_dead_letter, partitions=settings.partitions, **raw),
        training=app.topic(settings.topic_training, partitions=1, **raw),
    )


def topic_plan(settings: Settings) -> dict[str, int]:
    """Every topic the worker needs, with its partition count."""
    plan = {t: settings.partitions for t in (settings.topic_web, settings.topic_crm, settings.topic_scores,
                                             settings.topic_hot, settings.topic_dead_letter)}
    plan[settings.topic_training] = 1
    return plan


async def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> list[str]:
    """Create the missing topics; returns the names created. Existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} (LEADSTREAM_KAFKA) does not answer; "
                                   "is it running? `leadstream up` starts a local one") from None
            await asyncio.sleep(1)
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in topic_plan(settings).items() if name not in existing]
        created = []
        for topic in missing:
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        await admin.close()
