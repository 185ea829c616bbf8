"""The pipeline's Redis side against the real Redis: atomic writes, redelivery, conflicts, snapshots."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer
from streams.pipeline import EventPipeline, Message
from streams.state import CONFLICT, DUPLICATE, LeadStore, lead_key

pytestmark = pytest.mark.integration
DAY = 86_400_000


@pytest.fixture
def pipeline(redis_client):
    store = LeadStore(redis_client, dedupe_ttl_s=3600)
    return EventPipeline(store, Scorer(load_rules(DEFAULT_CONFIG.read_text())),
                         topic_kinds={"web": "web", "crm": "crm"}, max_event_bytes=65536)


def msg(offset, event_id, type_, ts, topic="web", lead="l1", **props):
    doc = {"event_id": event_id, "lead_id": lead, "type": type_, "ts": ts, "props": props}
    return Message(topic, 0, offset, lead.encode(), orjson.dumps(doc))


async def counts(redis_client, lead="l1"):
    return orjson.loads(await redis_client.hget(lead_key(lead), "state"))["counts"]


async def test_redelivery_resends_the_same_outputs_and_a_producer_duplicate_sends_nothing(pipeline, redis_client):
    first = await pipeline.handle(msg(0, "e1", "download", 0))
    assert [o.kind for o in first] == ["scores"]
    again = await pipeline.handle(msg(0, "e1", "download", 0))  # same offset: Kafka redelivered it
    assert again == first
    assert await pipeline.handle(msg(7, "e1", "download", 0)) == []  # same event_id, new offset
    assert await counts(redis_client) == {"download": 1}
    assert pipeline.counts["redelivered"] == 1 and pipeline.counts["duplicate"] == 1
    assert await redis_client.ttl(lead_key("l1") + ":seen") > 3000


async def test_a_stale_write_is_refused_and_the_event_is_applied_on_top(pipeline, redis_client):
    store = pipeline.store
    loaded = await store.load("l1", "x")
    await pipeline.handle(msg(0, "e1", "click", 0))  # another writer gets in between
    status = await store.write("l1", "x", expected_version=loaded.version, origin="web/0/9", sent=b"{}",
                               state={"counts": {}})
    assert status == CONFLICT
    assert await store.write("l1", "e1", expected_version="1", origin="web/0/9", sent=b"{}", state={}) == DUPLICATE
    # Writers racing on one lead (as during a rebalance overlap): every event lands exactly once.
    await asyncio.gather(*(pipeline.handle(msg(i, f"c{i}", "click", i)) for i in range(1, 6)))
    assert await counts(redis_client) == {"click": 6}
    assert (await store.load("l1", "none")).version == "6"
    assert pipeline.counts["cas_retry"] > 0


async def test_closing_a_deal_emits_its_snapshots_and_drops_them(pipeline, redis_client):
    await pipeline.handle(msg(0, "e1", "lead_created", 0, topic="crm", fields={"country": "Germany"}))
    await pipeline.handle(msg(1, "e2", "stage_changed", DAY, topic="crm", stage="contacted"))
    await pipeline.handle(msg(2, "e3", "download", 2 * DAY))
    await pipeline.handle(msg(3, "e4", "stage_changed", 3 * DAY, topic="crm", stage="proposal"))
    assert await redis_client.llen(lead_key("l1") + ":snaps") == 2
    outs = await pipeline.handle(msg(4, "e5", "deal_won", 4 * DAY, topic="crm"))
    training = orjson.loads(next(o.value for o in outs if o.kind == "training"))
    assert training["won"] is True and [s["stage"] for s in training["snapshots"]] == ["contacted", "proposal", "proposal"]
    assert all(s["ts"] < 4 * DAY for s in training["snapshots"])
    assert not await redis_client.exists(lead_key("l1") + ":snaps")


async def test_delete_leaves_only_a_marker_and_a_tombstone(pipeline, redis_client):
    await pipeline.handle(msg(0, "e1", "click", DAY))
    outs = await pipeline.handle(msg(1, "e2", "lead_deleted", 2 * DAY, topic="crm"))
    assert [(o.kind, o.value) for o in outs] == [("scores", None)]
    assert set(await redis_client.hgetall(lead_key("l1"))) == {b"v", b"deleted_ts"}
    assert await pipeline.store.get("l1") is None
    late = await pipeline.handle(msg(2, "e3", "download", DAY + 5))
    assert [(o.kind, o.value) for o in late] == [("scores", None)]
    assert not await redis_client.hexists(lead_key("l1"), "state")


async def test_bad_input_is_dead_lettered_with_raw_bytes(pipeline):
    (out,) = await pipeline.handle(Message("web", 3, 42, b"l1", b"\xff\xfe not json"))
    doc = orjson.loads(out.value)
    assert out.kind == "dead_letter" and doc["offset"] == 42 and doc["partition"] == 3
    assert doc["error"].startswith("invalid JSON") and doc["raw"] == "//4gbm90IGpzb24="


async def test_an_event_the_code_cannot_handle_is_dead_lettered_not_lost(pipeline, monkeypatch):
    import streams.pipeline as mod

    def broken(*args, **kwargs):
        raise OverflowError("math range error")

    monkeypatch.setattr(mod, "step", broken)
    (out,) = await pipeline.handle(msg(5, "e1", "click", 0))
    assert out.kind == "dead_letter"
    assert orjson.loads(out.value)["error"] == "could not process the event: OverflowError('math range error')"


async def test_the_agent_retries_while_redis_is_unreachable(pipeline):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from streams.agents import handle_with_retry

    real, calls = pipeline.handle, []

    async def flaky(m):
        calls.append(m.offset)
        if len(calls) < 3:
            raise RedisConnectionError("connection refused")
        return await real(m)

    pipeline.handle = flaky
    outs = await handle_with_retry(pipeline, msg(0, "e1", "click", 0))
    assert calls == [0, 0, 0] and [o.kind for o in outs] == ["scores"]


async def test_checkpoints_round_trip_and_an_old_format_is_not_served(redis_client):
    import pickle

    from models.learner import Trainer
    from streams.state import ModelStore

    store, trainer = ModelStore(redis_client), Trainer(min_outcomes=1)
    trainer.learn([{"features": {"n_click": 1.0}, "rules_score": 0.4, "stage": "new"}], True)
    trainer.last_offset = 41
    figures = await store.save(trainer)
    loaded = await store.load_trainer()
    assert (loaded.version, loaded.n_won, loaded.last_offset, await store.version()) == (1, 1, 41, 1)
    assert (await store.load_serving()).version == 1
    assert figures["trainer_bytes"] == len(await redis_client.get("model:trainer")) and store.load_ms is not None
    assert (await store.report())["checkpoint"]["offset"] == 41
    serving = trainer.serving()
    del vars(trainer)["format"], vars(serving)["format"]  # checkpoints from before the format field
    await redis_client.set("model:trainer", pickle.dumps(trainer))
    await redis_client.set("model:serving", pickle.dumps(serving))
    assert await store.load_trainer() is None and await store.load_serving() is None


async def test_lead_and_model_reports_read_back_what_the_pipeline_wrote(pipeline, stack):
    import dataclasses

    from models.learner import Trainer
    from streams.reports import lead_view, model_report
    from streams.state import ModelStore
    from tests.conftest import redis_test_url

    settings = dataclasses.replace(stack, redis_url=redis_test_url(stack.redis_url))
    await pipeline.handle(msg(0, "e1", "lead_created", 0, topic="crm", fields={"country": "Germany", "age": 30}))
    await pipeline.handle(msg(1, "e2", "download", 1000))
    view = await lead_view(settings, "l1")
    assert view["counts"] == {"lead_created": 1, "download": 1} and view["fields"]["country"] == "Germany"
    assert view["grade"] in {"A+", "A", "B+", "B", "C", "D"} and view["source"] == "rules"
    assert [r["feature"] for r in view["reasons"]][2] == "country=germany"  # after download and age, 50 each
    assert view["features_now"]["recency_s"] > 0 and await lead_view(settings, "nobody") is None
    assert await model_report(settings) is None  # no closed deal yet
    await ModelStore(pipeline.store.client).save(Trainer(min_outcomes=1))
    assert (await model_report(settings))["version"] == 0
