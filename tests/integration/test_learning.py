"""Online learning through real Kafka and Redis: labels from closed deals, checkpoints, restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from models.events import Event
from models.metrics import roc_auc
from models.offline.simulate import merge_events, simulate_population
from models.rules import load_rules
from models.scoring import Scorer, step
from streams.publish import publish_events
from tests.integration.test_pipeline import read_all

pytestmark = pytest.mark.integration
DAY = 86_400_000


async def wait_for_outcomes(redis_client, n, timeout=240.0):
    """The trainer's report once it has learned ``n`` closed deals."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        raw = await redis_client.get("model:report")
        report = orjson.loads(raw) if raw else None
        if report and sum(report["outcomes"].values()) >= n:
            return report
        learned = report["outcomes"] if report else None
        assert asyncio.get_running_loop().time() < deadline, f"trainer learned {learned} of {n} deals"
        await asyncio.sleep(1)


def rules_only_scores(settings, events):
    """What the rules alone would have scored: the same pure step, no model."""
    scorer, states, last = Scorer(load_rules(settings.scoring_config.read_text())), {}, {}
    for d in events:
        r = step(states.get(d["lead_id"]), Event(d["event_id"], d["lead_id"], d["type"], d["ts"], d["props"]),
                 scorer, scored_at_ms=0)
        states[d["lead_id"]] = r.state
        last[d["lead_id"]] = r.score["score"]
    return last


async def test_model_learns_from_closed_deals_and_beats_the_rules(pipeline_settings, start_worker, redis_client):
    s = pipeline_settings
    worker = start_worker(LEADSTREAM_MODEL_MIN_OUTCOMES="30")
    train = simulate_population(500, seed=11)
    n_outcomes = sum(1 for lead in train if lead.outcome)
    t0 = asyncio.get_running_loop().time()
    train_events = merge_events(train)
    await publish_events(s, train_events, progress=None)
    report = await wait_for_outcomes(redis_client, n_outcomes)
    took = asyncio.get_running_loop().time() - t0
    print(f"\n{len(train_events)} events of {len(train)} leads scored, {n_outcomes} deals learned in {took:.1f} s")
    # Prequential AUC over 433 deals from a cold start: it varies by ~0.07 from run to run with the
    # partitions' interleaving (0.68-0.75 for the champion in 9 runs), so this only asks for a model
    # clearly better than chance; the held-out comparison below is the test of what it learned.
    assert report["version"] > 1 and report["champion"]["roc_auc"] > 0.6, report["champion"]
    assert set(report["stage_rates"]) == {"new", "contacted", "engaged", "qualified", "proposal", "negotiation", "closing"}
    assert report["stage_rates"]["closing"]["win_rate"] > report["stage_rates"]["new"]["win_rate"]

    # Held-out leads arrive later; their outcomes are withheld. Rank them by their last score.
    held_out = simulate_population(300, seed=12, start_ms=train[-1].arrival_ms + 40 * DAY)
    events = [e for e in merge_events(held_out) if e["type"] not in ("deal_won", "deal_lost", "lead_deleted")]
    await asyncio.sleep(2 * s.model_poll_s + 1)  # scorers pick up the latest checkpoint
    await publish_events(s, events, progress=None)
    await wait_until_scored(s, {e["event_id"] for e in events})
    # Each lead's score as of its last event (the leads are old: decay rescoring at the current time
    # also runs, and is not what this compares).
    last = {}
    for body in sorted((orjson.loads(r.value) for r in await read_all(s.kafka_bootstrap, s.topic_scores) if r.value),
                       key=lambda b: b["scored_at"]):
        if body["trigger"] == "event":
            last[body["lead_id"]] = body
    closed = [lead for lead in held_out if lead.outcome]
    labels = [int(lead.outcome == "won") for lead in closed]
    model_auc = roc_auc([last[lead.lead_id]["score"] for lead in closed], labels)
    rules = rules_only_scores(s, events)
    rules_auc = roc_auc([rules[lead.lead_id] for lead in closed], labels)
    print(f"held-out ROC AUC: served {model_auc:.3f}, rules {rules_auc:.3f} ({len(closed)} leads)")
    assert model_auc > rules_auc + 0.03 and model_auc > 0.8
    assert {last[lead.lead_id]["source"] for lead in held_out} <= {"model", "blend"}

    # The score messages show the switch: rules first, then blend/model. The served version never goes
    # back, and it is a model the trainer refined (the scorer may have slept through every checkpoint
    # but the last, so the first served version is not necessarily lower than the last).
    history = [orjson.loads(r.value) for r in await read_all(s.kafka_bootstrap, s.topic_scores) if r.value]
    history.sort(key=lambda b: (b["scored_at"], b["model_version"]))  # same-ms ties: any order is true
    sources = [b["source"] for b in history]
    assert sources[0] == "rules" and "model" in sources
    versions = [b["model_version"] for b in history if b["source"] != "rules"]
    assert versions == sorted(versions) and versions[-1] >= report["version"] > 1

    # A killed worker resumes from the latest checkpoint: version and learned state survive.
    before = orjson.loads(await redis_client.get("model:report"))
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    start_worker(LEADSTREAM_MODEL_MIN_OUTCOMES="30")
    late = simulate_population(20, seed=13, start_ms=held_out[-1].arrival_ms + 40 * DAY)
    await publish_events(s, merge_events(late), progress=None)
    after = await wait_for_outcomes(redis_client, n_outcomes + sum(1 for lead in late if lead.outcome))
    assert after["version"] >= before["version"]
    assert after["outcomes"]["won"] >= before["outcomes"]["won"] and after["outcomes"]["lost"] >= before["outcomes"]["lost"]
    assert sum(after["outcomes"].values()) == n_outcomes + sum(1 for lead in late if lead.outcome)  # none twice


async def wait_until_scored(settings, event_ids, timeout=240.0):
    """Consume the score topic until every one of ``event_ids`` has a score."""
    consumer = AIOKafkaConsumer(settings.topic_scores, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    missing = set(event_ids)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while missing:
            assert asyncio.get_running_loop().time() < deadline, f"{len(missing)} events never scored"
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                missing -= {orjson.loads(r.value)["event_id"] for r in batch if r.value}
    finally:
        await consumer.stop()


async def test_trainer_as_its_own_worker(pipeline_settings, start_worker, redis_client, tmp_path):
    """LEADSTREAM_WORKER_ROLES: one worker only scores, another only trains; together they do what
    one worker does (every event scored, every closed deal learned, the scorer serves the model)."""
    from tests.integration.ownstack import free_port

    s = pipeline_settings
    start_worker(LEADSTREAM_WORKER_ROLES="training", LEADSTREAM_MODEL_MIN_OUTCOMES="10")
    start_worker(LEADSTREAM_WORKER_ROLES="scoring", LEADSTREAM_WEB_PORT=str(free_port()))
    leads = simulate_population(120, seed=5)
    events = merge_events(leads)
    await publish_events(s, events, progress=None)
    report = await wait_for_outcomes(redis_client, sum(1 for lead in leads if lead.outcome))
    assert report["version"] >= 1
    deadline = asyncio.get_running_loop().time() + 120
    while True:  # every event scored once, by the scoring worker
        records = [orjson.loads(r.value) for r in await read_all(s.kafka_bootstrap, s.topic_scores, idle_s=1.0)
                   if r.value]
        scored = {r["event_id"] for r in records if r["trigger"] == "event"}
        deleted = {e["lead_id"] for e in events if e["type"] == "lead_deleted"}
        if scored >= {e["event_id"] for e in events if e["lead_id"] not in deleted}:
            break
        assert asyncio.get_running_loop().time() < deadline, f"{len(scored)} of {len(events)} events scored"
    # A lead that gets an event now is scored by the model the trainer checkpointed.
    lead = leads[0].lead_id
    await publish_events(s, [{"event_id": "late-1", "lead_id": lead, "type": "click",
                              "ts": max(e["ts"] for e in events) + 1000, "props": {}}], progress=None)
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        late = [orjson.loads(r.value) for r in await read_all(s.kafka_bootstrap, s.topic_scores, idle_s=1.0)
                if r.value and orjson.loads(r.value)["event_id"] == "late-1"]
        if late and late[0]["model_version"] >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, f"late event scored as {late}"
        await asyncio.sleep(1)
    trainer_log, scorer_log = (tmp_path / "worker-0.log").read_text(), (tmp_path / "worker-1.log").read_text()
    assert "trainer: checkpoint" in trainer_log and "scoring loop: assigned" not in trainer_log
    assert "scoring loop: assigned" in scorer_log and "trainer:" not in scorer_log
