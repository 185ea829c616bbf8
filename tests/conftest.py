"""Shared fixtures: a real Kafka and Redis for the integration tests (``@pytest.mark.integration``).

The ``stack`` fixture reuses a stack that already runs (``leadstream up``, or LEADSTREAM_KAFKA/LEADSTREAM_REDIS)
and stops at session end only what it started itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlparse, urlunparse

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from streams import stack as stack_mod
from streams import clients
from streams.clients import kafka_kwargs
from streams.settings import Settings
from streams.topics import ensure_topics

TEST_REDIS_DB = 15  # tests flush this database only, never the pipeline's


def redis_test_url(url: str, db: int = TEST_REDIS_DB) -> str:
    """``url`` with its database replaced by ``db`` (the path for redis://, the query for unix://)."""
    parts = urlparse(url)
    if parts.scheme == "unix":
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("db="))
        return urlunparse(parts._replace(query=f"{query}&db={db}" if query else f"db={db}"))
    return urlunparse(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    settings = Settings.from_env()
    started = stack_mod.up(settings).started
    yield settings
    if started:
        stack_mod.down(settings, services=started)


@pytest.fixture(scope="session")
async def kafka_admin(stack: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**kafka_kwargs(stack))
    await admin.start()
    yield admin
    await admin.close()


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def topic_factory(stack: Settings, kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[TopicFactory]:
    """``await topic_factory(partitions=1, prefix="test")`` creates a uniquely named topic; deleted after the test."""
    created: list[str] = []

    async def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        created.append(name)
        await ensure_topics(stack, {name: partitions})  # the worker's own creation: waits for the leaders
        return name

    yield make
    if created:
        await kafka_admin.delete_topics(created)



@pytest.fixture
async def redis_client(stack: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client on the tests' own database (15), empty at the start of each test."""
    client = clients.redis_client(stack, redis_test_url(stack.redis_url))
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def producer(stack: Settings) -> AsyncIterator[AIOKafkaProducer]:
    prod = AIOKafkaProducer(**kafka_kwargs(stack), acks="all")
    await prod.start()
    yield prod
    await prod.stop()


Consume = Callable[..., Awaitable[list[ConsumerRecord]]]


@pytest.fixture
def consume(stack: Settings) -> Consume:
    """``await consume(topic, n, timeout=30)``: the first ``n`` records of ``topic`` from the earliest offset.

    Fails with the records seen so far when fewer than ``n`` arrive in time.
    """

    async def read(topic: str, n: int, timeout: float = 30.0) -> list[ConsumerRecord]:
        # No group: reads every partition from the start, commits nothing, leaves no group behind.
        consumer = AIOKafkaConsumer(topic, **kafka_kwargs(stack), group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        records: list[ConsumerRecord] = []
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(records) < n:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise AssertionError(f"{topic}: {len(records)} of {n} records within {timeout} s: {records}")
                batches = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000), max_records=n - len(records))
                for batch in batches.values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        return records

    return read
