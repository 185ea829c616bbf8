"""aiokafka produce -> consume through the real broker, and the Redis test database."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


async def test_produce_consume_roundtrip(topic_factory, producer, consume) -> None:
    topic = await topic_factory(partitions=4)
    sent = {f"lead-{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(20)}
    for key, value in sent.items():
        await producer.send(topic, key=key, value=value, headers=[("source", b"test")])
    await producer.flush()

    records = await consume(topic, len(sent))

    assert {r.key: r.value for r in records} == sent
    assert {r.partition for r in records} > {0}  # keys spread over the 4 partitions
    assert all(r.headers == (("source", b"test"),) for r in records)
    # Per key, a partition is stable: the same key always lands on the same partition.
    again = await producer.send_and_wait(topic, key=b"lead-0", value=b"again")
    first = next(r for r in records if r.key == b"lead-0")
    assert again.partition == first.partition


async def test_redis_client_uses_the_test_database(redis_client) -> None:
    await redis_client.set("leadstream:test", "1")
    assert await redis_client.get("leadstream:test") == b"1"
    assert redis_client.connection_pool.connection_kwargs["db"] == 15
