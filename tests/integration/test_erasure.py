"""Erasure: after ``leadstream forget``, nothing in Redis names the lead or holds its data, and the
score topic's last word on it is a tombstone (what a compacted topic keeps)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from streams.clients import kafka_kwargs, redis_client
from streams.publish import run_forget

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000
EMAIL = "maria.schmidt@example.com"


def ev(event_id, type_, ts, **props):
    return {"event_id": event_id, "lead_id": "lead-maria", "type": type_, "ts": ts, "props": props}


async def last_record_per_key(settings, topic):
    consumer = AIOKafkaConsumer(topic, **kafka_kwargs(settings), group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    last = {}
    try:
        while batches := await consumer.getmany(timeout_ms=2000):
            for batch in batches.values():
                for r in batch:
                    last[r.key] = r.value
    finally:
        await consumer.stop()
    return last


async def redis_dump(settings):
    """Every key of the pipeline's Redis database with its content, as bytes."""
    client = redis_client(settings)
    dump = {}
    try:
        async for key in client.scan_iter(count=1000):
            kind = (await client.type(key)).decode()
            if kind == "hash":
                content = await client.hgetall(key)
            elif kind == "zset":
                content = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                content = await client.smembers(key)
            else:
                content = await client.get(key)
            dump[key] = repr(content).encode()
    finally:
        await client.aclose()
    return dump


async def test_forget_erases_the_lead_from_every_redis_key_and_tombstones_its_scores(
        pipeline_settings, start_worker, producer, consume):
    s = pipeline_settings
    start_worker()
    events = [("crm", ev("m1", "lead_created", T0, fields={"email": EMAIL, "city": "Berlin", "owner": "Ana"})),
              ("web", ev("m2", "download", T0 + 1000)),
              ("crm", ev("m3", "stage_changed", T0 + 2000, stage="proposal")),
              ("crm", ev("m4", "activity_created", T0 + 3000, activity_id="call-1", kind="call"))]
    events += [("crm", {**ev("o1", "lead_created", T0, fields={"owner": "Ana"}), "lead_id": "lead-other"})]
    for kind, doc in events:
        topic = s.topic_web if kind == "web" else s.topic_crm
        await producer.send_and_wait(topic, key=doc["lead_id"].encode(), value=orjson.dumps(doc))
    await consume(s.topic_scores, len(events), timeout=60)
    before = await redis_dump(s)
    assert any(b"lead-maria" in k or b"lead-maria" in v for k, v in before.items())  # it was there

    assert await asyncio.to_thread(run_forget, s, ["lead-maria"]) == 0
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        dump = await redis_dump(s)
        leftovers = {k: v for k, v in dump.items()
                     if any(x in k or x in v for x in (b"lead-maria", EMAIL.encode(), b"Berlin"))}
        if not leftovers:
            break
        assert asyncio.get_running_loop().time() < deadline, f"still in Redis: {leftovers}"
        await asyncio.sleep(0.5)
    assert any(b"lead-other" in k or b"lead-other" in v for k, v in dump.items())  # only that lead went
    last = await last_record_per_key(s, s.topic_scores)
    assert last[b"lead-maria"] is None  # a compacted consumer forgets the lead
    assert last[b"lead-other"] is not None
