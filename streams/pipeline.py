"""Thin orchestration of one input message: decode, load state, compute, write, emit.

The computing is :func:`models.scoring.step`; this module only moves bytes between Kafka and
Redis. It returns what to send instead of sending, so the agents own the producer and the tests
can drive it without Kafka.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from models.events import RejectedEvent, parse_event
from models.scoring import Scorer, StepResult, rfc3339, step
from streams.state import APPLIED, CONFLICT, DUPLICATE, LeadStore

log = logging.getLogger(__name__)
MAX_CAS_RETRIES = 20


class ContentionError(RuntimeError):
    """Other writers kept changing the lead (transient: the caller retries the message)."""


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Out:
    """One record to produce: ``kind`` is scores, hot, dead_letter or training."""

    kind: str
    key: bytes | None
    value: bytes | None


def dead_letter(msg: Message, reason: str, now_ms: int) -> Out:
    doc = {
        "error": reason, "source_topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
        "key": msg.key.decode("utf-8", "replace") if msg.key is not None else None,
        "raw": base64.b64encode(msg.value).decode() if msg.value is not None else None,
        "received_at": rfc3339(now_ms),
    }
    return Out("dead_letter", msg.key, orjson.dumps(doc))


class EventPipeline:
    def __init__(self, store: LeadStore, scorer: Scorer, *, topic_kinds: dict[str, str], max_event_bytes: int,
                 max_future_skew_ms: int | None = None) -> None:
        self.store = store
        self.scorer = scorer
        self.topic_kinds = topic_kinds  # input topic name -> "web" | "crm"
        self.max_event_bytes = max_event_bytes
        self.max_future_skew_ms = max_future_skew_ms  # None: no bound on event time ahead of the clock
        self.counts: Counter[str] = Counter()

    async def handle(self, msg: Message) -> list[Out]:
        now_ms = int(time.time() * 1000)
        try:
            event = parse_event(msg.key, msg.value, topic_kind=self.topic_kinds[msg.topic],
                                max_bytes=self.max_event_bytes, now_ms=now_ms,
                                max_future_skew_ms=self.max_future_skew_ms)
        except RejectedEvent as exc:
            self.counts["dead_letter"] += 1
            return [dead_letter(msg, str(exc), now_ms)]
        origin = f"{msg.topic}/{msg.partition}/{msg.offset}"
        closing = event.type in ("deal_won", "deal_lost")
        for attempt in range(MAX_CAS_RETRIES):
            loaded = await self.store.load(event.lead_id, event.event_id, with_snapshots=closing)
            if loaded.seen is not None:
                return self._duplicate(msg, origin, loaded.seen)
            try:
                result = step(loaded.state, event, self.scorer, scored_at_ms=now_ms,
                              stage_snapshots=loaded.stage_snapshots, last_snapshot=loaded.last_snapshot,
                              deleted_ts=loaded.deleted_ts)
            except Exception as exc:  # a valid event the code cannot handle: keep it, keep going
                log.exception("could not process %s", origin)
                self.counts["dead_letter"] += 1
                return [dead_letter(msg, f"could not process the event: {exc!r}", now_ms)]
            outs = {"scores": result.score, "hot": result.hot, "training": result.training}
            sent = orjson.dumps({k: v for k, v in outs.items() if v is not None})
            snapshot = orjson.dumps(result.snapshot) if result.stage_snapshot else None
            status = await self.store.write(event.lead_id, event.event_id, expected_version=loaded.version,
                                            origin=origin, sent=sent, state=result.state,
                                            fields=_hash_fields(result, now_ms), stage_snapshot=snapshot,
                                            close=closing)
            if status == APPLIED:
                break
            if status == DUPLICATE:  # applied concurrently by another worker (rebalance overlap)
                self.counts["duplicate"] += 1
                return []
            assert status == CONFLICT
            self.counts["cas_retry"] += 1
            await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))  # let the other writer finish
        else:
            raise ContentionError(f"lead {event.lead_id}: state kept changing under {MAX_CAS_RETRIES} retries")
        self.counts["scored"] += 1
        return _outs(event.lead_id.encode(), outs)

    def _duplicate(self, msg: Message, origin: str, seen: bytes) -> list[Out]:
        first_origin, _, sent = seen.partition(b"\n")
        if first_origin.decode() == origin:  # Kafka redelivered the same record: send its output again
            self.counts["redelivered"] += 1
            return _outs(msg.key, orjson.loads(sent))
        self.counts["duplicate"] += 1
        log.info("duplicate event ignored: %s (first applied from %s)", origin, first_origin.decode())
        return []


def _hash_fields(result: StepResult, now_ms: int) -> dict[str, Any]:
    """The lead hash's fields besides ``state``: readable ones for people and dashboards."""
    if result.state is None:
        return {"deleted_ts": result.deleted_ts}
    st = result.state
    fields = {"score": st["score"], "grade": st["grade"], "stage": st["stage"] or "", "source": st["source"],
              "updated_at": now_ms}
    if result.snapshot is not None:
        fields["snap_last"] = orjson.dumps(result.snapshot)
    return fields


def _outs(key: bytes | None, outs: dict[str, Any]) -> list[Out]:
    """The records for one applied event; a missing score means a tombstone (lead deleted)."""
    records = [Out("scores", key, orjson.dumps(outs["scores"]) if outs.get("scores") else None)]
    records += [Out(kind, key, orjson.dumps(outs[kind])) for kind in ("hot", "training") if outs.get(kind)]
    return records
