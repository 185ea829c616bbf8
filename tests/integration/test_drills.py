"""Fault drills, through Kafka and Redis only (no internals): a worker killed with kill -9 mid-batch and
replaced, Redis killed and restarted mid-stream, the broker killed and restarted mid-stream, a
rebalance from 1 to 3 workers, and a hypothesis-generated mix of valid and bad input.

Each drill asserts: every valid event counted exactly once in its lead's state (duplicates ignored),
and every bad message on the dead-letter topic with a reason, its source topic, partition and offset.
Drills that kill a server run their OWN broker or Redis on free ports; the shared ones are never touched.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from streams import demo
from streams.clients import kafka_kwargs, redis_client
from streams.settings import Settings
from streams.state import LeadStore
from tests.integration.ownstack import RedisServer, free_port, start_broker

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000  # 2026-01-01
WEB_TYPES = ("click", "visit", "email_open", "download")


def click(event_id: str, lead: str, i: int, type_: str = "click") -> dict:
    return {"event_id": event_id, "lead_id": lead, "type": type_, "ts": T0 + i * 1000, "props": {}}


def stream(tag: str, leads: int, per_lead: int) -> list[dict]:
    """Interleaved valid web events of ``leads`` leads."""
    return [click(f"{tag}-{lead}-{i}", f"{tag}-lead-{lead}", i, WEB_TYPES[i % len(WEB_TYPES)])
            for i in range(per_lead) for lead in range(leads)]


def expected_counts(events: list[dict]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    first: dict[str, dict] = {}
    for e in events:
        first.setdefault(e["event_id"], e)  # a repeated event_id counts once, as first applied
    for e in first.values():
        out.setdefault(e["lead_id"], Counter())[e["type"]] += 1
    return out


async def publish(settings: Settings, docs: list[dict], producer: AIOKafkaProducer | None = None) -> None:
    own = producer is None
    if own:
        producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5)
        await producer.start()
    try:
        futures = [await producer.send(settings.topic_web, key=d["lead_id"].encode(), value=orjson.dumps(d))
                   for d in docs]
        await asyncio.gather(*futures)
    finally:
        if own:
            await producer.stop()


async def counts_now(settings: Settings, leads: list[str]) -> dict[str, Counter]:
    client = redis_client(settings, socket_timeout=5)
    try:
        store = LeadStore(client, settings.tombstone_ttl_s)
        got = {}
        for lead in leads:
            stored = await store.get(lead)
            got[lead] = Counter(stored["state"]["counts"]) if stored else Counter()
        return got
    finally:
        await client.aclose()


async def assert_counted_once(settings: Settings, events: list[dict], timeout: float = 90.0) -> None:
    """Wait until every lead's counts equal what was sent; fail at once if any exceeds it (counted twice)."""
    want = expected_counts(events)
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await counts_now(settings, list(want))
        except OSError:  # Redis restarting
            got = None
        if got is not None:
            for lead, counts in got.items():
                over = {t: n for t, n in counts.items() if n > want[lead][t]}
                assert not over, f"{lead}: counted twice: {over} > {dict(want[lead])}"
            if got == want:
                await asyncio.sleep(1.5)  # anything still in flight would show up as a double count
                assert await counts_now(settings, list(want)) == want
                return
        if time.monotonic() > deadline:
            missing = {lead: dict(want[lead] - got[lead]) for lead in want if got and got[lead] != want[lead]}
            raise AssertionError(f"events lost: not counted within {timeout} s: {missing}")
        await asyncio.sleep(0.5)


async def read_all(settings: Settings, topic: str, idle_s: float = 2.0) -> list:
    consumer = AIOKafkaConsumer(topic, **kafka_kwargs(settings), group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        while batches := await consumer.getmany(timeout_ms=int(idle_s * 1000)):
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def wait_scored(settings: Settings, n: int, timeout: float = 60.0) -> None:
    """Until at least ``n`` score messages exist: the stream is well under way."""
    deadline = time.monotonic() + timeout
    while len(await read_all(settings, settings.topic_scores, idle_s=0.3)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} scores within {timeout} s"


def run_worker(settings: Settings, log: Path):
    return demo.start_worker(settings, log, env=dict(os.environ) | settings.to_env())


# ---------------------------------------------------------------------------------------------- drills


async def test_worker_killed_mid_batch_is_replaced_and_nothing_is_lost_or_counted_twice(
        pipeline_settings, start_worker):
    s = pipeline_settings
    events = stream("kill", leads=16, per_lead=40)  # 640
    dupes = events[:50:5]  # an upstream retry re-sends 10 of them
    first = start_worker()
    await publish(s, events[:400])
    await wait_scored(s, 120)
    os.killpg(first.pid, signal.SIGKILL)  # mid-batch: applied in Redis, offsets not yet committed
    first.wait()
    await publish(s, events[400:] + dupes)
    start_worker()
    await assert_counted_once(s, events + dupes)
    scored = {orjson.loads(r.value)["event_id"] for r in await read_all(s, s.topic_scores)
              if orjson.loads(r.value)["trigger"] == "event"}
    assert scored == {e["event_id"] for e in events}


async def test_redis_killed_and_restarted_mid_stream_loses_nothing(pipeline_settings, tmp_path):
    server = RedisServer(tmp_path / "redis").start()  # AOF, fsync always: it keeps what it acknowledged
    s = dataclasses.replace(pipeline_settings, redis_url=server.url)
    events = stream("redis", leads=12, per_lead=40)  # 480
    worker = run_worker(s, tmp_path / "worker.log")
    try:
        await publish(s, events[:240])
        await wait_scored(s, 60)
        server.kill()
        await publish(s, events[240:])  # arrives while Redis is down: the partitions wait, nothing skipped
        await asyncio.sleep(3)
        server.start()
        await assert_counted_once(s, events)
        assert worker.poll() is None, "the worker died with Redis"
    finally:
        demo.stop_worker(worker)
        server.kill()


async def test_broker_killed_and_restarted_mid_stream_loses_nothing(pipeline_settings, tmp_path):
    broker = start_broker(tmp_path / "kafka")
    s = dataclasses.replace(pipeline_settings, kafka_bootstrap=broker.bootstrap)
    events = stream("broker", leads=12, per_lead=40)  # 480
    worker = run_worker(s, tmp_path / "worker.log")
    try:
        await publish(s, events[:240])
        await wait_scored(s, 60)
        broker.kill()
        await asyncio.sleep(5)
        broker.start()
        for attempt in range(30):  # the producer's first metadata after the restart may take a moment
            try:
                await publish(s, events[240:])
                break
            except KafkaError:
                await asyncio.sleep(1)
        # The clients reconnect with back-off and the group re-forms: on a loaded 2-core machine that
        # alone has taken over 100 s.
        await assert_counted_once(s, events, timeout=240)
        assert worker.poll() is None, "the worker died with the broker"
        scored = [orjson.loads(r.value)["event_id"] for r in await read_all(s, s.topic_scores)
                  if orjson.loads(r.value)["trigger"] == "event"]
        assert set(scored) == {e["event_id"] for e in events}
    finally:
        demo.stop_worker(worker)
        broker.stop()


async def test_rebalance_from_one_to_three_workers_loses_nothing(pipeline_settings, start_worker):
    s = pipeline_settings
    events = stream("scale", leads=20, per_lead=30)  # 600 over 4 partitions
    start_worker()
    await publish(s, events[:200])
    await wait_scored(s, 50)
    publishing = asyncio.create_task(publish(s, events[200:]))
    for _ in range(2):  # two more join while events flow: partitions move twice
        await asyncio.to_thread(start_worker, LEADSTREAM_WEB_PORT=str(free_port()))
    await publishing
    await assert_counted_once(s, events, timeout=120)
    scored = {orjson.loads(r.value)["event_id"] for r in await read_all(s, s.topic_scores)
              if orjson.loads(r.value)["trigger"] == "event"}
    assert scored == {e["event_id"] for e in events}


# ---------------------------------------------------------------------------------------------- fuzz


def valid_event(tag: str):
    return st.builds(
        lambda lead, i, type_, dt: {"event_id": f"{tag}-{lead}-{i}", "lead_id": f"{tag}-lead-{lead}", "type": type_,
                                    "ts": T0 + dt, "props": {}},
        st.integers(0, 5), st.integers(0, 10**6), st.sampled_from(WEB_TYPES), st.integers(0, 10**10))


def json_text():
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # JSON-encodable strings
    scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | text
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                        max_leaves=8)


def bad_message(tag: str, max_bytes: int):
    """(key, value, reason fragment) of a message that breaks the contract in one way."""
    ok = valid_event(f"{tag}-bad")

    def with_(change):
        return ok.map(lambda e: (e["lead_id"].encode(), orjson.dumps(change(dict(e)))))

    return st.one_of(
        st.binary(max_size=200).filter(lambda b: _not_a_json_object(b)).map(lambda b: (b"k", b)),
        json_text().filter(lambda v: not isinstance(v, dict)).map(lambda v: (b"k", orjson.dumps(v))),
        st.builds(lambda e, v: (e[0], orjson.dumps(orjson.loads(e[1]) | {"event_id": v})), with_(lambda e: e),
                  st.integers(-2**63, 2**63 - 1) | st.none() | st.lists(st.integers(0, 9), max_size=2) | st.just("")),
        with_(lambda e: e | {"type": "telepathy"}),
        with_(lambda e: e | {"props": "not an object"}),
        with_(lambda e: e | {"ts": "yesterday"}),
        with_(lambda e: e | {"ts": 99_999_999_999_999_999}),  # far future: used to break the step
        with_(lambda e: e | {"ts": int(time.time() * 1000) + 365 * 86_400_000}),  # a clock off by a year
        with_(lambda e: e | {"type": "stage_changed", "props": {"stage": "new"}}),  # a CRM type on the web topic
        with_(lambda e: {k: v for k, v in e.items() if k != "lead_id"}),
        with_(lambda e: e | {"props": {"asset": "x" * max_bytes}}),  # oversized
        ok.map(lambda e: (None, orjson.dumps(e))),  # no key
        ok.map(lambda e: (b"someone-else", orjson.dumps(e))),  # key != lead_id
        ok.map(lambda e: (e["lead_id"].encode(), None)),  # null value
    )


def _not_a_json_object(raw: bytes) -> bool:
    try:
        return not isinstance(orjson.loads(raw), dict)
    except orjson.JSONDecodeError:
        return True


async def test_fuzzed_input_every_valid_event_counted_once_every_bad_one_dead_lettered(
        pipeline_settings, start_worker, producer):
    s = pipeline_settings
    tag = uuid.uuid4().hex[:6]
    batches: list[list[tuple[bool, bytes | None, bytes | None]]] = []

    @hyp_settings(max_examples=6, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.just(True), valid_event(tag)) |
                    st.tuples(st.just(False), bad_message(tag, s.max_event_bytes)), min_size=20, max_size=80))
    def generate(messages):
        batches.append([(good, *((doc["lead_id"].encode(), orjson.dumps(doc)) if good else doc))
                        for good, doc in messages])

    generate()  # hypothesis draws the inputs; the system under test is stateful, so they run as one stream
    messages = [m for batch in batches for m in batch]
    assert sum(1 for m in messages if m[0]) and sum(1 for m in messages if not m[0])
    start_worker()
    bad_offsets: dict[tuple[int, int], bytes | None] = {}
    for good, key, value in messages:
        meta = await producer.send_and_wait(s.topic_web, key=key, value=value)
        if not good:
            bad_offsets[(meta.partition, meta.offset)] = value
    valid = [orjson.loads(v) for good, _, v in messages if good]
    await assert_counted_once(s, valid)

    deadline = time.monotonic() + 60
    while len(dead := await read_all(s, s.topic_dead_letter, idle_s=1.0)) < len(bad_offsets):
        assert time.monotonic() < deadline, f"{len(dead)} of {len(bad_offsets)} bad messages dead-lettered"
    docs = [orjson.loads(r.value) for r in dead]
    assert len(docs) == len(bad_offsets)  # each bad message once, nothing valid among them
    for doc in docs:
        assert doc["source_topic"] == s.topic_web and doc["error"]
        raw = bad_offsets[(doc["partition"], doc["offset"])]
        assert (base64.b64decode(doc["raw"]) if doc["raw"] is not None else None) == raw
