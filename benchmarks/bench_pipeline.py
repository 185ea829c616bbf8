"""Measured speed of leadstream: the pure per-event step, and the whole pipeline through Kafka and Redis.

    .venv/bin/python benchmarks/bench_pipeline.py [--leads 300] [--skip-e2e]

Prints figures; asserts nothing. The end-to-end part needs `leadstream up` (it starts a worker on
its own topics and Redis database 14, and stops it afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from models.events import parse_event, topic_kind_of
from models.learner import Trainer
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer, step
from models.simulate import simulate
from streams.demo import start_worker, stop_worker
from streams.publish import topic_for
from streams.clients import kafka_kwargs, redis_client
from streams.settings import Settings
from streams.topics import ensure_topics


def bench_step(events: list[dict]) -> None:
    """Per-event CPU cost of decode + fold + features + score, rules only and with a trained model."""
    rules = load_rules(DEFAULT_CONFIG.read_text())
    trainer = Trainer(min_outcomes=5)
    for scorer_name in ("rules", "model"):
        scorer = Scorer(rules, trainer.serving() if scorer_name == "model" else None)
        states: dict = {}
        raw = [(e["lead_id"].encode(), orjson.dumps(e), topic_kind_of(e["type"])) for e in events]
        t0 = time.perf_counter()
        for key, value, kind in raw:
            ev = parse_event(key, value, topic_kind=kind)
            r = step(states.get(ev.lead_id), ev, scorer, scored_at_ms=0, stage_snapshots=[], last_snapshot=None)
            states[ev.lead_id] = r.state
            if r.training and scorer_name == "rules":
                trainer.learn(r.training["snapshots"], r.training["won"])
        per_event = (time.perf_counter() - t0) / len(raw) * 1e6
        print(f"pure step ({scorer_name:5}): {per_event:7.1f} us/event  ({1e6 / per_event:,.0f} events/s on one core)")


async def bench_e2e(settings: Settings, events: list[dict]) -> None:
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(settings.topic_scores, **kafka_kwargs(settings), group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    last_of = {e["lead_id"]: e["event_id"] for e in events}
    expected = len(events)  # one record per event: a score, or a tombstone for a deleted lead
    t0 = time.perf_counter()
    for e in events:
        sent_at[e["event_id"]] = time.perf_counter()
        await producer.send(topic_for(settings, e["type"]), key=e["lead_id"].encode(), value=orjson.dumps(e))
    await producer.flush()
    published = time.perf_counter() - t0
    deadline = time.perf_counter() + 300
    while len(latencies) < expected and time.perf_counter() < deadline:
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            now = time.perf_counter()
            for r in batch:  # a tombstone has no event_id: time it from the lead's last event sent
                event_id = orjson.loads(r.value)["event_id"] if r.value else last_of[r.key.decode()]
                latencies.append(now - sent_at[event_id])
    total = time.perf_counter() - t0
    await producer.stop()
    await consumer.stop()
    q = statistics.quantiles(latencies, n=100)
    print(f"end to end: {len(latencies)} of {expected} events scored in {total:.1f} s "
          f"({len(latencies) / total:,.0f} events/s; published in {published:.1f} s)")
    print(f"  latency publish -> score consumed, burst load: p50 {q[49] * 1000:.0f} ms, "
          f"p95 {q[94] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms (includes queueing behind the burst)")


async def bench_e2e_paced(settings: Settings, events: list[dict], rate: float) -> None:
    """Latency at a steady rate below capacity: what one event costs when the worker is not backlogged."""
    consumer = AIOKafkaConsumer(settings.topic_scores, **kafka_kwargs(settings), group_id=None,
                                auto_offset_reset="latest", enable_auto_commit=False)
    await consumer.start()
    await asyncio.sleep(1)
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks=1, linger_ms=0)
    await producer.start()
    latencies: list[float] = []
    sent_at: dict[str, float] = {}

    async def collect() -> None:
        while True:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                latencies.extend(now - sent_at[orjson.loads(r.value)["event_id"]] for r in batch if r.value)

    task = asyncio.create_task(collect())
    for e in events:
        sent_at[e["event_id"]] = time.perf_counter()
        await producer.send_and_wait(topic_for(settings, e["type"]), key=e["lead_id"].encode(), value=orjson.dumps(e))
        await asyncio.sleep(1 / rate)
    await asyncio.sleep(2)
    task.cancel()
    await producer.stop()
    await consumer.stop()
    q = statistics.quantiles(latencies, n=100)
    print(f"  latency at a steady {rate:.0f} events/s ({len(latencies)} events): p50 {q[49] * 1000:.1f} ms, "
          f"p95 {q[94] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leads", type=int, default=300)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    events = simulate(args.leads, seed=99)
    print(f"{len(events)} simulated events of {args.leads} leads")
    bench_step(events)
    if args.skip_e2e:
        return 0
    tag = uuid.uuid4().hex[:8]
    base = Settings.from_env()
    settings = dataclasses.replace(
        base, app_id=f"bench-{tag}", topic_web=f"bench-web-{tag}", topic_crm=f"bench-crm-{tag}",
        topic_scores=f"bench-scores-{tag}", topic_hot=f"bench-hot-{tag}", topic_dead_letter=f"bench-dlq-{tag}",
        topic_training=f"bench-training-{tag}", redis_url=base.redis_url.rsplit("/", 1)[0] + "/14")
    env = settings.to_env()
    worker = start_worker(settings, Path(f"/tmp/leadstream-bench-{tag}.log"), env=env)
    try:
        asyncio.run(bench_e2e(settings, events))
        paced = simulate(40, seed=98)[:1000]
        asyncio.run(bench_e2e_paced(settings, paced, rate=100))
    finally:
        stop_worker(worker)
        asyncio.run(_flush(settings))
    return 0


async def _flush(settings: Settings) -> None:
    client = redis_client(settings)
    await client.flushdb()
    await client.aclose()


if __name__ == "__main__":
    sys.exit(main())
