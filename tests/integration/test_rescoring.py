"""Scores that stay true when nothing happens: decay and model rescoring by a real worker."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from models.learner import Trainer
from streams.state import ModelStore
from streams.views import Views

pytestmark = pytest.mark.integration
DAY = 86_400_000


def ev(event_id, lead_id, type_, ts, **props):
    return {"event_id": event_id, "lead_id": lead_id, "type": type_, "ts": ts, "props": props}


def hot_lead(lead_id, ts):
    """A lead that was very active 60 days ago and then went silent."""
    events = [("crm", ev(f"{lead_id}-c", lead_id, "lead_created", ts, fields={"age": 30, "owner": "Ana"}))]
    events += [("web", ev(f"{lead_id}-d{i}", lead_id, "download", ts + i)) for i in range(2)]
    events += [("web", ev(f"{lead_id}-f{i}", lead_id, "form_submit", ts + 10 + i)) for i in range(2)]
    events += [("crm", ev(f"{lead_id}-s", lead_id, "stage_changed", ts + 20, stage="closing"))]
    events += [("web", ev(f"{lead_id}-k{i}", lead_id, "click", ts + 30 + i)) for i in range(3)]
    return events


async def scores_of(bootstrap, topic, want, timeout=60.0):
    """Score messages of ``topic`` until ``want(messages)`` holds."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    messages = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not want(messages):
            assert asyncio.get_running_loop().time() < deadline, f"not seen in {timeout} s: {messages[-5:]}"
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                messages += [orjson.loads(r.value) for r in batch if r.value]
    finally:
        await consumer.stop()
    return messages


async def test_a_silent_lead_decays_and_a_new_model_reaches_quiet_leads(pipeline_settings, start_worker, producer,
                                                                       redis_client):
    s = pipeline_settings
    old = int(time.time() * 1000) - 60 * DAY
    events = hot_lead("quiet-1", old) + hot_lead("quiet-2", old + 1)
    start_worker(LEADSTREAM_RESCORE_EVERY_SECONDS="10", LEADSTREAM_RESCORE_POLL_SECONDS="0.5",
                 LEADSTREAM_MODEL_POLL_SECONDS="0.5", LEADSTREAM_RESCORE_MODEL_EVERY_SECONDS="0")
    for kind, doc in events:
        topic = s.topic_web if kind == "web" else s.topic_crm
        await producer.send_and_wait(topic, key=doc["lead_id"].encode(), value=orjson.dumps(doc))

    def decayed(messages):
        return {m["lead_id"] for m in messages if m.get("trigger") == "decay"} == {"quiet-1", "quiet-2"}

    messages = await scores_of(s.kafka_bootstrap, s.topic_scores, decayed)
    last_event = [m for m in messages if m["lead_id"] == "quiet-1" and m["trigger"] == "event"][-1]
    first_decay = next(m for m in messages if m["lead_id"] == "quiet-1" and m["trigger"] == "decay")
    assert first_decay["score"] < last_event["score"] and first_decay["event_id"] is None
    assert first_decay["grade"] != last_event["grade"], (last_event, first_decay)
    client = aioredis.Redis.from_url(s.redis_url)
    try:
        board, _ = await Views(client).leaderboard(owner="Ana")
        assert {row["lead_id"] for row in board} == {"quiet-1", "quiet-2"}
        assert board[0]["score"] <= last_event["score"]  # the leaderboard shows the decayed score
        trainer = Trainer(min_outcomes=1)
        for won in (True, False, True, False):  # a promoted model: the scorers pick it up
            trainer.learn([{"features": {"n_download": 2.0 * won}, "rules_score": 0.5, "stage": None}], won)
        await ModelStore(client).save(trainer)
        version = trainer.version
    finally:
        await client.aclose()

    def rescored_by_model(messages):
        return {m["lead_id"] for m in messages if m.get("trigger") == "model" and m["model_version"] == version} \
            == {"quiet-1", "quiet-2"}

    await scores_of(s.kafka_bootstrap, s.topic_scores, rescored_by_model)
    await until_metrics(s, lambda m: m.get("leadstream_model_pass_version") == version
                        and m.get("leadstream_model_pass_leads_left") == 0)  # the pass reports itself done


async def until_metrics(settings, want, timeout=30.0):
    """The worker's gauges (``name value`` lines without labels) once ``want(gauges)`` holds."""
    import urllib.request

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        request = urllib.request.Request(f"http://127.0.0.1:{settings.web_port}/metrics",
                                         headers={"Authorization": f"Bearer {settings.api_token}"})
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=5).read())).decode()
        gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("leadstream_") and "{" not in line}
        if want(gauges):
            return gauges
        assert asyncio.get_running_loop().time() < deadline, {k: v for k, v in gauges.items() if "pass" in k}
        await asyncio.sleep(0.5)
