"""The topics of the public contract, from settings, plus their creation at start."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code

from streams.clients import kafka_kwargs
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


async def ensure_topics(settings: Settings, plan: dict[str, int] | None = None, timeout_s: float = 60.0) -> list[str]:
    """Create the missing topics of ``plan`` (name -> partitions; default: the worker's
    :func:`topic_plan`) and wait until each partition has a leader; returns the names created.
    Existing topics are left as they are."""
    plan = topic_plan(settings) if plan is None else plan
    admin = AIOKafkaAdminClient(**kafka_kwargs(settings), request_timeout_ms=10_000)
    await _start(admin, settings, timeout_s)
    try:
        missing = sorted(set(plan) - set(await admin.list_topics()))
        if not missing:
            return []
        brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
        replication = min(3, brokers)  # 1 on a developer's single broker
        response = await admin.create_topics([NewTopic(t, plan[t], replication) for t in missing])
        for topic_error in response.topic_errors:  # aiokafka reports errors here instead of raising
            topic, code = topic_error[0], topic_error[1]
            if code not in (0, TopicAlreadyExistsError.errno):  # another process may have just created it
                raise for_code(code)(f"creating topic {topic!r}: {topic_error[2] if len(topic_error) > 2 else ''}")
        await _wait_for_leaders(admin, missing)
        log.info("created topics: %s", ", ".join(missing))
        return missing
    finally:
        await admin.close()


async def _start(admin: AIOKafkaAdminClient, settings: Settings, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await admin.start()
            return
        except KafkaConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} (LEADSTREAM_KAFKA) does not answer; "
                                   "is it running? `leadstream up` starts a local one") from None
            await asyncio.sleep(1)


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float = 30.0) -> None:
    # create_topics answers before the partitions have leaders; producing then only logs
    # NotLeaderForPartition retries, so wait until the metadata shows a leader everywhere.
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(topics)
        if all(t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
               for t in described):
            return
        if time.monotonic() > deadline:
            raise KafkaError(f"topics {topics} have partitions without a leader after {timeout_s} s")
        await asyncio.sleep(0.1)
