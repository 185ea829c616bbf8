"""Publish contract events to the input topics: simulated traffic (``leadstream simulate``) and
historical exports (``leadstream import``).

Each event goes to the web or CRM topic by its type, keyed by ``lead_id`` (UTF-8), as orjson
bytes, in the given order (one lead's events share a partition, so they stay in order).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tqdm import tqdm

from models.events import parse_ts, topic_kind_of
from models.fields import FieldPolicy
from models.offline.history import MappingError, RowResult, load_mapping
from models.offline.simulate import simulate
from models.rules import load_rules
from streams.clients import kafka_kwargs
from streams.offline import stream_history
from streams.settings import Settings
from streams.topics import ensure_topics

PROGRESS_EVERY_S = 2.0
_BATCH = 2000  # sends in flight before waiting for their acks


def topic_for(settings: Settings, event_type: str) -> str:
    """The input topic an event type belongs on (see ``models.events.topic_kind_of``)."""
    return settings.topic_web if topic_kind_of(event_type) == "web" else settings.topic_crm


async def publish_events(settings: Settings, events: Iterable[dict[str, Any]], rate: float = 0.0,
                         speedup: float = 0.0, *, progress: TextIO | None = sys.stderr) -> Counter[str]:
    """Publish ``events`` in order; return how many of each type were acknowledged.

    Parameters
    ----------
    settings : Settings
        Bootstrap servers and the web/CRM topic names (created first if missing).
    events : iterable of dict
        Contract events (consumed lazily).
    rate : float
        At most this many events per second; 0 = unlimited.
    speedup : float
        Simulated seconds per real second, from the events' ``ts``; 0 = ignore event time.
    progress : text stream or None
        Where a progress line goes every few seconds.
    """
    await ensure_topics(settings, {settings.topic_web: settings.partitions, settings.topic_crm: settings.partitions})
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    counts: Counter[str] = Counter()
    pending: list[tuple[str, asyncio.Future[Any]]] = []
    start = last_report = time.monotonic()
    first_ts: int | None = None
    try:
        for n, event in enumerate(events):
            due = n / rate if rate > 0 else 0.0
            if speedup > 0:
                ts = parse_ts(event["ts"])
                first_ts = ts if first_ts is None else first_ts
                due = max(due, (ts - first_ts) / 1000 / speedup)
            now = time.monotonic()
            if due > now - start:
                await asyncio.sleep(due - (now - start))
            value = orjson.dumps(event)
            future = await producer.send(topic_for(settings, event["type"]), value=value,
                                         key=event["lead_id"].encode())
            pending.append((event["type"], future))
            if len(pending) >= _BATCH:
                await _settle(pending, counts)
            if progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                sent = n + 1
                print(f"published {sent} events ({sent / (last_report - start):.0f}/s)", file=progress, flush=True)
        await producer.flush()
        await _settle(pending, counts)
    finally:
        await producer.stop()
    return counts


async def _settle(pending: list[tuple[str, asyncio.Future[Any]]], counts: Counter[str]) -> None:
    """Wait for the acks of ``pending`` (raising the first failure) and count them."""
    await asyncio.gather(*(f for _, f in pending))
    counts.update(t for t, _ in pending)
    pending.clear()


def _print_counts(counts: Counter[str], elapsed: float) -> None:
    total = sum(counts.values())
    print(f"published {total} events in {elapsed:.1f} s")
    for event_type, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {event_type:20} {n}")


def _publish(settings: Settings, events: Iterable[dict[str, Any]], rate: float, speedup: float) -> int:
    start = time.monotonic()
    try:
        counts = asyncio.run(publish_events(settings, events, rate=rate, speedup=speedup))
    except (KafkaError, OSError) as exc:
        print(f"leadstream: publishing to Kafka at {settings.kafka_bootstrap} failed: {exc!r}", file=sys.stderr)
        return 1
    _print_counts(counts, time.monotonic() - start)
    return 0


def run_simulation(settings: Settings, leads: int, rate: float, seed: int, speedup: float) -> int:
    """``leadstream simulate``: publish the simulated stream of ``leads`` leads (0 ok, 1 Kafka failed, 2 bad args)."""
    if leads < 0 or rate < 0 or speedup < 0:
        print("leadstream simulate: --leads, --rate and --speedup must be >= 0", file=sys.stderr)
        return 2
    events = simulate(leads, seed)
    print(f"simulating {leads} leads (seed {seed}): {len(events)} events to {settings.topic_web} and "
          f"{settings.topic_crm}", file=sys.stderr)
    return _publish(settings, events, rate, speedup)


def forget_event(lead_id: str, now_ms: int) -> dict[str, Any]:
    """The ``lead_deleted`` event that erases a lead (GDPR erasure): it goes through the stream like
    any CRM event, so the same write removes the lead's state and read models everywhere."""
    return {"event_id": f"forget-{uuid.uuid4().hex}", "lead_id": lead_id, "type": "lead_deleted", "ts": now_ms,
            "props": {}}


def run_forget(settings: Settings, lead_ids: list[str]) -> int:
    """``leadstream forget``: publish a ``lead_deleted`` for each lead (0 ok, 1 Kafka failed)."""
    now_ms = int(time.time() * 1000)
    code = _publish(settings, [forget_event(lead, now_ms) for lead in lead_ids], 0.0, 0.0)
    if code == 0:
        print(f"erasure requested for {len(lead_ids)} lead(s): the worker removes their state, read models and "
              f"re-send material from Redis and sends a tombstone to {settings.topic_scores}", file=sys.stderr)
    return code


def open_file(file: str | Path, mapping_path: str | Path, policy: FieldPolicy | None = None,
              delimiter: str = ",") -> tuple[Iterator[RowResult], list[str]]:
    """Rows of ``file`` converted lazily with the mapping at ``mapping_path``, and warnings.

    Raises ``MappingError`` for a bad mapping or one naming columns the file lacks, ``OSError`` or
    ``ValueError`` for an unreadable file.
    """
    try:
        mapping = load_mapping(Path(mapping_path).read_text(encoding="utf-8"))
    except MappingError as exc:
        raise MappingError(f"{mapping_path}: {exc}") from None
    if policy is not None:  # the worker learns by its own scoring config: it must agree
        learnable = [f for f in mapping.private_fields if not policy.is_private(f)]
        if learnable:
            raise MappingError(f"mapping {mapping_path} marks {', '.join(map(repr, learnable))} private, but the "
                               f"scoring config would let the model learn it: add {learnable[0]} = \"private\" to "
                               f"[fields.declared] (LEADSTREAM_SCORING_CONFIG)")
    try:
        return stream_history(file, mapping, delimiter)
    except MappingError as exc:
        raise MappingError(f"mapping {mapping_path}: {exc}") from None


def convert_file(file: str | Path, mapping_path: str | Path, policy: FieldPolicy | None = None,
                 delimiter: str = ",") -> tuple[list[RowResult], list[str]]:
    """:func:`open_file`, every row in a list (for small files and tests)."""
    results, warnings = open_file(file, mapping_path, policy, delimiter)
    return list(results), warnings


def run_import(settings: Settings, file: str, mapping: str, delimiter: str = ",") -> int:
    """``leadstream import``: publish a history export as contract events, streaming.

    Rows are read, converted and published one at a time (memory does not grow with the file),
    with a progress bar on a terminal. Exit code 0 when every row was published, 1 when some rows
    were bad (the good ones are still published; each bad row is listed on stderr with its line)
    or Kafka failed, 2 when the mapping or the file cannot be used at all.
    """
    try:
        policy = load_rules(settings.scoring_config.read_text()).fields
        results, warnings = open_file(file, mapping, policy, delimiter)
    except (MappingError, OSError, ValueError) as exc:
        print(f"leadstream import: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = {"read": 0}
    bad: list[int] = []

    def events() -> Iterator[dict[str, Any]]:
        for r in tqdm(results, desc="import", unit=" rows", disable=None, file=sys.stderr):
            rows["read"] += 1
            if r.error:
                bad.append(r.line)
                print(f"{file}:{r.line}: bad row{f' (lead {r.lead_id})' if r.lead_id else ''}: {r.error}",
                      file=sys.stderr)
            yield from r.events

    try:
        code = _publish(settings, events(), rate=0.0, speedup=0.0)
    except (OSError, ValueError) as exc:  # the file became unreadable half-way
        print(f"leadstream import: {exc}", file=sys.stderr)
        return 2
    print(f"read {rows['read']} rows from {file}: {rows['read'] - len(bad)} converted, {len(bad)} bad",
          file=sys.stderr)
    if bad:
        print(f"{len(bad)} bad rows were not imported (lines {', '.join(str(line) for line in bad[:20])}"
              f"{', ...' if len(bad) > 20 else ''})", file=sys.stderr)
    return code or (1 if bad else 0)
