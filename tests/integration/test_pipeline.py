"""The scoring pipeline end to end: aiokafka producer -> real Kafka -> worker -> real Redis -> output topics."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
import os
import signal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from streams.reports import funnel
from streams.state import lead_key

pytestmark = pytest.mark.integration
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01


def ev(event_id, lead_id, type_, ts, **props):
    return {"event_id": event_id, "lead_id": lead_id, "type": type_, "ts": ts, "props": props}


def valid_events():
    """Events of 3 leads across both topics; lead-hot crosses the hot threshold once."""
    events = [
        ("crm", ev("c1", "lead-a", "lead_created", T0, fields={"country": "Germany", "age": 33, "industry": "Software"})),
        ("web", ev("w1", "lead-a", "visit", T0 + 1000, session_id="s1", duration_s=60)),
        ("web", ev("w2", "lead-a", "page_view", T0 + 2000, url="/pricing")),
        ("web", ev("w3", "lead-a", "click", "2026-01-01T00:00:03Z", url="/demo")),
        ("crm", ev("c2", "lead-a", "stage_changed", T0 + DAY, stage="contacted")),
        ("crm", ev("c3", "lead-a", "activity_created", T0 + DAY, activity_id="a1", kind="call")),
        ("web", ev("w0", "lead-a", "email_open", T0 - DAY, campaign="jan")),  # out of order
        ("crm", ev("c10", "lead-b", "lead_created", T0, fields={"country": "France"})),
        ("web", ev("w10", "lead-b", "download", T0 + 5000, asset="guide.pdf")),
        ("crm", ev("c11", "lead-b", "lead_deleted", T0 + DAY)),
    ]
    hot = [("crm", ev("h1", "lead-hot", "lead_created", T0, fields={"age": 30, "industry": "software", "job_title": "VP Sales"})),
           ("web", ev("h2", "lead-hot", "download", T0 + 1000)),
           ("crm", ev("h3", "lead-hot", "stage_changed", T0 + 2000, stage="negotiation")),
           ("web", ev("h4", "lead-hot", "download", T0 + 3000)),
           ("web", ev("h5", "lead-hot", "email_open", T0 + 4000))]
    return events + hot


def bad_messages(topics):
    """(topic, key, value, expected reason fragment): every kind of bad input."""
    good = orjson.dumps(ev("bad-x", "lead-z", "click", T0))
    return [
        (topics["web"], b"lead-z", b"{definitely not json", "invalid JSON"),
        (topics["web"], b"lead-z", orjson.dumps(ev("bad-1", "lead-z", "page_view", T0)), "schema violation at props"),
        (topics["crm"], b"lead-z", orjson.dumps(ev("bad-2", "lead-z", "telepathy", T0)), "unknown event type"),
        (topics["web"], None, good, "missing key"),
        (topics["web"], b"lead-other", good, "does not match lead_id"),
        (topics["web"], b"lead-z", orjson.dumps(ev("bad-3", "lead-z", "click", T0, url="x" * 70000)), "exceeds the limit"),
        (topics["crm"], b"lead-z", good, "does not belong on the crm topic"),
        (topics["web"], b"lead-z", None, "empty value"),
    ]


async def publish(producer, topics, events):
    for kind, doc in events:
        await producer.send_and_wait(topics[kind], key=doc["lead_id"].encode(), value=orjson.dumps(doc))


async def test_every_event_scored_once_duplicates_ignored_bad_input_dead_lettered(
        pipeline_settings, start_worker, producer, consume, redis_client):
    s = pipeline_settings
    topics = {"web": s.topic_web, "crm": s.topic_crm}
    start_worker()
    events = valid_events()
    await publish(producer, topics, events)
    await publish(producer, topics, [events[2], events[4]])  # redelivered by an upstream retry: same event_ids
    bad = bad_messages(topics)
    for topic, key, value, _ in bad:
        await producer.send_and_wait(topic, key=key, value=value)

    await consume(s.topic_scores, len(events), timeout=60)
    await consume(s.topic_dead_letter, len(bad), timeout=30)
    await asyncio.sleep(2)  # anything extra (a duplicate scored twice) would arrive by now
    records = await read_all(s.kafka_bootstrap, s.topic_scores)
    # These events are from 2026-01-01: their leads are also rescored at the current time (decay).
    decayed = [r for r in records if r.value is not None and orjson.loads(r.value)["trigger"] == "decay"]
    assert all(orjson.loads(r.value)["event_id"] is None for r in decayed)
    scores = [r for r in records if r not in decayed]
    assert len(scores) == len(events), "a duplicate event_id was scored twice, or an event was lost"

    tombstones = [r.key for r in scores if r.value is None]
    bodies = [orjson.loads(r.value) for r in scores if r.value is not None]
    by_id = {b["event_id"]: b for b in bodies}
    assert len(by_id) == len(bodies), "an event was scored twice"
    # lead-b's delete is a tombstone; its download (web topic) may be processed after the delete
    # (crm topic): it is older than the delete, so it gets a tombstone instead of resurrecting the lead.
    assert set(tombstones) == {b"lead-b"} and len(tombstones) in (1, 2)
    assert set(by_id) | {"c11", "w10"} == {doc["event_id"] for _, doc in events}
    assert "c11" not in by_id and len(by_id) + len(tombstones) == len(events)
    for body in bodies:
        assert 0 <= body["score"] <= 1 and body["lead_id"] in {"lead-a", "lead-b", "lead-hot"}
        assert body["grade"] in {"A+", "A", "B+", "B", "C", "D"} and body["source"] == "rules"
        assert len(body["reasons"]) <= 5 and body["model_version"] == 0
    assert all(r.key.decode() == orjson.loads(r.value)["lead_id"] for r in scores if r.value is not None)

    hot = await read_all(s.kafka_bootstrap, s.topic_hot)
    assert [r.key for r in hot] == [b"lead-hot"]

    dead = await read_all(s.kafka_bootstrap, s.topic_dead_letter)
    assert len(dead) == len(bad)
    got = sorted((orjson.loads(r.value) for r in dead), key=lambda d: (d["source_topic"], d["offset"]))
    sent = sorted(bad, key=lambda b: b[0])
    for doc in got:
        assert {"error", "source_topic", "partition", "offset", "key", "raw", "received_at"} <= set(doc)
    reasons = [doc["error"] for doc in got]
    for topic, key, value, fragment in sent:
        matching = [d for d in got if fragment in d["error"] and d["source_topic"] == topic]
        assert matching, f"no dead letter with {fragment!r} among {reasons}"
        raw = matching[0]["raw"]
        assert (base64.b64decode(raw) if raw is not None else None) == value

    state = orjson.loads(await redis_client.hget(lead_key("lead-a"), "s"))
    assert state["counts"] == {"lead_created": 1, "visit": 1, "page_view": 1, "click": 1, "stage_changed": 1,
                               "activity_created": 1, "email_open": 1}
    assert state["last_touch_ts"] == T0 + 3000  # the late email_open did not move recency
    assert state["stage"] == "contacted"
    assert not await redis_client.exists(lead_key("lead-b"))  # the late download did not resurrect it

    report = await funnel(s, stall_days=14)  # the department heads' view, read back from Redis
    assert report["leads"] == 2  # lead-a and lead-hot; lead-b was deleted
    assert report["stages"]["contacted"]["open"] == 1 and report["stages"]["negotiation"]["open"] == 1

    # (the dashboard is `leadstream api`'s now: tests/integration/test_api.py)
    health = orjson.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{s.web_port}/health"))
    assert health["counts"]["scored"] + health["counts"]["dead_letter"] >= len(events) + len(bad) - 1


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def test_worker_killed_mid_batch_loses_nothing_and_counts_nothing_twice(
        pipeline_settings, start_worker, producer, consume, redis_client):
    """kill -9 between a batch's Redis write and Kafka's acknowledgement of its outputs (seen as
    re-send material left in Redis), then a replacement: every event scored, each counted once."""
    s = pipeline_settings
    n_leads, per_lead, chunks = 40, 60, 6
    events = [("web", ev(f"k-{lead}-{i}", f"lead-{lead}", "click", T0 + i * 1000))
              for i in range(per_lead) for lead in range(n_leads)]
    size = len(events) // chunks
    killed_mid_batch = 0
    # Small batches, and re-send material dropped with the offsets' commit at most every 5 s: a chunk is
    # ~20 batches whose material stays seconds in Redis, so the kill lands while it is there (with the
    # defaults one batch took the whole chunk and its material lived a few ms: a poll could miss it).
    killable = {"LEADSTREAM_BATCH_MAX_EVENTS": "20", "LEADSTREAM_COMMIT_EVERY_SECONDS": "5"}
    for chunk in range(chunks - 1):
        await publish(producer, {"web": s.topic_web}, events[chunk * size:(chunk + 1) * size])
        worker = start_worker(**killable)
        await _until_pending_outputs(redis_client, timeout_s=30)  # a batch is written, its outputs not yet acked
        os.killpg(worker.pid, signal.SIGKILL)  # no clean shutdown: uncommitted offsets get redelivered
        worker.wait()
        killed_mid_batch += await _pending_outputs(redis_client) > 0
        if killed_mid_batch:
            break
    await publish(producer, {"web": s.topic_web}, events[(chunk + 1) * size:])
    assert killed_mid_batch, "no kill landed between a write and the acknowledgement of its outputs"
    start_worker()
    deadline = asyncio.get_running_loop().time() + 120
    while not await _all_counted(redis_client, n_leads, per_lead):
        assert asyncio.get_running_loop().time() < deadline, "events lost: counts never reached"
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)  # counts are exact now; let the last scores flush and their material go
    records = await read_all(s.kafka_bootstrap, s.topic_scores)
    scored = [orjson.loads(r.value)["event_id"] for r in records if orjson.loads(r.value)["trigger"] == "event"]
    assert set(scored) == {doc["event_id"] for _, doc in events}  # every event scored at least once
    assert await _all_counted(redis_client, n_leads, per_lead)  # and counted exactly once
    assert await _pending_outputs(redis_client) == 0  # re-send material only lives until acknowledged


async def _until_pending_outputs(redis_client, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await _pending_outputs(redis_client) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


async def _pending_outputs(redis_client) -> int:
    """Re-send material in Redis: outputs written but not yet acknowledged by Kafka."""
    pending = 0
    async for key in redis_client.scan_iter(match="lead:{*}:*"):
        pending += sum(1 for field in await redis_client.hkeys(key) if field.startswith(b"o:"))
    return pending


async def _all_counted(redis_client, n_leads, per_lead):
    for lead in range(n_leads):
        raw = await redis_client.hget(lead_key(f"lead-{lead}"), "s")
        if raw is None or orjson.loads(raw)["counts"] != {"click": per_lead}:
            if raw is not None:
                assert orjson.loads(raw)["counts"]["click"] <= per_lead, "an event was counted twice"
            return False
    return True


async def read_all(bootstrap, topic, idle_s=3.0):
    """Every record of ``topic``, read until nothing new arrives for ``idle_s``."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batches:
                return records
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
