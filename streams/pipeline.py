"""Thin orchestration of a micro-batch of input messages: decode, load, compute, write, emit.

For one batch: every message is decoded and validated (bad ones become dead letters), every lead
of the batch is loaded in one pipelined Redis round trip (but those this worker wrote lately: it
keeps them as written, see :data:`RECORD_CACHE_LEADS`; none when it wrote every one), each lead's events are folded in
partition order in memory by the pure :func:`models.scoring.step`, and every changed lead is
written in one more round trip, each lead by one atomic compare-and-set script that also updates
the read models (each write leaves as soon as its lead is computed: Redis applies it while the next
leads are computed). Leads another writer changed meanwhile are loaded and computed again. The
module returns what to send instead of sending, so the agents own the producer and the tests can
drive it without Kafka.

Exactly-once effect: a lead keeps the offset it last applied per source partition, so a Kafka
redelivery is recognised by construction; its outputs are re-sent if the write that applied it
has not been acknowledged by Kafka yet (the lead keeps them until then). A repeated ``event_id``
among the lead's last ``dedupe_ids`` events changes nothing and sends nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from models.events import Event, RejectedEvent, parse_event
from models.readmodel import contributions, diff, score_contributions
from models.scoring import CLOSING_TYPES, MAX_STAGE_SNAPSHOTS, Scorer, StepResult, rescore, rfc3339, step
from streams.state import APPLIED, DIGEST_BYTES, LeadRecord, LeadStore, LeadWrite, event_digest, has_digest

log = logging.getLogger(__name__)
MAX_CAS_RETRIES = 20
# Leads as this worker last wrote them, so that a batch of leads written lately skips its load round
# trip (~120-180 µs of the worker's CPU and a wait on Redis), and a batch with a few others loads only
# those (a parse of each kept lead's state spared). Safe by the write's compare-and-set: a
# lead another writer changed since is a conflict, loaded and computed again. Bounded in size and age,
# dropped on a rescore's write, a conflict, an error and a rebalance (docs/performance.md).
RECORD_CACHE_LEADS = 5_000
RECORD_CACHE_S = 60.0


class ContentionError(RuntimeError):
    """Other writers kept changing a lead (transient: the caller retries the batch)."""


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # Kafka's record time (for the event -> score latency metric)


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


@dataclass
class Computed:
    """One lead's batch, computed: the write to make and the records to send once it applied."""

    write: LeadWrite | None  # None: nothing to write (only duplicates or redeliveries)
    outs: list[Out]
    failed: dict[int, str]  # index in the lead's events -> why the step failed (dead-lettered)
    sent_origins: list[str] = field(default_factory=list)  # re-send material to drop once Kafka acknowledged


class EventPipeline:
    def __init__(self, store: LeadStore, scorer: Scorer, *, topic_kinds: dict[str, str], max_event_bytes: int,
                 dedupe_ids: int = 64, rescore_every_ms: int = 86_400_000,
                 max_future_skew_ms: int | None = None) -> None:
        self.store = store
        self.scorer = scorer
        self.topic_kinds = topic_kinds  # input topic name -> "web" | "crm"
        self.max_event_bytes = max_event_bytes
        self.dedupe_ids = dedupe_ids
        self.rescore_every_ms = rescore_every_ms
        self.max_future_skew_ms = max_future_skew_ms  # None: no bound on event time ahead of the clock
        self.counts: Counter[str] = Counter()
        self._unacked: list[tuple[str, list[str]]] = []  # (lead, origins) written by the last batch
        self._acked: list[tuple[str, list[str]]] = []  # their outputs are acknowledged: drop their re-send material
        self._last_batch_at = float("-inf")  # monotonic time of the last event batch
        self._written: OrderedDict[str, LeadRecord] = OrderedDict()  # see RECORD_CACHE_LEADS (kept_at: when)
        # Held from a write until its records are handed to the producer, by event batches and
        # rescoring alike: records reach a topic in the order of the writes.
        self.send_order = asyncio.Lock()

    # ---- events -------------------------------------------------------------------------------

    async def handle_batch(self, msgs: list[Message]) -> list[Out]:
        """Everything one batch changes and sends; the caller sends the records, awaits Kafka's
        acknowledgements, calls :meth:`acknowledged`, and only then lets the offsets be committed."""
        now_ms = int(time.time() * 1000)
        outs: list[Out] = []
        by_lead: dict[str, list[tuple[Message, Event]]] = {}
        for msg in msgs:
            try:
                event = parse_event(msg.key, msg.value, topic_kind=self.topic_kinds[msg.topic],
                                    max_bytes=self.max_event_bytes, now_ms=now_ms,
                                    max_future_skew_ms=self.max_future_skew_ms)
            except RejectedEvent as exc:
                self.counts["dead_letter"] += 1
                outs.append(dead_letter(msg, str(exc), now_ms))
                continue
            by_lead.setdefault(event.lead_id, []).append((msg, event))
        self._last_batch_at = time.monotonic()
        outs += await self._apply(by_lead, lambda record, events: self._compute(record, events, now_ms))
        return outs

    def busy(self, window_s: float) -> bool:
        """Whether events arrived within ``window_s``: background work then takes a back seat."""
        return self._last_batch_at >= time.monotonic() - window_s

    def take_unacked(self) -> list[tuple[str, list[str]]]:
        """The re-send material of the batches handled since the last call: hand it back to
        :meth:`acknowledged` once Kafka acknowledged their records (batches may overlap)."""
        unacked, self._unacked = self._unacked, []
        return unacked

    def acknowledged(self, material: list[tuple[str, list[str]]] | None = None) -> None:
        """Kafka acknowledged the records of ``material`` (default: of every batch handled since the
        last :meth:`take_unacked`): their re-send material can go."""
        material = self.take_unacked() if material is None else material
        for lead, origins in material:  # acknowledged: never re-sent, whatever the cache holds
            cached = self._written.get(lead)
            if cached is not None:
                for origin in origins:
                    cached.pending.pop(origin, None)
        self._acked += material

    def forget_written(self) -> None:
        """Drop the leads kept as last written (partitions move: another worker may write them now)."""
        self._written.clear()

    async def flush_acked(self) -> None:
        """Drop acknowledged re-send material now (the next batch's load does it otherwise)."""
        if self._acked:
            await self._load({}, self._take_acked())

    # ---- rescoring without events ------------------------------------------------------------

    async def rescore_leads(self, lead_ids: Iterable[str], trigger: str, now_ms: int | None = None, *,
                            loaded: Awaitable[dict[str, LeadRecord]] | None = None) -> list[Out]:
        """Score these leads again at ``now_ms`` through the same write path (``decay`` or ``model``).
        ``loaded``: their states, loading already (:meth:`rescore_chunks`)."""
        now_ms = now_ms or int(time.time() * 1000)
        plan = {lead_id: [] for lead_id in lead_ids}
        return await self._apply(plan, lambda record, _: self._compute_rescore(record, now_ms, trigger),
                                 state_only=True, loaded=loaded)

    async def rescore_chunks(self, chunks: list[list[str]], trigger: str, now_ms: int,
                             emit: Callable[[list[Out]], Awaitable[None]], gap_s: float = 0.0) -> None:
        """:meth:`rescore_leads` chunk by chunk, each chunk's states loading while the one before
        computes (Redis reads them on its own core meanwhile); ``emit`` hands a chunk's outputs on,
        under :attr:`send_order` as its write; ``gap_s``: a pause between two chunks, out of the lock
        (event batches go on meanwhile). A prefetched state that changes before its write is a
        conflict, loaded and computed again, as any."""
        loading = self._prefetch(chunks[0]) if chunks else None
        try:
            for k, lead_ids in enumerate(chunks):
                async with self.send_order:
                    current, loading = loading, self._prefetch(chunks[k + 1]) if k + 1 < len(chunks) else None
                    if loading is not None:
                        await asyncio.sleep(0)  # the next load leaves now, not after this chunk's compute
                    await emit(await self.rescore_leads(lead_ids, trigger, now_ms, loaded=current))
                if gap_s > 0 and k + 1 < len(chunks):
                    await asyncio.sleep(gap_s)
        finally:
            if loading is not None:
                _discard(loading)

    def _prefetch(self, lead_ids: list[str]) -> asyncio.Task[dict[str, LeadRecord]]:
        return asyncio.ensure_future(self.store.load_many(lead_ids, state_only=True))

    def _compute_rescore(self, record: LeadRecord, now_ms: int, trigger: str) -> Computed:
        state = record.fresh_state()
        if state is None or state.get("outcome") or "score" not in state:
            return Computed(None, [], {})
        if trigger == "model" and state.get("model_version") == self.scorer.version:
            return Computed(None, [], {})  # already scored by this model
        # A rescore changes only the score fields: the views move by their part alone.
        before = score_contributions(state, rescore_every_ms=self.rescore_every_ms)
        try:
            r = rescore(state, self.scorer, now_ms=now_ms, trigger=trigger)
        except Exception as exc:  # a lead the model cannot score: left as it is, not the whole pass stopped
            log.warning("could not rescore %s (%s): %r", record.lead_id, trigger, exc)
            self.counts["rescore_failed"] += 1
            return Computed(None, [], {})
        after = score_contributions(state, rescore_every_ms=self.rescore_every_ms)
        write = LeadWrite(record, state, record.ids, record.offsets, None, {}, record.deleted_ts,
                          diff(before, after), state_only=True)
        key = record.lead_id.encode()
        self.counts[f"rescored_{trigger}"] += 1
        return Computed(write, _records(key, {"scores": r.score, "hot": r.hot}), {})

    # ---- the shared write path ------------------------------------------------------------------

    async def _apply(self, by_lead: dict[str, Any], compute: Any, state_only: bool = False,
                     loaded: Awaitable[dict[str, LeadRecord]] | None = None) -> list[Out]:
        outs: list[Out] = []
        todo = dict(by_lead)
        for attempt in range(MAX_CAS_RETRIES):
            if attempt == 0 and loaded is not None:
                records = await loaded
            elif attempt == 0 and not state_only:
                records = await self._kept_or_loaded(todo)
            else:
                records = await self._load(todo, self._take_acked(), state_only)
            computed: dict[str, Computed] = {}
            written: list[str] = []
            try:
                async with self.store.writing() as writes:
                    for lead in todo:  # each write leaves as it is computed: Redis runs it meanwhile
                        c = computed[lead] = compute(records[lead], todo[lead])
                        if c.write is not None:
                            writes.add(c.write)
                            written.append(lead)
                    statuses = await writes.statuses()
            except BaseException:  # which writes applied is unknown: load them next time
                for lead in todo:
                    self._written.pop(lead, None)
                raise
            self._remember(written, statuses, computed)
            conflicts = {lead for lead, status in zip(written, statuses) if status != APPLIED}
            for lead, c in computed.items():
                if lead in conflicts:
                    continue
                outs += c.outs
                if c.sent_origins:
                    self._unacked.append((lead, c.sent_origins))
            if not conflicts:
                return outs
            self.counts["cas_retry"] += len(conflicts)
            todo = {lead: todo[lead] for lead in conflicts}
            await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))  # let the other writer finish
        raise ContentionError(f"leads {sorted(todo)[:5]}: state kept changing under {MAX_CAS_RETRIES} retries")

    async def _kept_or_loaded(self, leads: dict[str, Any]) -> dict[str, LeadRecord]:
        """Each lead of ``leads`` as this worker last wrote it where it is kept and young, the others
        loaded in one round trip (none when all are kept: the acknowledged re-send material then
        waits for the next). Loading only the others spares the kept ones a parse of their state's
        JSON, and keeps the state the write handed over (tuples where the JSON has arrays)."""
        now, records, missing = time.monotonic(), {}, {}
        for lead, events in leads.items():
            kept = self._written.get(lead)
            if kept is None or now - kept.kept_at > RECORD_CACHE_S:
                missing[lead] = events
            else:
                records[lead] = kept
        self.counts["leads_kept"] += len(records)
        if not missing:
            self.counts["loads_cached"] += 1
            return records
        return records | await self._load(missing, self._take_acked())

    def _remember(self, written: list[str], statuses: list[int], computed: dict[str, Computed]) -> None:
        """Keep each lead as its applied write left it; drop the others (a conflict, a deletion, a rescore)."""
        now = time.monotonic()
        for lead, status in zip(written, statuses):
            after = LeadStore.written(computed[lead].write) if status == APPLIED else None  # type: ignore[arg-type]
            self._written.pop(lead, None)
            if after is not None:
                after.kept_at = now
                self._written[lead] = after  # the newest last: the oldest go first
        while len(self._written) > RECORD_CACHE_LEADS:
            self._written.popitem(last=False)

    async def _load(self, leads: dict[str, Any], acked: list[tuple[str, list[str]]],
                    state_only: bool = False) -> dict[str, LeadRecord]:
        try:
            return await self.store.load_many(leads, acked=acked, state_only=state_only)
        except BaseException:
            self._acked = acked + self._acked  # the clean-up did not happen: keep it for the next trip
            raise

    def _take_acked(self) -> list[tuple[str, list[str]]]:
        acked, self._acked = self._acked, []
        return acked

    def _compute(self, record: LeadRecord, events: list[tuple[Message, Event]], now_ms: int) -> Computed:
        """Fold one lead's events of the batch; a step that raises is dead-lettered and the lead
        computed again without it (the fold works in place on one copy of the state)."""
        failed: dict[int, str] = {}
        while True:
            try:
                return self._fold_lead(record, events, now_ms, failed)
            except _StepFailed as exc:
                failed[exc.index] = exc.reason

    def _fold_lead(self, record: LeadRecord, events: list[tuple[Message, Event]], now_ms: int,
                   failed: dict[int, str]) -> Computed:
        state = record.fresh_state()  # folded in place: at most one parse per lead per batch, no copy
        before = record.views_held if record.views_held is not None else \
            contributions(state, rescore_every_ms=self.rescore_every_ms)
        ids, offsets = bytearray(record.ids), dict(record.offsets)
        snaps: list[dict[str, Any]] | None = None  # None: as stored, not decompressed unless needed
        deleted_ts = record.deleted_ts
        pending: dict[str, dict[str, Any]] = {}
        resent: list[str] = []
        outs: list[Out] = []
        counts: Counter[str] = Counter()
        applied = False
        for i, (msg, event) in enumerate(events):
            source = f"{self.topic_kinds[msg.topic]}/{msg.partition}"
            origin = f"{source}/{msg.offset}"
            if i in failed:
                outs.append(dead_letter(msg, f"could not process the event: {failed[i]}", now_ms))
                counts["dead_letter"] += 1
                offsets[source] = max(offsets.get(source, -1), msg.offset)
                continue
            if msg.offset <= offsets.get(source, -1):  # Kafka redelivered what this lead already applied
                counts["redelivered"] += 1
                if origin in record.pending:  # not acknowledged before the crash: send it again
                    outs += _records(msg.key, record.pending[origin])
                    resent.append(origin)
                continue
            digest = event_digest(event.event_id)
            offsets[source] = msg.offset
            if has_digest(bytes(ids), digest):
                counts["duplicate"] += 1
                applied = True  # the offset guard moved
                continue
            try:
                closing = event.type in CLOSING_TYPES  # only a close reads the stage snapshots
                r = step(state, event, self.scorer, scored_at_ms=now_ms, deleted_ts=deleted_ts, copy=False,
                         stage_snapshots=(record.snaps if snaps is None else snaps) if closing else None)
            except Exception as exc:  # a valid event the code cannot handle: keep it, keep going
                log.exception("could not process %s/%s", msg.topic, origin)
                raise _StepFailed(i, repr(exc)) from None
            applied = True
            counts["scored"] += 1
            state, snaps = self._after_step(r, snaps, record)
            if r.state is None:
                deleted_ts, ids, offsets = r.deleted_ts, bytearray(), {source: msg.offset}
            else:
                ids += digest
                del ids[:-self.dedupe_ids * DIGEST_BYTES]
            records = _records(msg.key, {"scores": r.score, "hot": r.hot, "training": r.training})
            # Kept until Kafka acknowledges them, as the JSON already encoded for the records.
            pending[origin] = {o.kind: orjson.Fragment(o.value) if o.value is not None else None for o in records}
            outs += records
        for name, n in counts.items():  # not Counter.update: its Mapping check costs more than these few adds
            self.counts[name] += n
        if not applied:
            return Computed(None, outs, failed, resent)
        after = contributions(state, rescore_every_ms=self.rescore_every_ms)
        write = LeadWrite(record, state, bytes(ids), offsets, snaps, pending, deleted_ts, diff(before, after),
                          views_after=after)
        return Computed(write, outs, failed, resent + list(pending))

    @staticmethod
    def _after_step(r: StepResult, snaps: list[dict[str, Any]] | None, record: LeadRecord
                    ) -> tuple[Any, list[dict[str, Any]] | None]:
        """The state and stage snapshots after a step (snapshots None: unchanged from ``record``)."""
        if r.state is None or r.training is not None or (r.state.get("outcome") and (
                snaps if snaps is not None else record.snaps_raw)):
            return r.state, []  # deleted or closed: the stage snapshots are gone
        if r.stage_snapshot:
            snaps = ((record.snaps if snaps is None else snaps) + [r.snapshot])[-MAX_STAGE_SNAPSHOTS:]
        return r.state, snaps


class _StepFailed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        self.index, self.reason = index, reason


def _records(key: bytes | None, sent: dict[str, Any]) -> list[Out]:
    """The records for one applied event; a missing score means a tombstone (lead deleted)."""
    records = [Out("scores", key, orjson.dumps(sent["scores"]) if sent.get("scores") else None)]
    records += [Out(kind, key, orjson.dumps(sent[kind])) for kind in ("hot", "training") if sent.get(kind)]
    return records


def _discard(task: asyncio.Task[Any]) -> None:
    """A prefetch nobody will read: cancelled, or its error retrieved (no "never retrieved" warning)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()
