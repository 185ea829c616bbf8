"""``leadstream bench``: measured speed and memory, against the running stack, in one run.

What it measures (a table on stdout, ``--json FILE`` for the figures):

- ``passthrough``: a plain aiokafka consume -> orjson decode -> produce of the same records on
  the same broker: the ceiling the hardware, broker and client allow; our throughput is a ratio
  of it, measured in the same run (absolute figures move with the machine's load).
- ``burst``: one ``leadstream worker`` (the real process, same code path) on N simulated events
  published as fast as possible: events per second from the first publish to the last score.
  ``--only burst --pairs N`` alternates the passthrough and a fresh worker's burst N times: each
  pair's ratio, and the lowest as the figures.
- ``workers``: the same burst with 2 workers in one group on the topics' partitions.
- ``latency``: event -> score latency at steady offered rates, each for a bounded time, with and
  without a reader loading the dashboard every second.
- ``step``: the pure per-event step (decode + validate + fold + features + score), rules / model: the
  median of 3 passes over 300 simulated leads, the process's heap frozen first as the worker's;
  beside it, a reference loop of plain Python timed in the same minutes (:func:`reference_us`).
- ``memory``: Redis bytes per lead and per event (``MEMORY USAGE`` of every key, views included)
  after the pipeline's own write path wrote ``--memory-leads`` simulated leads.
- ``reads`` and ``rescoring``: dashboard, funnel and leaderboard read times at that many leads,
  and a full rescoring pass after a model change (leads per second, same write path).
- ``rescoring`` alone: populates ``--read-leads`` leads and times the model rescoring pass only
  (Redis only: no broker needed).

Each run uses its own topics, app id and Redis database (``--redis-db``), and cleans them up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import pickle
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from models.events import parse_event, topic_kind_of
from models.features import copy_state
from models.learner import Trainer
from models.offline.simulate import simulate
from models.readmodel import contributions
from models.rules import load_rules
from models.scoring import Scorer, step
from streams.clients import kafka_kwargs, redis_client
from streams.demo import start_api, start_worker, stop_worker
from streams.pipeline import EventPipeline, Message
from streams.publish import topic_for
from streams.rescoring import RESCORE_CHUNK
from streams.settings import SETTINGS, Settings
from streams.state import SHARDS, LeadStore, ModelStore, lead_key, shard_of, view_key
from streams.topics import ensure_topics
from streams.views import Views

Figures = dict[str, Any]
POPULATE_TEMPLATES = 1000  # simulated leads written through the pipeline, then copied
POPULATE_OWNERS = tuple(f"Manager {i:02d}" for i in range(20))  # a sales team for a million leads
READ_REPEATS = 20  # timings per read (p50, p95)
# The simulated events of a latency run or a burst fall within this span before now (see _fresh_events):
# live traffic, within the default decay cadence (LEADSTREAM_RESCORE_EVERY_SECONDS, a day).
LIVE_SPAN_MS = 12 * 3_600_000
SEND_TICK_S = 0.002  # the latency runs' load generator sends what is due every 2 ms (see _send_paced)


def bench_settings(base: Settings, redis_db: int, tag: str) -> Settings:
    redis_url = base.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
    return dataclasses.replace(
        base, app_id=f"bench-{tag}", topic_web=f"bench-web-{tag}", topic_crm=f"bench-crm-{tag}",
        topic_scores=f"bench-scores-{tag}", topic_hot=f"bench-hot-{tag}", topic_dead_letter=f"bench-dlq-{tag}",
        topic_training=f"bench-training-{tag}", redis_url=redis_url, web_port=_free_port(),
        api_port=_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(settings: Settings) -> dict[str, str]:
    return {s.env: str(getattr(settings, attr)) for attr, s in SETTINGS.items() if getattr(settings, attr) is not None}


# ---- the pure step -------------------------------------------------------------------------------

def bench_step(events: list[dict[str, Any]], rules_text: str, batch: int = 500, passes: int = 3) -> Figures:
    """Per-event CPU time of decode + validate + fold + features + score, as the worker runs it (one
    state copy per lead per batch), with the rules only and with a trained model: the median of
    ``passes`` passes over the stream each (a pass starts from no state; the memos of the leads'
    fields are warm after the first, as in a worker that has seen its leads before).

    What the process holds before the model is trained (modules, the stream's events) is frozen out
    of the garbage collector's reach, as the worker freezes its heap at start (``quiet_collector``):
    else a full collection walking the benchmark's own data (~100 ms) lands in some pass or other.
    """
    from streams.worker import quiet_collector

    rules = load_rules(rules_text)
    raw = [(e["lead_id"].encode(), orjson.dumps(e), topic_kind_of(e["type"])) for e in events]
    quiet_collector()
    model = _trained_model(rules_text, events)  # trained on the stream's own outcomes first
    figures: dict[str, float] = {}
    reference: list[float] = []
    for name, serving in (("rules", None), ("model", model)):
        sums = []
        for _ in range(passes):
            reference.append(reference_us())  # before each pass: the same minutes
            sums.append(sum(step_pass(raw, Scorer(rules, serving), batch=batch)))
        figures[name] = round(statistics.median(sums), 1)
    return {"us_per_event_rules": figures["rules"], "us_per_event_model": figures["model"],
            "model_source": Scorer(rules, model).score({}).source,
            "reference_us": round(statistics.median(reference), 2)}


def reference_us(units: int = 2000) -> float:
    """CPU µs per unit of a fixed workload of plain Python and orjson, no leadstream code (a dict of
    40 floats built, walked with ``log1p``, dumped and loaded): how fast this machine runs such code
    in these minutes. The step's figure moves with it on a shared machine (the same code read 37.5
    and 51.3 µs per event two minutes apart, 2026-12-03), so the two are read together."""
    keys = [f"k{i}" for i in range(40)]
    t0 = time.process_time()
    for unit in range(units):
        values = {k: float(i + unit) for i, k in enumerate(keys)}
        total = 0.0
        for v in values.values():
            total += math.log1p(v)
        orjson.loads(orjson.dumps(values))
    return (time.process_time() - t0) / units * 1e6


def step_pass(raw: list[tuple[bytes, bytes, str]], scorer: Any, batch: int = 500, *,
              parse: Callable[..., Any] = parse_event, copy: Callable[..., Any] = copy_state,
              step_fn: Callable[..., Any] = step) -> list[float]:
    """CPU µs per event (of all ``raw``) spent on each batch: the worker's loop, one state copy per
    lead per batch (:func:`~models.features.copy_state`: the state's JSON, read back as the worker
    loads a lead). ``parse``, ``copy`` and ``step_fn`` let benchmarks/bench_step_ab.py time another
    source tree's functions with this same loop."""
    stored: dict[str, Any] = {}
    spent: list[float] = []
    for start in range(0, len(raw), batch):
        t0 = time.process_time()  # CPU time: the machine's other processes do not count
        working: dict[str, Any] = {}
        for key, value, kind in raw[start:start + batch]:
            ev = parse(key, value, topic_kind=kind)
            if ev.lead_id not in working:
                prior = stored.get(ev.lead_id)
                working[ev.lead_id] = copy(prior) if prior is not None else None
            working[ev.lead_id] = step_fn(working[ev.lead_id], ev, scorer, scored_at_ms=0, stage_snapshots=[],
                                          copy=False).state
        stored.update(working)
        spent.append((time.process_time() - t0) / len(raw) * 1e6)
    return spent


# ---- Kafka: publish, collect ---------------------------------------------------------------------

async def _publish_burst(producer: AIOKafkaProducer, records: list[tuple[str, bytes, bytes]]) -> float:
    t0 = time.perf_counter()
    futures = [await producer.send(topic, key=key, value=value) for topic, key, value in records]
    await asyncio.gather(*futures)
    return t0


async def _collect(settings: Settings, topic: str, n: int, timeout_s: float, prefix: bytes | None = None,
                   on_record: Callable[[Any, float], None] | None = None,
                   ready: asyncio.Event | None = None) -> float:
    """Consume ``topic`` until ``n`` records arrived (with ``prefix``: only the event scores and
    tombstones of leads whose id starts with it); returns when the last one did.

    Without ``ready``, from the topic's start. With it, from its end, and ``ready`` is set once the
    consumer holds its partitions and knows their ends: a latency run sends only then. Otherwise
    the first events' latencies would include this consumer's start and its reading of the earlier
    runs' records (~50 ms at 2,000 events/s, measured)."""
    consumer = AIOKafkaConsumer(topic, **kafka_kwargs(settings), group_id=None,
                                auto_offset_reset="latest" if ready is not None else "earliest",
                                enable_auto_commit=False, fetch_max_bytes=50 * 1024 * 1024)
    await consumer.start()
    seen, last = 0, time.perf_counter()
    deadline = last + timeout_s
    try:
        while not consumer.assignment():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{topic}: no partition assigned within {timeout_s:.0f} s")
            await asyncio.sleep(0.01)
        for tp in consumer.assignment():  # the offset reset, done now rather than at the first fetch
            await consumer.position(tp)
        if ready is not None:
            ready.set()
        while seen < n and time.perf_counter() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                now = time.perf_counter()
                for r in batch:
                    if prefix is not None and not (r.key.startswith(prefix) and _is_event_score(r.value)):
                        continue
                    seen, last = seen + 1, now
                    if on_record is not None:
                        on_record(r, now)
    finally:
        await consumer.stop()
    if seen < n:
        raise RuntimeError(f"{topic}: {seen} of {n} records within {timeout_s:.0f} s")
    return last


def _is_event_score(value: bytes | None) -> bool:
    return value is None or b'"trigger":"event"' in value


def _records(settings: Settings, events: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes]]:
    return [(topic_for(settings, e["type"]), e["lead_id"].encode(), orjson.dumps(e)) for e in events]


async def bench_passthrough(settings: Settings, events: list[dict[str, Any]]) -> Figures:
    """The ceiling: plain aiokafka consume -> orjson decode -> produce of the same records."""
    src, dst = f"{settings.topic_web}-pt-in", f"{settings.topic_web}-pt-out"
    await ensure_topics(settings, {src: settings.partitions, dst: settings.partitions})
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5,
                                max_batch_size=256 * 1024)
    await producer.start()
    consumer = AIOKafkaConsumer(src, **kafka_kwargs(settings), group_id=f"pt-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=True)
    await consumer.start()
    n = len(events)

    async def forward() -> None:
        done = 0
        while done < n:
            for tp, batch in (await consumer.getmany(timeout_ms=100, max_records=500)).items():
                futures = []
                for r in batch:
                    doc = orjson.loads(r.value)
                    futures.append(await producer.send(dst, key=r.key, value=orjson.dumps(doc)))
                await asyncio.gather(*futures)
                done += len(batch)

    task = asyncio.create_task(forward())
    collector = asyncio.create_task(_collect(settings, dst, n, 300))
    t0 = await _publish_burst(producer, [(src, key, value) for _, key, value in _records(settings, events)])
    last = await collector
    await task
    await consumer.stop()
    await producer.stop()
    return {"events": n, "events_per_s": round(n / (last - t0))}


async def bench_burst(settings: Settings, events: list[dict[str, Any]]) -> Figures:
    """Events per second of the running worker(s): first publish to last score consumed."""
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5,
                                max_batch_size=256 * 1024)
    await producer.start()
    latencies: list[float] = []
    sent_at: dict[str, float] = {}
    last_of = {e["lead_id"]: e["event_id"] for e in events}

    def on_record(r: Any, now: float) -> None:  # a tombstone has no event_id: its lead's last event
        event_id = orjson.loads(r.value)["event_id"] if r.value else last_of[r.key.decode()]
        latencies.append(now - sent_at.get(event_id, now))

    prefix = events[0]["lead_id"].split("-", 1)[0].encode() + b"-"
    collector = asyncio.create_task(_collect(settings, settings.topic_scores, len(events), 600,
                                             prefix, on_record))
    records = _records(settings, events)
    redis = redis_client(settings)
    forks0 = await _redis_forks(redis)
    now = time.perf_counter()
    sent_at.update({e["event_id"]: now for e in events})
    t0 = await _publish_burst(producer, records)
    last = await collector
    await producer.stop()
    forks = await _redis_forks(redis) - forks0
    await redis.aclose()
    q = statistics.quantiles(latencies[-len(events):], n=100)
    return {"events": len(events), "events_per_s": round(len(events) / (last - t0)),
            "latency_p50_ms": round(q[49] * 1000), "latency_p99_ms": round(q[98] * 1000), "redis_forks": forks}


async def bench_latency(settings: Settings, events: list[dict[str, Any]], rate: float, seconds: float,
                        reader: Callable[[], Awaitable[None]] | None = None,
                        samples: list[float] | None = None,
                        timeline: list[tuple[float, float]] | None = None) -> Figures:
    """Event -> score latency at a steady offered ``rate`` for ``seconds`` (optionally with a reader;
    ``samples`` gets every latency in seconds, to pool several runs; ``timeline`` each event's
    scheduled send time (``time.perf_counter``) and latency, to see when within the run it was late)."""
    n = min(len(events), int(rate * seconds))
    events = events[:n]
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks=1, linger_ms=0)
    await producer.start()
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    def on_record(r: Any, now: float) -> None:
        if r.value:
            event_id = orjson.loads(r.value)["event_id"]
            if event_id in sent_at:
                latencies.append(now - sent_at[event_id])
                if timeline is not None:
                    timeline.append((sent_at[event_id], now - sent_at[event_id]))

    prefix = events[0]["lead_id"].split("-", 1)[0].encode() + b"-"
    listening = asyncio.Event()
    collector = asyncio.create_task(_collect(settings, settings.topic_scores, n, seconds + 120,
                                             prefix, on_record, listening))
    await asyncio.wait([collector, asyncio.create_task(listening.wait())], return_when=asyncio.FIRST_COMPLETED)
    if collector.done():  # it failed before it was ready: its error, not a wait for a latency never measured
        collector.result()
    stop_reader = asyncio.Event()

    async def read_loop() -> None:
        while not stop_reader.is_set():
            await reader()  # type: ignore[misc]
            await asyncio.sleep(1.0)

    reading = asyncio.create_task(read_loop()) if reader else None
    late = await _send_paced(producer, _records(settings, events), [e["event_id"] for e in events], rate, sent_at)
    await collector
    stop_reader.set()
    if reading:
        await reading
    await producer.stop()
    if samples is not None:
        samples += latencies
    # How late the generator itself sent (its tick, its own collector, the machine): part of the latency.
    late_p99 = statistics.quantiles(late, n=100)[98]
    return _latency_figures(rate, latencies) | {"send_late_p99_ms": round(late_p99 * 1000, 1)}


async def _send_paced(producer: AIOKafkaProducer, records: list[tuple[str, bytes, bytes]], event_ids: list[str],
                      rate: float, sent_at: dict[str, float]) -> list[float]:
    """Send ``records`` at ``rate``: every :data:`SEND_TICK_S`, the events due by then, as a producer
    lingering that long would (one produce request for them: one per event took half a core at
    2,000/s, beside the worker measured). Each event's latency counts from its scheduled time, so a
    send that comes late (the tick, a busy machine) counts against the worker, not for it. Returns
    how late each send was, in seconds."""
    t0, sent, n = time.perf_counter(), 0, len(records)
    late: list[float] = []
    while sent < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        for i in range(sent, due):
            topic, key, value = records[i]
            sent_at[event_ids[i]] = t0 + i / rate
            late.append(time.perf_counter() - sent_at[event_ids[i]])
            await producer.send(topic, key=key, value=value)  # buffered: no wait for the broker
        sent = due
        if sent < n:
            await asyncio.sleep(max(SEND_TICK_S, t0 + sent / rate - time.perf_counter()))
    return late


def _latency_figures(rate: float, latencies: list[float]) -> Figures:
    q = statistics.quantiles(latencies, n=100)
    return {"rate": rate, "events": len(latencies), "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def _fresh_events(leads: int, seed: int, prefix: str, span_ms: int = LIVE_SPAN_MS) -> list[dict[str, Any]]:
    """Simulated events of new leads, their times moved into the ``span_ms`` before now (order kept,
    gaps scaled): live traffic, not an import of old history, which the worker would also rescore
    for decay at once. The simulation spreads leads over weeks: only shifted so that the last event
    was now, most events were older than the decay cadence (a day by default) and their leads were
    rescored for decay while the benchmark ran (~1 rescore per 20 events at 2,000 events/s).

    >>> events = _fresh_events(20, 1, "x")
    >>> now = int(time.time() * 1000)
    >>> now - LIVE_SPAN_MS - 2000 <= min(e["ts"] for e in events) <= max(e["ts"] for e in events) <= now
    True
    """
    events = simulate(leads, seed=seed)
    first, last = min(e["ts"] for e in events), max(e["ts"] for e in events)
    end, span = int(time.time() * 1000) - 1000, max(1, last - first)
    scale = min(1.0, span_ms / span)
    return [e | {"event_id": f"{prefix}-{e['event_id']}", "lead_id": f"{prefix}-{e['lead_id']}",
                 "ts": end - int((last - e["ts"]) * scale)} for e in events]


async def bench_pipeline(settings: Settings, leads: int, rates: list[float], seconds: float,
                         reader_rate: float = 1000.0) -> Figures:
    """Burst, 2 workers, latency at steady rates with and without a dashboard reader. The scoring
    workers run as the README advises for latency: the trainer is a worker of its own."""
    await ensure_topics(settings)
    log_dir = Path(settings.home) / "logs"
    figures: Figures = {}
    workers = [_start_trainer(settings), _start_scorer(settings, 0)]
    try:
        # The dashboard is served by `leadstream api`, its own process: does reading it move the worker's p99?
        workers.append(start_api(settings, log_dir / f"bench-api-{settings.app_id}.log", env=_env(settings)))
        dashboard = f"http://127.0.0.1:{settings.api_port}/dashboard"
        reader_rate = reader_rate if reader_rate in rates else rates[0]
        # Steady rates first, on a fresh worker; then the burst (whose closed deals keep the trainer
        # busy for a while afterwards). The reader's run follows the run at its rate without one (not
        # the over-capacity runs after it, whose backlog and closed deals it would pay for).
        figures["latency"] = []
        for rate in rates:
            events = _fresh_events(max(50, int(rate * seconds / 25)), int(rate), f"r{int(rate)}")
            figures["latency"].append(await bench_latency(settings, events, rate, seconds))
            if rate == reader_rate:
                events = _fresh_events(max(50, int(reader_rate * seconds / 25)), 1001, "reader")
                figures["latency_with_dashboard_reader"] = await bench_latency(
                    settings, events, reader_rate, seconds,
                    reader=lambda: asyncio.to_thread(_get, dashboard, settings.api_token))
        burst_events = _fresh_events(leads, 7, "b1")
        figures["burst_1_worker"] = await bench_burst(settings, burst_events)
        workers.append(_start_scorer(settings, 1))
        await asyncio.sleep(3)  # the group rebalances over both workers
        events = _fresh_events(leads, 8, "b2")
        figures["burst_2_workers"] = await bench_burst(settings, events)
    finally:
        for w in workers:
            stop_worker(w)
    return figures


async def bench_one_burst(settings: Settings, leads: int) -> Figures:
    """One scoring worker's burst throughput, on a fresh worker (the trainer a worker of its own)."""
    await ensure_topics(settings)
    workers = [_start_trainer(settings), _start_scorer(settings, 0)]
    try:
        return await bench_burst(settings, _fresh_events(leads, 7, "b1"))
    finally:
        for w in workers:
            stop_worker(w)


def _start_scorer(settings: Settings, n: int) -> Any:
    scorer = dataclasses.replace(settings, web_port=_free_port() if n else settings.web_port, worker_roles="scoring")
    return start_worker(scorer, Path(settings.home) / "logs" / f"bench-worker-{n}-{settings.app_id}.log",
                        env=_env(scorer))


def _start_trainer(settings: Settings) -> Any:
    trainer = dataclasses.replace(settings, web_port=_free_port(), worker_roles="training")
    return start_worker(trainer, Path(settings.home) / "logs" / f"bench-trainer-{settings.app_id}.log",
                        env=_env(trainer))


def _get(url: str, token: str = "") -> bytes:
    """``url``'s body, with the bearer token the worker and the api ask for when one is set."""
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return response.read()


# ---- Redis: memory, reads, rescoring -------------------------------------------------------------

async def bench_memory_and_reads(settings: Settings, leads: int, rules_text: str) -> Figures:
    """Write ``leads`` simulated leads through the pipeline's write path, then measure memory, reads and
    a full model rescoring pass."""
    client = redis_client(settings)
    await client.flushdb()
    rules = load_rules(rules_text)
    pipeline = EventPipeline(LeadStore(client), Scorer(rules), topic_kinds={"web": "web", "crm": "crm"},
                             max_event_bytes=settings.max_event_bytes, dedupe_ids=settings.dedupe_ids,
                             rescore_every_ms=settings.rescore_every_s * 1000)
    n_events, offset, t0 = 0, 0, time.perf_counter()
    for chunk in range(0, leads, 1000):
        events = sorted(_fresh_events(min(1000, leads - chunk), 100 + chunk, f"m{chunk}"), key=lambda e: e["ts"])
        msgs = []
        for e in events:
            kind = topic_kind_of(e["type"])
            msgs.append(Message(kind, 0, offset, e["lead_id"].encode(), orjson.dumps(e)))
            offset += 1
        for i in range(0, len(msgs), settings.batch_max_events):
            await pipeline.handle_batch(msgs[i:i + settings.batch_max_events])
            pipeline.acknowledged()
        n_events += len(msgs)
    await pipeline.flush_acked()
    write_s = time.perf_counter() - t0
    memory = await _memory(client)
    figures: Figures = {"leads": leads, "events": n_events, "write_events_per_s": round(n_events / write_s),
                        "bytes_per_lead": round(memory["total"] / leads), "bytes_per_event": round(memory["total"] / n_events),
                        "bytes_per_lead_by_kind": {k: round(v / leads) for k, v in memory.items() if k != "total"}}
    figures["reads_ms"] = await _time_reads(client, rules)
    pipeline.scorer.model = _trained_model(rules_text)
    figures["rescoring"] = await _rescoring_pass(client, pipeline, RESCORE_CHUNK)
    await client.flushdb()
    await client.aclose()
    return figures


async def _memory(client: aioredis.Redis) -> dict[str, int]:
    by_kind: dict[str, int] = {"total": 0}
    keys = [key async for key in client.scan_iter(count=5000)]
    for i in range(0, len(keys), 5000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + 5000]:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(keys[i:i + 5000], await pipe.execute()):
            kind = key.decode().split(":", 1)[0]
            by_kind[kind] = by_kind.get(kind, 0) + (used or 0)
            by_kind["total"] += used or 0
    return by_kind


async def _time_reads(client: aioredis.Redis, rules: Any, settings: Settings | None = None,
                      repeats: int = READ_REPEATS) -> Figures:
    """p50 / p95 milliseconds of every read the dashboard, ``leadstream funnel`` and the API's
    leaderboard do (uncached: each repetition reads Redis), each read repeated ``repeats`` times."""
    from streams.api import Api, DASHBOARD_LEADS

    views = Views(client, rules.grades)
    api = Api(settings, client) if settings is not None else None
    top = (await views.leaderboard(limit=50))[1]
    owner = next((k for k in sorted(await views.counters()) if k.startswith("o:")), "o:?:").split(":")[1]

    def now() -> int:
        return int(time.time() * 1000)

    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "dashboard: funnel + team + success curve (one reading)": lambda: views.aggregates(now_ms=now()),
        f"dashboard: best {DASHBOARD_LEADS} open leads": lambda: views.leaderboard(limit=DASHBOARD_LEADS),
        "funnel (leadstream funnel, GET /funnel)": lambda: views.funnel(now_ms=now()),
        "team (GET /owners)": lambda: views.owners(now_ms=now()),
        "success curve (GET /success-curve)": views.success_curve,
        "leaderboard top 50 (GET /leads)": lambda: views.leaderboard(limit=50),
        "leaderboard page 2 (cursor)": lambda: views.leaderboard(limit=50, cursor=top),
        "leaderboard by stage": lambda: views.leaderboard(stage="proposal", limit=50),
        "leaderboard by grade": lambda: views.leaderboard(grade="B", limit=50),
        "leaderboard by owner": lambda: views.leaderboard(owner=owner, limit=50),
        "leaderboard hot": lambda: views.leaderboard(hot=True, limit=50),
    }
    if api is not None:  # the whole dashboard as the api reads it, its cache emptied before each time
        async def dashboard() -> None:
            api.cache = type(api.cache)(api.cache.ttl_s)
            await api.dashboard({"owner": None, "stage": None, "grade": None, "hot": None}, 14.0)

        reads["dashboard: the whole page's reads, uncached"] = dashboard
    figures: Figures = {}
    for name, read in reads.items():
        await read()  # warm: connections, script caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await read()
            times.append((time.perf_counter() - t0) * 1000)
        q = statistics.quantiles(times, n=20, method="inclusive")
        figures[name] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(q[18], 1)}
    return figures


async def bench_rescoring(settings: Settings, rules_text: str) -> Figures:
    """A full model rescoring pass over the open leads Redis holds (e.g. a million leads), with a
    model trained on simulated outcomes: load, rescore and write each lead, as the worker's pass
    does (records are built but not produced)."""
    client = redis_client(settings)
    rules = load_rules(rules_text)
    pipeline = EventPipeline(LeadStore(client), Scorer(rules, _trained_model(rules_text)),
                             topic_kinds={"web": "web", "crm": "crm"}, max_event_bytes=settings.max_event_bytes,
                             rescore_every_ms=settings.rescore_every_s * 1000)
    try:
        return await _rescoring_pass(client, pipeline, RESCORE_CHUNK)
    finally:
        await client.aclose()


def _trained_model(rules_text: str, events: list[dict[str, Any]] | None = None) -> Any:
    """A serving model trained, through the pure step, on the outcomes of ``events`` (default: 300
    simulated leads, 261 deals). The batch learner refits every 100 deals, so its trees are part of the
    stack as in a worker past its first 1,000 deals (before the tenth round they were not: the
    step's "model" figures of earlier rounds lack the trees)."""
    trainer = _trainer(rules_text, simulate(300, seed=99) if events is None else events)
    return pickle.loads(pickle.dumps(trainer.serving()))  # as a scorer loads it from its checkpoint


def _trainer(rules_text: str, events: list[dict[str, Any]]) -> Trainer:
    """A trainer that learned the outcomes of ``events`` through the pure step (see :func:`_trained_model`)."""
    rules, trainer, states = load_rules(rules_text), Trainer(min_outcomes=5, batch_every=100), {}
    for e in events:
        ev = parse_event(e["lead_id"].encode(), orjson.dumps(e), topic_kind=topic_kind_of(e["type"]))
        r = step(states.get(ev.lead_id), ev, Scorer(rules), scored_at_ms=0, stage_snapshots=[])
        states[ev.lead_id] = r.state
        if r.training:
            trainer.learn(r.training["snapshots"], r.training["won"])
    return trainer


async def _rescoring_pass(client: aioredis.Redis, pipeline: EventPipeline, batch: int) -> Figures:
    """Every open lead rescored by the model, ``batch`` leads per write as the worker's pass does."""
    from streams.state import SHARDS, view_key
    from streams.worker import quiet_collector

    leads: list[str] = []
    for shard in range(SHARDS):
        leads += [m.decode() for m in await client.zrevrange(view_key(shard, "lb"), 0, -1)]
    settled_s = await _persistence_settled(client)
    quiet_collector()  # as the worker's process: what was loaded by now is out of the collector's reach
    redis_cpu0, forks0 = await _redis_cpu_s(client), await _redis_forks(client)
    t0, cpu0 = time.perf_counter(), time.process_time()
    sent = 0

    async def count(outs: list[Any]) -> None:
        nonlocal sent
        sent += len(outs)

    chunks = [leads[i:i + batch] for i in range(0, len(leads), batch)]
    await pipeline.rescore_chunks(chunks, "model", int(time.time() * 1000), count)  # as Rescorer._rescore
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    redis_cpu_s = await _redis_cpu_s(client) - redis_cpu0
    forks = await _redis_forks(client) - forks0
    n = max(1, len(leads))
    # CPU per lead, the worker's and Redis's: steadier than leads/s on a machine shared with others.
    return {"open_leads": len(leads), "rescored": sent, "leads_per_s": round(len(leads) / seconds) if seconds else None,
            "worker_cpu_us_per_lead": round(cpu_s / n * 1e6, 1), "redis_cpu_us_per_lead": round(redis_cpu_s / n * 1e6, 1),
            "waited_for_persistence_s": settled_s, "redis_forks": forks}


async def _persistence_settled(client: aioredis.Redis, limit_s: float = 180.0) -> float:
    """Wait until Redis writes no snapshot and rewrites no append-only file (filling it with many leads
    starts both: a fork that copies gigabytes, on the cores the pass runs on); the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        info = await client.info("persistence")
        if not (info.get("rdb_bgsave_in_progress") or info.get("aof_rewrite_in_progress")
                or info.get("aof_rewrite_scheduled")):
            break
        await asyncio.sleep(0.5)
    return round(time.perf_counter() - t0, 1)


async def _redis_forks(client: aioredis.Redis) -> int:
    """Forks of the Redis server so far (RDB snapshots, AOF rewrites): one during a measure means a child
    process copied and wrote the whole dataset on the cores the measure ran on."""
    return int((await client.info("stats"))["total_forks"])


async def _redis_cpu_s(client: aioredis.Redis) -> float:
    """CPU seconds the Redis server has used (its main thread and children, user and system)."""
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _write_templates(client: aioredis.Redis, settings: Settings, rules_text: str, leads: int
                           ) -> dict[str, dict[bytes, bytes]]:
    """``leads`` simulated leads through the pipeline's own write path; their lead hashes as written."""
    pipeline = EventPipeline(LeadStore(client), Scorer(load_rules(rules_text)), topic_kinds={"web": "web", "crm": "crm"},
                             max_event_bytes=settings.max_event_bytes, dedupe_ids=settings.dedupe_ids,
                             rescore_every_ms=settings.rescore_every_s * 1000)
    events = sorted(_fresh_events(leads, 4242, "tpl"), key=lambda e: e["ts"])
    msgs = [Message(topic_kind_of(e["type"]), 0, i, e["lead_id"].encode(), orjson.dumps(e)) for i, e in enumerate(events)]
    for i in range(0, len(msgs), settings.batch_max_events):
        await pipeline.handle_batch(msgs[i:i + settings.batch_max_events])
        pipeline.acknowledged()
    await pipeline.flush_acked()
    ids = sorted({e["lead_id"] for e in events})
    pipe = client.pipeline(transaction=False)
    for lead_id in ids:
        pipe.hgetall(lead_key(lead_id))
    return {lead_id: h for lead_id, h in zip(ids, await pipe.execute()) if h}  # deleted leads have no hash


class _Clone:
    """A template lead given another owner: its hash fields (the state split around its id, for a new
    id to go in between) and its read-model contributions, computed once for all its copies."""

    def __init__(self, lead_id: str, stored: dict[bytes, bytes], owner: str, every_ms: int) -> None:
        state = orjson.loads(stored[b"s"])
        state["fields"]["owner"] = owner
        raw = orjson.dumps(state)
        quoted = orjson.dumps(lead_id)
        if raw.count(quoted) != 1:
            raise RuntimeError(f"template {lead_id}: expected its id exactly once in its state JSON")
        self.head, self.tail = raw.split(quoted)
        self.rest = [x for k, v in stored.items() if k != b"s" for x in (k, v)]
        self.counters, self.sets = contributions(state, rescore_every_ms=every_ms)
        self._keys: dict[int, list[tuple[str, float]]] = {}

    def fields(self, lead_id: str) -> list[bytes]:
        return [b"s", self.head + orjson.dumps(lead_id) + self.tail, *self.rest]

    def members(self, shard: int) -> list[tuple[str, float]]:
        """(view key, score) of each sorted set a copy in ``shard`` is a member of."""
        if shard not in self._keys:
            self._keys[shard] = [(view_key(shard, name), score) for name, score in self.sets.items()]
        return self._keys[shard]


async def populate_leads(settings: Settings, n: int, rules_text: str, batch: int = 5000,
                         templates: int = POPULATE_TEMPLATES) -> Figures:
    """``n`` leads in Redis as the write path leaves them, fast: ``templates`` simulated leads go through the
    pipeline's own write path (``EventPipeline.handle_batch``); each of the ``n`` leads is a copy of
    one of them (its lead hash as written, under a new id and one of :data:`POPULATE_OWNERS`), and
    the read models get every copy's :func:`models.readmodel.contributions` (the function the write
    path applies), sorted-set members pipelined by key and counters summed per shard."""
    import random

    client = redis_client(settings)
    await client.flushdb(asynchronous=True)  # a million leads take longer than a socket timeout
    t0 = time.perf_counter()
    stored = await _write_templates(client, settings, rules_text, templates)
    await client.flushdb(asynchronous=True)
    template_s = time.perf_counter() - t0
    every_ms = settings.rescore_every_s * 1000
    clones: dict[tuple[str, str], _Clone] = {}
    rng = random.Random(1)
    pool = sorted(stored)
    copies: dict[tuple[int, _Clone], int] = {}  # counters are a clone's times its copies per shard
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        members: dict[str, dict[str, float]] = {}
        for i in range(start, min(n, start + batch)):
            lead_id, template, owner = f"pop-{i:07d}", rng.choice(pool), POPULATE_OWNERS[i % len(POPULATE_OWNERS)]
            clone = clones.get((template, owner))
            if clone is None:
                clone = clones[template, owner] = _Clone(template, stored[template], owner, every_ms)
            shard = shard_of(lead_id)
            pipe.execute_command("HSET", lead_key(lead_id), *clone.fields(lead_id))
            for key, score in clone.members(shard):
                members.setdefault(key, {})[lead_id] = score
            copies[shard, clone] = copies.get((shard, clone), 0) + 1
        for key, scores in members.items():
            pipe.zadd(key, scores)
        await pipe.execute()
    counters: dict[int, dict[str, int]] = {shard: {} for shard in range(SHARDS)}
    for (shard, clone), times in copies.items():
        for name, delta in clone.counters.items():
            counters[shard][name] = counters[shard].get(name, 0) + delta * times
    pipe = client.pipeline(transaction=False)
    for shard, values in counters.items():
        if values:
            pipe.hset(view_key(shard, "c"), mapping={k: v for k, v in values.items() if v})
    await pipe.execute()
    seconds = time.perf_counter() - t0
    await client.aclose()
    return {"leads": n, "templates": len(stored), "owners": len(POPULATE_OWNERS),
            "template_write_s": round(template_s, 1), "populate_s": round(seconds, 1),
            "populate_leads_per_s": round(n / seconds)}


async def bench_reads(settings: Settings, rules_text: str) -> Figures:
    """Read times, then Redis memory per lead (every key's ``MEMORY USAGE``, views included)."""
    client = redis_client(settings)
    try:
        figures: Figures = {"reads_ms": await _time_reads(client, load_rules(rules_text), settings)}
        leads = sum([await client.zcard(view_key(shard, "lb")) for shard in range(SHARDS)])
        counters = await Views(client).counters()
        memory = await _memory(client)
        n = counters.get("leads", 0)
        figures["memory"] = {"leads": n, "open_leads": leads, "bytes_per_lead": round(memory["total"] / n),
                             "bytes_per_lead_by_kind": {k: round(v / n) for k, v in memory.items() if k != "total"},
                             "used_memory_bytes": int((await client.info("memory"))["used_memory"])}
        return figures
    finally:
        await client.aclose()


READER_BLOCKS = ("without", "with", "with", "without")  # ABBA: a drift of the machine's load falls on both


async def bench_reader_effect(settings: Settings, rate: float, seconds: float) -> Figures:
    """The worker's event -> score latency at ``rate`` without and with a dashboard load every second
    (from ``leadstream api``, its own process), on whatever Redis holds (e.g. a million leads).

    The phases alternate in :data:`READER_BLOCKS` of ``seconds / 2`` each, pooled per phase, and the
    events carry no deal outcome: no model is trained, so its lifecycle (checkpoints, a rescoring pass
    of every open lead after each new version) cannot fall into one phase and not the other."""
    await ensure_topics(settings)
    log_dir = Path(settings.home) / "logs"
    procs = [_start_scorer(settings, 0),
             start_api(settings, log_dir / f"bench-api-r-{settings.app_id}.log", env=_env(settings))]
    dashboard = f"http://127.0.0.1:{settings.api_port}/dashboard"
    pooled: dict[str, list[float]] = {"without": [], "with": []}
    block_s = seconds / 2

    def events(seed: int, prefix: str, length_s: float) -> list[dict[str, Any]]:
        fresh = _fresh_events(max(50, int(rate * length_s / 20)), seed, prefix)
        return [e for e in fresh if e["type"] not in ("deal_won", "deal_lost")]

    try:
        # Warm-up, not measured: the worker joins its group and takes its partitions.
        await bench_latency(settings, events(30, "warm", 5), rate, 5)
        t0 = time.perf_counter()
        await asyncio.to_thread(_get, dashboard, settings.api_token)
        page_ms = round((time.perf_counter() - t0) * 1000, 1)
        for i, phase in enumerate(READER_BLOCKS):
            reader = (lambda: asyncio.to_thread(_get, dashboard, settings.api_token)) if phase == "with" else None
            await bench_latency(settings, events(31 + i, f"{phase}{i}", block_s), rate, block_s, reader=reader,
                                samples=pooled[phase])
    finally:
        for p in procs:
            stop_worker(p)
    return {"without_reader": _latency_figures(rate, pooled["without"]),
            "with_reader": _latency_figures(rate, pooled["with"]), "blocks": list(READER_BLOCKS),
            "block_s": block_s, "dashboard_page_ms": page_ms}


PROMOTION_BLOCKS = ("without", "during", "during", "without")  # ABBA, as READER_BLOCKS


async def bench_promotion(settings: Settings, rules_text: str, rate: float, seconds: float,
                          rescore_rate: int) -> Figures:
    """A model promotion in a running scoring worker (``LEADSTREAM_RESCORE_RATE`` ``rescore_rate``),
    over the open leads Redis holds (e.g. from :func:`populate_leads`).

    The worker starts with a first model and rescores every open lead with it while no event
    arrives: the pass's rate in the worker, records produced (``idle_pass``). The populated leads'
    scores are old, so they would all be due for decay (rescored with that model as ``decay``, and
    then skipped by its pass): their due times are cleared first, as if they were scored just now.

    Then its event -> score latency at ``rate`` in :data:`PROMOTION_BLOCKS` of ``seconds / 2``:
    without a pass, and during the pass of a second model (another trainer's, saved just before
    the first "during" block; the pass yields to events, so it outlasts both blocks), pooled per
    phase, with the model rescores done meanwhile (``pass_during_events``). The events carry no
    deal outcome and no trainer runs: no other model version can start a pass in a "without" block."""
    await ensure_topics(settings)
    client = redis_client(settings)
    models = ModelStore(client)
    worker = dataclasses.replace(settings, rescore_rate=rescore_rate, rescore_model_every_s=0,
                                 model_poll_s=0.5)
    open_leads = sum([await client.zcard(view_key(shard, "lb")) for shard in range(SHARDS)])
    for shard in range(SHARDS):  # none due: the first pass is the model's (see above)
        await client.delete(view_key(shard, "due"))
    first, second = _trainer(rules_text, simulate(300, seed=99)), _trainer(rules_text, simulate(300, seed=98))
    first.version, second.version = 1, 2
    await models.save(first)
    metrics_url = f"http://127.0.0.1:{worker.web_port}/metrics"

    def rescores() -> float:  # the worker's rescores so far, from its /metrics
        return rescores_in(_get(metrics_url, worker.api_token).decode())

    pooled: dict[str, list[float]] = {"without": [], "during": []}
    block_s = seconds / 2
    rescored_during, left_after = 0.0, 0.0
    # Each block's events made beforehand: the pass must not run alone while they are simulated.
    blocks = [[e for e in _fresh_events(max(50, int(rate * block_s / 20)), 40 + i, f"p{phase}{i}")
               if e["type"] not in ("deal_won", "deal_lost")] for i, phase in enumerate(PROMOTION_BLOCKS)]
    proc = _start_scorer(worker, 0)
    try:
        idle = await _pass_ended(rescores)
        for i, phase in enumerate(PROMOTION_BLOCKS):
            if phase == "during" and "during" not in PROMOTION_BLOCKS[:i]:
                await models.save(second)
                await _pass_started(rescores)
            before = await asyncio.to_thread(rescores)
            await bench_latency(settings, blocks[i], rate, block_s, samples=pooled[phase])
            if phase == "during":
                at_end = await asyncio.to_thread(rescores)
                rescored_during += at_end - before
                if i + 1 < len(PROMOTION_BLOCKS) and PROMOTION_BLOCKS[i + 1] == "without":
                    # No pass left under way in a "without" block; what it still did shows it ran throughout.
                    left_after = (await _pass_ended(rescores))["rescored"] - at_end
    finally:
        stop_worker(proc)
        await client.aclose()
    return {"open_leads": open_leads, "rescore_rate_setting": rescore_rate, "idle_pass": idle,
            "rate": rate, "blocks": list(PROMOTION_BLOCKS), "block_s": block_s,
            "without_pass": _latency_figures(rate, pooled["without"]),
            "during_pass": _latency_figures(rate, pooled["during"]),
            "pass_during_events": {
                "rescored": int(rescored_during), "rescored_after_the_blocks": int(left_after),
                "leads_per_s": round(rescored_during / (block_s * PROMOTION_BLOCKS.count("during")))}}


async def _pass_started(rescores: Callable[[], float], limit_s: float = 60.0) -> None:
    """Wait until the worker's count of rescores moves: it has seen the new model version."""
    start = await asyncio.to_thread(rescores)
    deadline = time.monotonic() + limit_s
    while await asyncio.to_thread(rescores) == start:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no model rescoring pass started within {limit_s:.0f} s")
        await asyncio.sleep(0.05)


async def _pass_ended(rescores: Callable[[], float], quiet_s: float = 3.0, limit_s: float = 900.0) -> Figures:
    """Poll the worker's count of rescores (``rescores()``) until it has moved and then stayed
    still for ``quiet_s`` (no event arrives meanwhile: a pass under way moves it all the time).
    Returns the rescores seen and their rate, from the first poll that saw the count move to the
    last one."""
    start = last = await asyncio.to_thread(rescores)
    first_at = last_at = None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)  # a scrape costs the worker a few ms
        done, now = await asyncio.to_thread(rescores), time.perf_counter()
        if done != last:
            if first_at is None:
                first_at, start = now, done
            last, last_at = done, now
        elif last_at is not None and now - last_at >= quiet_s:
            seconds = last_at - first_at
            return {"rescored": int(last), "leads_per_s": round((last - start) / seconds) if seconds > 0 else None}
    raise RuntimeError(f"no model rescoring pass ended within {limit_s:.0f} s (rescores seen: {last:.0f})")


def rescores_in(metrics_text: str) -> float:
    """The worker's rescores without an event so far: ``leadstream_scored_total`` of the triggers
    ``model`` and ``decay`` in its ``/metrics`` page (a lead due for decay is rescored with the
    model of the moment, and a model pass then skips it).

    >>> rescores_in('leadstream_scored_total{trigger="event"} 7.0\\n'
    ...             'leadstream_scored_total{trigger="decay"} 3.0\\n'
    ...             'leadstream_scored_total{trigger="model"} 2.0\\n'
    ...             'leadstream_scored_created{trigger="model"} 1.7e+09')
    5.0
    >>> rescores_in("# no rescore yet")
    0.0
    """
    return sum((float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
                if line.startswith(('leadstream_scored_total{trigger="model"}',
                                    'leadstream_scored_total{trigger="decay"}'))), 0.0)


# ---- the command ---------------------------------------------------------------------------------

# The parts that create topics (memory and rescoring use Redis only).
KAFKA_PARTS = {"pipeline", "burst", "reads", "promotion"}


async def _cleanup(settings: Settings, kafka: bool = True) -> None:
    if kafka:
        await _delete_topics(settings)
    client = redis_client(settings)
    await client.flushdb(asynchronous=True)  # in the background: a million leads take seconds
    await client.aclose()


async def _delete_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**kafka_kwargs(settings))
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if settings.app_id.removeprefix("bench-") in t]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()


def run_bench(base: Settings, *, leads: int, rates: list[float], seconds: float, memory_leads: int,
              redis_db: int, json_path: Path | None, parts: set[str], read_leads: int,
              reader_rate: float, pairs: int, promotion_rate: float, rescore_rate: int) -> int:
    """Every part of ``parts``; the defaults of each argument are the command line's (streams/cli.py)."""
    tag = uuid.uuid4().hex[:8]
    settings = bench_settings(base, redis_db, tag)
    rules_text = settings.scoring_config.read_text()
    events = _fresh_events(leads, 99, "pt")
    figures: Figures = {"machine": _machine(), "worker_event_loop": settings.event_loop, "leads": leads,
                        "events": len(events), "kernels": _kernels()}
    print(f"serving kernels (models/kernels.py): {figures['kernels']}")
    try:
        if "step" in parts:
            figures["step"] = bench_step(simulate(min(leads, 300), seed=99), rules_text)
            _print_step(figures["step"])
        if "pipeline" in parts:
            figures["passthrough"] = asyncio.run(bench_passthrough(settings, events))
            figures.update(asyncio.run(bench_pipeline(settings, leads, rates, seconds, reader_rate)))
            figures["ratio_to_passthrough"] = round(
                figures["burst_1_worker"]["events_per_s"] / figures["passthrough"]["events_per_s"], 3)
            _print_pipeline(figures)
        if "burst" in parts:  # a quick check of throughput alone: passthrough and one worker, same run
            figures["burst_pairs"] = [_burst_pair(bench_settings(base, redis_db, f"{tag}p{i}"), leads)
                                      for i in range(pairs)]
            figures.update(min(figures["burst_pairs"], key=lambda p: p["ratio_to_passthrough"]))
            _print_pipeline(figures)
            if pairs > 1:
                _print_pairs(figures["burst_pairs"])
        if "memory" in parts:
            figures["memory"] = asyncio.run(bench_memory_and_reads(settings, memory_leads, rules_text))
            _print_memory(figures["memory"])
        if "reads" in parts:
            figures["reads"] = asyncio.run(populate_leads(settings, read_leads, rules_text))
            figures["reads"].update(asyncio.run(bench_reads(settings, rules_text)))
            figures["reads"]["rescoring"] = asyncio.run(bench_rescoring(settings, rules_text))
            figures["reads"]["worker_latency"] = asyncio.run(bench_reader_effect(settings, reader_rate, seconds))
            _print_reads(figures["reads"])
        if "rescoring" in parts:  # the pass alone, on a Redis of its own: no broker needed
            figures["rescoring"] = asyncio.run(populate_leads(settings, read_leads, rules_text))
            figures["rescoring"]["pass"] = asyncio.run(bench_rescoring(settings, rules_text))
            _print_rescoring(figures["rescoring"])
        if "promotion" in parts:  # a worker's pass with records produced, and event latency during it
            figures["promotion"] = asyncio.run(populate_leads(settings, read_leads, rules_text))
            promotion = bench_promotion(settings, rules_text, promotion_rate, seconds, rescore_rate)
            figures["promotion"].update(asyncio.run(promotion))
            _print_promotion(figures["promotion"])
    finally:
        asyncio.run(_cleanup(settings, kafka=bool(parts & KAFKA_PARTS)))
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
        print(f"figures written to {json_path}")
    return 0


def _burst_pair(settings: Settings, leads: int) -> Figures:
    """The passthrough, then one fresh worker's burst, of ``leads`` new simulated leads each: one ratio.
    A pair's two halves share the machine's load of their minute; pairs taken apart show its swings.
    Each pair has topics and Redis data of its own (``settings``), removed after it: a pair never
    reads an earlier pair's records, nor rescores its leads."""
    try:
        passthrough = asyncio.run(bench_passthrough(settings, _fresh_events(leads, 99, "pt")))
        burst = asyncio.run(bench_one_burst(settings, leads))
    finally:
        asyncio.run(_cleanup(settings))
    return {"passthrough": passthrough, "burst_1_worker": burst,
            "ratio_to_passthrough": round(burst["events_per_s"] / passthrough["events_per_s"], 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _print_pairs(pairs: list[Figures]) -> None:
    ratios = sorted(p["ratio_to_passthrough"] for p in pairs)
    _table([(f"pair {i + 1} (load {p['load_avg_1m']})", f"{p['passthrough']['events_per_s']:,} / "
             f"{p['burst_1_worker']['events_per_s']:,} events/s ({p['ratio_to_passthrough']:.0%})"
             + _forked(p["burst_1_worker"].get("redis_forks")))
            for i, p in enumerate(pairs)]
           + [("ratio: lowest / median / highest (the figures above: the lowest pair)",
               f"{ratios[0]:.0%} / {statistics.median(ratios):.0%} / {ratios[-1]:.0%}")])


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def _kernels() -> str:
    """Whether this run's models/kernels.py is compiled (the workers it starts load the same build)."""
    from models import kernels

    return "compiled" if kernels.IMPL is not kernels else "plain Python (not built: deploy/build_native.py)"


def _print_step(f: Figures) -> None:
    print(f"pure step (decode + validate + fold + features + score): rules {f['us_per_event_rules']} us/event, "
          f"model {f['us_per_event_model']} us/event ({f['model_source']}); reference loop {f['reference_us']} "
          f"us (the machine's speed in these minutes: streams.bench.reference_us)")


def _print_pipeline(f: Figures) -> None:
    rows = [
        ("plain aiokafka passthrough (ceiling)", f"{f['passthrough']['events_per_s']:,} events/s"),
        ("one worker, burst", f"{f['burst_1_worker']['events_per_s']:,} events/s "
                              f"({f['ratio_to_passthrough']:.0%} of the passthrough)"
                              + _forked(f["burst_1_worker"].get("redis_forks"))),
    ]
    if "burst_2_workers" in f:
        rows.append(("two workers, burst", f"{f['burst_2_workers']['events_per_s']:,} events/s"))
    rows += [(f"latency at {r['rate']:,.0f} events/s", f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms"
              f" (sends late: p99 {r['send_late_p99_ms']} ms)") for r in f.get("latency", [])]
    if "latency_with_dashboard_reader" in f:
        r = f["latency_with_dashboard_reader"]
        rows.append((f"latency at {r['rate']:,.0f}/s, dashboard read every 1 s",
                     f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms"))
    _table(rows)


def _print_memory(f: Figures) -> None:
    rows = [(f"Redis memory at {f['leads']:,} leads ({f['events']:,} events)",
             f"{f['bytes_per_lead']:,} B/lead, {f['bytes_per_event']} B/event ({f['bytes_per_lead_by_kind']})")]
    rows += [(f"read: {name}", f"{ms} ms") for name, ms in f["reads_ms"].items() if not isinstance(ms, dict)]
    rows += [(f"read: {name}", f"p50 {ms['p50_ms']} ms, p95 {ms['p95_ms']} ms") for name, ms in f["reads_ms"].items()
             if isinstance(ms, dict)]
    rows.append(("full rescoring pass after a model change", f"{f['rescoring']['leads_per_s']:,} leads/s "
                                                             f"({f['rescoring']['open_leads']:,} open leads)"))
    _table(rows)


def _print_reads(f: Figures) -> None:
    rows = [(f"populate {f['leads']:,} leads", f"{f['populate_leads_per_s']:,} leads/s ({f['populate_s']} s, "
                                               f"after {f['template_write_s']} s for {f['templates']} templates)")]
    rows += [(f"read at {f['leads']:,} leads: {name}", f"p50 {ms['p50_ms']} ms, p95 {ms['p95_ms']} ms")
             for name, ms in f["reads_ms"].items()]
    m = f["memory"]
    rows.append((f"Redis memory at {m['leads']:,} leads, read models included",
                 f"{m['bytes_per_lead']:,} B/lead ({m['bytes_per_lead_by_kind']}); used_memory {m['used_memory_bytes']:,} B"))
    w = f["worker_latency"]
    for label, r in (("without a reader", w["without_reader"]), ("dashboard loaded every 1 s", w["with_reader"])):
        rows.append((f"worker latency at {r['rate']:,.0f}/s, {f['leads']:,} leads, {label}",
                     f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms"))
    rows.append(("dashboard page (leadstream api)", f"{w['dashboard_page_ms']} ms"))
    r = f["rescoring"]
    rows.append((f"model rescoring pass over the {r['open_leads']:,} open leads", f"{r['leads_per_s']:,} leads/s"))
    _table(rows)


def _print_rescoring(f: Figures) -> None:
    r = f["pass"]
    _table([(f"populate {f['leads']:,} leads", f"{f['populate_leads_per_s']:,} leads/s ({f['populate_s']} s)"),
            (f"model rescoring pass over the {r['open_leads']:,} open leads",
             f"{r['leads_per_s']:,} leads/s (CPU per lead: worker {r['worker_cpu_us_per_lead']} us, "
             f"Redis {r['redis_cpu_us_per_lead']} us)" + _forked(r.get("redis_forks")))])


def _print_promotion(f: Figures) -> None:
    idle, busy = f["idle_pass"], f["pass_during_events"]
    rows = [(f"populate {f['leads']:,} leads", f"{f['populate_leads_per_s']:,} leads/s ({f['populate_s']} s)"),
            (f"worker's model pass, {f['open_leads']:,} open leads, no events (rate setting "
             f"{f['rescore_rate_setting']:,}/s)", f"{idle['leads_per_s'] or 0:,} leads/s, records produced"),
            (f"the next pass while events arrive at {f['rate']:,.0f}/s",
             f"{busy['leads_per_s']:,} leads/s (it yields to events; "
             f"{busy['rescored_after_the_blocks']:,} more after)")]
    for label, key in (("without a pass", "without_pass"), ("during a model pass", "during_pass")):
        r = f[key]
        rows.append((f"latency at {r['rate']:,.0f} events/s, {label}",
                     f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms"))
    _table(rows)


def _forked(forks: int | None) -> str:
    return f"; Redis forked {forks}x meanwhile (snapshot or AOF rewrite)" if forks else ""


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


def main(args: argparse.Namespace, settings: Settings) -> int:
    rates = [float(r) for r in args.rates.split(",") if r]
    return run_bench(settings, leads=args.leads, rates=rates, seconds=args.seconds, memory_leads=args.memory_leads,
                     redis_db=args.redis_db, json_path=args.json, parts=set(args.only.split(",")),
                     read_leads=args.read_leads, reader_rate=args.reader_rate, pairs=args.pairs,
                     promotion_rate=args.promotion_rate, rescore_rate=args.rescore_rate)

