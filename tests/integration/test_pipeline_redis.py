"""The pipeline's Redis side against the real Redis: batches, atomic writes, redelivery, conflicts,
snapshots, deletes, and read models that equal their rebuild."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import orjson
import pytest

from models.offline.simulate import simulate
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer
from streams import pipeline as pipeline_module
from streams.pipeline import EventPipeline, Message
from streams.rescoring import Rescorer, partition_of
from streams.settings import Settings
from streams.state import APPLIED, CONFLICT, DIGEST_BYTES, SHARDS, LeadStore, LeadWrite, lead_key, tombstone_key, view_key
from streams.views import Views, dump_views, rebuild_views

pytestmark = pytest.mark.integration
DAY = 86_400_000
RULES = load_rules(DEFAULT_CONFIG.read_text())


def make_pipeline(redis_client, **kwargs):
    return EventPipeline(LeadStore(redis_client, 3600), Scorer(RULES), topic_kinds={"web": "web", "crm": "crm"},
                         max_event_bytes=65536, **kwargs)


@pytest.fixture
def pipeline(redis_client):
    return make_pipeline(redis_client)


def msg(offset, event_id, type_, ts, topic="web", lead="l1", partition=0, **props):
    doc = {"event_id": event_id, "lead_id": lead, "type": type_, "ts": ts, "props": props}
    return Message(topic, partition, offset, lead.encode(), orjson.dumps(doc))


async def handle(pipeline, *msgs, ack=True):
    outs = await pipeline.handle_batch(list(msgs))
    if ack:
        pipeline.acknowledged()
    return outs


async def counts(pipeline, lead="l1"):
    return (await pipeline.store.get(lead))["state"]["counts"]


async def test_a_batch_scores_every_event_in_partition_order(pipeline, redis_client):
    batch = [msg(i, f"e{i}", "click", i * 1000, lead=f"l{i % 3}") for i in range(30)]
    outs = await handle(pipeline, *batch)
    scores = [orjson.loads(o.value) for o in outs if o.kind == "scores"]
    assert [s["event_id"] for s in scores if s["lead_id"] == "l1"] == [f"e{i}" for i in range(1, 30, 3)]
    assert len(scores) == 30 and all(s["trigger"] == "event" for s in scores)
    assert await counts(pipeline, "l0") == {"click": 10}
    assert (await pipeline.store.get("l0"))["v"] == "1"  # one write per lead per batch


async def test_redelivery_resends_until_acknowledged_and_a_producer_duplicate_sends_nothing(pipeline, redis_client):
    first = await handle(pipeline, msg(0, "e1", "download", 0), ack=False)
    assert [o.kind for o in first] == ["scores"]
    assert await redis_client.hexists(lead_key("l1"), "o:web/0/0")  # kept until Kafka acknowledged it
    again = await handle(pipeline, msg(0, "e1", "download", 0))  # same offset: Kafka redelivered it
    assert again == first
    await pipeline.flush_acked()
    assert not await redis_client.hexists(lead_key("l1"), "o:web/0/0")  # acknowledged: the material is gone
    assert await handle(pipeline, msg(0, "e1", "download", 0)) == []  # delivered before: nothing to re-send
    assert await handle(pipeline, msg(7, "e1", "download", 0)) == []  # same event_id, new offset
    assert await counts(pipeline) == {"download": 1}
    assert pipeline.counts["redelivered"] == 2 and pipeline.counts["duplicate"] == 1


async def test_dedupe_memory_is_bounded_per_lead(redis_client):
    pipeline = make_pipeline(redis_client, dedupe_ids=8)
    await handle(pipeline, *[msg(i, f"e{i}", "click", i) for i in range(50)])
    assert len(await redis_client.hget(lead_key("l1"), "ids")) == 8 * DIGEST_BYTES
    await handle(pipeline, msg(60, "e49", "click", 49))  # a recent id: ignored
    await handle(pipeline, msg(61, "e1", "click", 1))  # older than the window: counted (documented policy)
    assert await counts(pipeline) == {"click": 51}


async def test_a_stale_write_is_refused_and_racing_writers_apply_every_event_once(pipeline, redis_client):
    store = pipeline.store
    stale = (await store.load_many(["l1"]))["l1"]
    await handle(pipeline, msg(0, "e1", "click", 0))  # another writer gets in between
    write = LeadWrite(stale, {"counts": {}}, b"", {}, [], {}, None, __import__("models.readmodel").readmodel.ViewChanges())
    assert await store.write_many([write]) == [CONFLICT]
    # Writers racing on one lead (as during a rebalance overlap): every event lands exactly once.
    racers = [make_pipeline(redis_client) for _ in range(5)]
    await asyncio.gather(*(handle(p, msg(i, f"c{i}", "click", i, partition=i)) for i, p in enumerate(racers, 1)))
    assert await counts(pipeline) == {"click": 6}
    assert sum(p.counts["cas_retry"] for p in racers) > 0
    assert APPLIED == 1


async def test_closing_a_deal_emits_its_snapshots_and_drops_them(pipeline, redis_client):
    await handle(pipeline, msg(0, "e1", "lead_created", 0, topic="crm", fields={"country": "Germany"}),
                 msg(1, "e2", "stage_changed", DAY, topic="crm", stage="contacted"))
    await handle(pipeline, msg(2, "e3", "download", 2 * DAY), msg(3, "e4", "stage_changed", 3 * DAY, topic="crm", stage="proposal"))
    assert len((await pipeline.store.load_many(["l1"]))["l1"].snaps) == 2
    outs = await handle(pipeline, msg(4, "e5", "deal_won", 4 * DAY, topic="crm"))
    training = orjson.loads(next(o.value for o in outs if o.kind == "training"))
    assert training["won"] is True and [s["stage"] for s in training["snapshots"]] == ["contacted", "proposal", "proposal"]
    assert all(s["ts"] < 4 * DAY for s in training["snapshots"])
    assert not await redis_client.hexists(lead_key("l1"), "snaps")


async def test_delete_removes_the_lead_everywhere_and_late_events_get_a_tombstone(pipeline, redis_client):
    await handle(pipeline, msg(0, "e1", "lead_created", DAY, topic="crm", fields={"owner": "Ana", "email": "a@b.c"}),
                 msg(1, "e2", "click", DAY))
    assert (await Views(redis_client).leaderboard())[0][0]["lead_id"] == "l1"
    outs = await handle(pipeline, msg(2, "e3", "lead_deleted", 2 * DAY, topic="crm"))
    assert [(o.kind, o.value) for o in outs] == [("scores", None)]
    assert not await redis_client.exists(lead_key("l1")) and await pipeline.store.get("l1") is None
    assert await redis_client.get(tombstone_key("l1")) == str(2 * DAY).encode()
    late = await handle(pipeline, msg(3, "e4", "download", DAY + 5))
    assert [(o.kind, o.value) for o in late] == [("scores", None)]
    await pipeline.flush_acked()
    for key in await redis_client.keys("*"):  # nothing names the lead or holds its data any more
        assert b"l1" not in key
        kind = (await redis_client.type(key)).decode()
        content = (await redis_client.hgetall(key) if kind == "hash" else await redis_client.zrange(key, 0, -1)
                   if kind == "zset" else await redis_client.get(key))
        assert b"l1" not in orjson.dumps(content, default=str).replace(b"\\", b"") and b"a@b.c" not in repr(content).encode()
    newer = await handle(pipeline, msg(4, "e5", "download", 3 * DAY))
    assert orjson.loads(newer[0].value)["lead_id"] == "l1" and await counts(pipeline) == {"download": 1}


async def test_bad_input_is_dead_lettered_with_raw_bytes(pipeline):
    (out,) = await handle(pipeline, Message("web", 3, 42, b"l1", b"\xff\xfe not json"))
    doc = orjson.loads(out.value)
    assert out.kind == "dead_letter" and doc["offset"] == 42 and doc["partition"] == 3
    assert doc["error"].startswith("invalid JSON") and doc["raw"] == "//4gbm90IGpzb24="


def step_failing_on(event_id):
    """The pipeline's step, except that it raises on ``event_id`` (a valid event the code cannot handle)."""
    real = pipeline_module.step

    def broken(state, event, *args, **kwargs):
        if event.event_id == event_id:
            raise OverflowError("math range error")
        return real(state, event, *args, **kwargs)

    return broken


async def test_an_event_the_code_cannot_handle_is_dead_lettered_and_the_rest_of_the_batch_applied(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline_module, "step", step_failing_on("bad"))
    outs = await handle(pipeline, msg(5, "e1", "click", 0), msg(6, "bad", "click", 1), msg(7, "e3", "click", 2))
    assert [o.kind for o in outs] == ["scores", "dead_letter", "scores"]
    assert orjson.loads(outs[1].value)["error"] == "could not process the event: OverflowError('math range error')"
    assert await counts(pipeline) == {"click": 2}


async def test_the_agent_retries_while_redis_is_unreachable(pipeline):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from streams.retry import with_retry

    real, calls = pipeline.handle_batch, []

    async def flaky(msgs):
        calls.append(len(msgs))
        if len(calls) < 3:
            raise RedisConnectionError("connection refused")
        return await real(msgs)

    outs = await with_retry(lambda: flaky([msg(0, "e1", "click", 0)]), "test")
    assert calls == [1, 1, 1] and [o.kind for o in outs] == ["scores"]


async def test_decay_and_model_rescoring_go_through_the_write_path(pipeline, redis_client):
    from models.learner import Trainer

    await handle(pipeline, msg(0, "e1", "lead_created", 0, topic="crm", fields={"age": 30}),
                 msg(1, "e2", "download", 1000), msg(2, "e3", "download", 2000))
    before = await pipeline.store.get("l1")
    outs = await pipeline.rescore_leads(["l1"], "decay", now_ms=200 * DAY)
    decayed = orjson.loads(outs[0].value)
    assert decayed["trigger"] == "decay" and decayed["event_id"] is None and decayed["score"] < before["score"]
    after = await pipeline.store.get("l1")
    assert after["state"]["counts"] == before["state"]["counts"] and after["history"][-1]["trigger"] == "decay"
    due = await redis_client.zscore(lead_key("l1").replace("lead:", "view:").rsplit(":", 1)[0] + ":due", "l1")
    assert due == 200 * DAY + pipeline.rescore_every_ms
    trainer = Trainer(min_outcomes=1)
    for won in (True, False):
        trainer.learn([{"features": {"n_download": 2.0 * won}, "rules_score": 0.5, "stage": None}], won)
    pipeline.scorer.model = trainer.serving()
    (out,) = await pipeline.rescore_leads(["l1", "nobody"], "model", now_ms=200 * DAY)
    assert orjson.loads(out.value)["trigger"] == "model" and orjson.loads(out.value)["model_version"] == 2
    assert await pipeline.rescore_leads(["l1"], "model", now_ms=200 * DAY) == []  # already on this model


async def test_a_prefetched_lead_that_changes_before_its_chunk_is_written_is_computed_again(pipeline):
    """rescore_chunks loads the next chunk while the current one computes: an event applied to a lead
    of the next chunk in between makes its prefetched state stale, and the write's version check sends
    it round again (the event kept, the rescore on top, nothing lost)."""
    from models.learner import Trainer

    for i, lead in enumerate(("l1", "l2", "l3")):
        await handle(pipeline, msg(i, f"c{i}", "lead_created", 0, lead=lead, topic="crm", fields={"age": 30}))
    trainer = Trainer(min_outcomes=1)
    for won in (True, False):
        trainer.learn([{"features": {"n_download": 2.0 * won}, "rules_score": 0.5, "stage": None}], won)
    pipeline.scorer.model = trainer.serving()
    emitted: list[list[str]] = []

    async def emit(outs):
        emitted.append([o.key.decode() for o in outs])
        if len(emitted) == 1:  # l3's state is loading: once loaded, an event (scored by the old model) moves it on
            await asyncio.sleep(0.2)
            model, pipeline.scorer.model = pipeline.scorer.model, None
            await handle(pipeline, msg(9, "d9", "download", 5000, lead="l3"))
            pipeline.scorer.model = model

    retries = pipeline.counts["cas_retry"]
    await pipeline.rescore_chunks([["l1", "l2"], ["l3"]], "model", 200 * DAY, emit)
    assert emitted == [["l1", "l2"], ["l3"]] and pipeline.counts["cas_retry"] == retries + 1
    l3 = await pipeline.store.get("l3")
    assert l3["state"]["counts"].get("download") == 1 and l3["history"][-1]["trigger"] == "model"


def random_stream(rng):
    """Simulated leads' events with late deletes, late events after them and producer duplicates."""
    events = simulate(40, seed=11)
    for i, e in enumerate(rng.sample(events, 30)):  # late deletes, and late events after them
        events.append({**e, "event_id": f"del-{i}", "type": "lead_deleted", "props": {}})
    for e in rng.sample(events, 60):
        events.append({**e, "ts": e["ts"] - rng.randint(0, 5 * DAY) if isinstance(e["ts"], int) else e["ts"],
                       "event_id": f"late-{rng.random()}"})
    events += rng.sample(events, 40)  # producer duplicates
    msgs = []
    for offset, e in enumerate(events):
        topic = "crm" if e["type"] in ("lead_created", "lead_updated", "stage_changed", "deal_won", "deal_lost",
                                       "lead_deleted", "activity_created", "activity_completed",
                                       "activity_overdue", "email_replied") else "web"
        e = dict(e)
        if e["type"] in ("lead_created", "lead_updated"):
            e["props"] = {"fields": {**e["props"].get("fields", {}), "owner": rng.choice(["Ana", "Bo", None])}}
        msgs.append(Message(topic, 0, offset, e["lead_id"].encode(), orjson.dumps(e)))
    return msgs


async def test_views_equal_their_rebuild_after_a_random_stream(redis_client):
    """Duplicates, redeliveries, late events, deletes and racing writers: the incremental views equal
    the views rebuilt from the lead hashes."""
    rng = random.Random(7)
    msgs = random_stream(rng)
    a, b = make_pipeline(redis_client), make_pipeline(redis_client)
    i = 0
    while i < len(msgs):
        n = rng.randint(1, 80)
        chunk = msgs[i:i + n]
        await asyncio.gather(handle(a, *chunk), handle(b, *chunk[: rng.randint(0, len(chunk))]))  # b redelivers
        i += n
    incremental = await dump_views(redis_client)
    assert incremental and any(k.endswith(":lb") for k in incremental)
    await rebuild_views(redis_client, a.rescore_every_ms)
    assert await dump_views(redis_client) == incremental


async def test_views_equal_their_rebuild_with_rescoring_racing_the_events(redis_client):
    """Decay and model rescoring (the score-only view changes, the state-only write) between and during
    event batches: the incremental views still equal the rebuilt ones, every lead is written once per
    change (no lost update) and a lead rescored by a model carries it."""
    from models.learner import Trainer

    rng = random.Random(8)
    msgs = random_stream(rng)
    events, rescorer = make_pipeline(redis_client), make_pipeline(redis_client)
    leads = sorted({m.key.decode() for m in msgs})
    trainer = Trainer(min_outcomes=1)
    for won in (True, False, True, False):
        trainer.learn([{"features": {"n_download": 2.0 * won}, "rules_score": 0.5, "stage": "proposal"}], won)
    i, now = 0, 400 * DAY
    while i < len(msgs):
        n = rng.randint(1, 80)
        trigger = rng.choice(["decay", "model"])
        rescorer.scorer.model = trainer.serving() if trigger == "model" else None
        trainer.version += trigger == "model"  # every model round is a new version: every open lead moves
        now += DAY
        await asyncio.gather(handle(events, *msgs[i:i + n]),
                             rescorer.rescore_leads(rng.sample(leads, 20), trigger, now_ms=now))
        i += n
    assert rescorer.counts["rescored_decay"] and rescorer.counts["rescored_model"]
    incremental = await dump_views(redis_client)
    await rebuild_views(redis_client, events.rescore_every_ms)
    assert await dump_views(redis_client) == incremental


async def test_a_rescore_is_refused_once_the_lead_moved_on(pipeline, redis_client):
    """The state-only write keeps the compare-and-set of the full one: another write in between, or
    a deletion and a new start that brought the version back to the same number, refuse it."""
    from models.readmodel import ViewChanges

    def rescore_of(record):
        return LeadWrite(record, {"rescored": True}, record.ids, record.offsets, None, {}, record.deleted_ts,
                         ViewChanges(), state_only=True)

    store = pipeline.store
    await handle(pipeline, msg(0, "e1", "click", DAY))
    stale = (await store.load_many(["l1"], state_only=True))["l1"]
    await handle(pipeline, msg(1, "e2", "click", DAY + 1))  # another writer gets in between
    assert await store.write_many([rescore_of(stale)]) == [CONFLICT]
    fresh = (await store.load_many(["l1"], state_only=True))["l1"]
    await handle(pipeline, msg(2, "e3", "lead_deleted", 2 * DAY, topic="crm"))
    await handle(pipeline, msg(3, "e4", "click", 3 * DAY))  # a new start: the version counts from 1 again
    restarted = (await store.load_many(["l1"], state_only=True))["l1"]
    assert restarted.version == "1" and restarted.tombstone == str(2 * DAY)
    stale_one = (await store.load_many(["l1"], state_only=True))["l1"]
    stale_one.version, stale_one.tombstone = "1", ""  # as loaded before the deletion, at version 1
    assert await store.write_many([rescore_of(stale_one), rescore_of(fresh)]) == [CONFLICT, CONFLICT]
    assert await store.write_many([rescore_of(restarted)]) == [APPLIED]
    assert await redis_client.hmget(lead_key("l1"), "v", "s", "dts") == [b"2", b'{"rescored":true}', str(2 * DAY).encode()]
    await redis_client.script_flush()  # Redis restarted: the scripts are loaded again
    again = (await store.load_many(["l1"], state_only=True))["l1"]
    assert await store.write_many([rescore_of(again)]) == [APPLIED]


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
    await handle(pipeline, msg(0, "e1", "lead_created", 0, topic="crm", fields={"country": "Germany", "age": 30}))
    await handle(pipeline, msg(1, "e2", "download", 1000))
    view = await lead_view(settings, "l1")
    assert view["counts"] == {"lead_created": 1, "download": 1} and view["fields"]["country"] == "Germany"
    assert view["grade"] in {"A+", "A", "B+", "B", "C", "D"} and view["source"] == "rules"
    assert [r["feature"] for r in view["reasons"]][2] == "country=germany"  # after download and age, 50 each
    assert [h["trigger"] for h in view["history"]] == ["event", "event"]
    assert view["features_now"]["recency_s"] > 0 and await lead_view(settings, "nobody") is None
    assert await model_report(settings) is None  # no closed deal yet
    await ModelStore(pipeline.store.client).save(Trainer(min_outcomes=1))
    assert (await model_report(settings))["version"] == 0


async def test_a_model_pass_reaches_every_open_lead_although_rescores_reorder_the_leaderboard(redis_client):
    """The pass walks a snapshot taken when it starts: leads it rescored may fall below leads it has
    not reached yet (a walk by rank over the live leaderboard skipped those), and a worker's budget
    counts its own leads (those of its partitions), not every lead read."""
    rng = random.Random(7)
    settings = Settings.from_env({"LEADSTREAM_PARTITIONS": "8"})
    leads = [f"lead-{i}" for i in range(2000)]
    for i, lead in enumerate(leads):
        await redis_client.zadd(view_key(i % SHARDS, "lb"), {lead: rng.random()})
    owned = {0, 1, 2, 3}  # half of the 8 partitions
    serving = SimpleNamespace(scorer=SimpleNamespace(version=2))  # the pipeline as a pass's start reads it
    rescorer = Rescorer(settings, serving, redis_client, None, owned=set)  # type: ignore[arg-type]
    rescorer.model_changed()
    await rescorer._maybe_start_pass()
    reached: list[str] = []
    for _ in range(100):
        batch = await rescorer._next_for_model(100, owned)
        if rescorer._model_ranks is None:
            break
        assert len(batch) >= 60  # ~100 of this worker's leads per call, not ~50
        reached += batch
        for lead in batch:  # the rescores move the leads: many fall below those not reached yet
            await redis_client.zadd(view_key(leads.index(lead) % SHARDS, "lb"), {lead: rng.random() / 10})
    mine = {lead for lead in leads if partition_of(lead, 8) in owned}
    assert sorted(reached) == sorted(mine)  # every one of this worker's leads once
    assert not [k async for k in redis_client.scan_iter(match="rescore:*")]  # the snapshot is gone


async def dump_leads(client) -> dict[bytes, dict[bytes, bytes]]:
    return {key: await client.hgetall(key) async for key in client.scan_iter(match="lead:{*}:*", count=1000)}


async def test_the_leads_written_last_skip_their_load_and_end_as_if_loaded(redis_client, monkeypatch):
    """A batch whose leads this worker wrote last skips the load round trip; records, lead hashes and
    views are those of a worker that loads every batch (deletes, late events, duplicates, closes)."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # one scoring time: the two runs compare
    rng = random.Random(5)
    msgs = random_stream(rng)
    chunks, i = [], 0
    while i < len(msgs):
        n = rng.randint(1, 30)
        chunks.append(msgs[i:i + n])
        i += n

    async def run(keep: bool):
        await redis_client.flushdb()
        p = make_pipeline(redis_client)
        outs = []
        for chunk in chunks:
            if not keep:
                p.forget_written()
            outs += await handle(p, *chunk)
        await p.flush_acked()
        return (p.counts["loads_cached"], p.counts["leads_kept"]), outs, await dump_leads(redis_client), \
            await dump_views(redis_client)

    kept, loaded = await run(keep=True), await run(keep=False)
    assert kept[0][0] > len(chunks) / 4 and loaded[0] == (0, 0)
    assert kept[0][1] > kept[0][0]  # kept leads in batches that loaded others too
    assert kept[1:] == loaded[1:] and len(kept[2]) > 10


async def test_a_batch_loads_only_the_leads_not_kept(pipeline, monkeypatch):
    await handle(pipeline, msg(0, "e1", "click", 0))  # l1 kept as written
    asked = []
    real = pipeline.store.load_many

    async def load_many(leads, **kwargs):
        asked.append(sorted(leads))
        return await real(leads, **kwargs)

    monkeypatch.setattr(pipeline.store, "load_many", load_many)
    await handle(pipeline, msg(1, "e2", "click", 1), msg(2, "e3", "visit", 1, lead="l2"))
    assert asked == [["l2"]] and pipeline.counts["leads_kept"] == 1
    assert await counts(pipeline) == {"click": 2} and await counts(pipeline, "l2") == {"visit": 1}


async def test_a_lead_another_writer_changed_is_loaded_again(pipeline, redis_client):
    await handle(pipeline, msg(0, "e1", "click", 0))
    await handle(make_pipeline(redis_client), msg(0, "e2", "click", 1, partition=1))  # the kept version is stale now
    await handle(pipeline, msg(1, "e3", "click", 2))
    assert pipeline.counts["loads_cached"] == 1 and pipeline.counts["cas_retry"] == 1
    assert await counts(pipeline) == {"click": 3}


async def test_a_rescored_or_old_lead_is_loaded_for_its_next_events(pipeline, monkeypatch):
    await handle(pipeline, msg(0, "e1", "click", 0))
    await pipeline.rescore_leads(["l1"], "decay", now_ms=30 * DAY)  # its write moved the version on
    await handle(pipeline, msg(1, "e2", "click", 1))
    assert pipeline.counts["loads_cached"] == 0 and pipeline.counts["cas_retry"] == 0
    await handle(pipeline, msg(2, "e3", "click", 2))
    assert pipeline.counts["loads_cached"] == 1 and pipeline.counts["cas_retry"] == 0  # kept as written
    monkeypatch.setattr(pipeline_module, "RECORD_CACHE_S", -1.0)  # every kept lead too old
    await handle(pipeline, msg(3, "e4", "click", 3))
    assert pipeline.counts["loads_cached"] == 1 and await counts(pipeline) == {"click": 4}


async def test_a_kept_lead_resends_every_unacknowledged_output_on_redelivery(pipeline):
    first = await handle(pipeline, msg(0, "e1", "click", 0), ack=False)
    second = await handle(pipeline, msg(1, "e2", "click", 1), ack=False)  # kept: its load skipped
    assert pipeline.counts["loads_cached"] == 1
    again = await handle(pipeline, msg(0, "e1", "click", 0), msg(1, "e2", "click", 1))  # Kafka redelivers both
    assert again == first + second and await counts(pipeline) == {"click": 2}


async def test_a_kept_lead_whose_step_fails_is_folded_again_from_its_written_state(pipeline, monkeypatch):
    """A kept lead's state is folded in place (not parsed again): a step that fails midway makes the
    fold start over from the state as written, so the events before the failing one count once."""
    await handle(pipeline, msg(0, "e1", "click", 0))  # kept as written, its state handed to the next fold
    real = pipeline_module.step
    monkeypatch.setattr(pipeline_module, "step", step_failing_on("bad"))
    outs = await handle(pipeline, msg(1, "e2", "click", 1), msg(2, "bad", "click", 2), msg(3, "e4", "visit", 3))
    assert pipeline.counts["loads_cached"] == 1 and [o.kind for o in outs] == ["scores", "dead_letter", "scores"]
    assert await counts(pipeline) == {"click": 2, "visit": 1}
    monkeypatch.setattr(pipeline_module, "step", real)
    await handle(pipeline, msg(4, "e5", "click", 4))  # kept again, from the retried fold's write
    assert pipeline.counts["loads_cached"] == 2 and await counts(pipeline) == {"click": 3, "visit": 1}


async def test_a_lead_the_model_cannot_rescore_is_left_as_it_is(pipeline, monkeypatch):
    """Rescoring is done by a timer: an error there would stop the whole worker. The lead keeps its
    score, the others of the chunk are rescored, and the failure is counted."""
    await handle(pipeline, msg(0, "e1", "click", 0), msg(1, "e2", "click", 0, lead="l2"))
    real = pipeline_module.rescore

    def broken(state, *args, **kwargs):
        if state["lead_id"] == "l1":
            raise ValueError("the model score nan is not a probability")
        return real(state, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "rescore", broken)
    outs = await pipeline.rescore_leads(["l1", "l2"], "decay", now_ms=30 * DAY)
    assert [o.key for o in outs] == [b"l2"] and pipeline.counts["rescore_failed"] == 1
    assert (await pipeline.store.get("l1"))["state"]["history"][-1][3] == "event"
