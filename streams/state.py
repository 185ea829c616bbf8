"""Lead state, read models and model checkpoints in Redis.

Key layout. Leads are spread over :data:`SHARDS` hash tags ``{00}`` .. ``{31}``: a lead's keys and
the read models of its shard share one tag, so the write that updates a lead and its views is one
Lua script on one Redis Cluster slot. A batch is a pipeline of such per-lead scripts, never one
script over several leads.

``lead:{NN}:ID``  hash, one per lead
    ``v`` version for compare-and-set; ``s`` the folded state (JSON: counts, fields, stage,
    score, grade, reasons, the last scores); ``ids`` the 8-byte digests of the lead's last
    ``LEADSTREAM_DEDUPE_IDS`` event ids; ``off`` the last applied offset per source
    ``kind/partition`` (JSON); ``snaps`` the stage-entry feature snapshots (zlib'd JSON, only
    while the deal is open); ``o:KIND/PARTITION/OFFSET`` the outputs sent for that input record,
    kept only until Kafka has acknowledged them (re-sent if that offset is redelivered after a
    crash), so a lead at rest has none.
``dts`` (only for a lead started again after a deletion) the deletion time: older events are ignored.
``gone:{NN}:HASH``  string, TTL ``LEADSTREAM_TOMBSTONE_TTL_SECONDS``
    a deleted lead's deletion time, under a digest of its id (no identifier is kept): events up
    to that time get a tombstone instead of bringing the lead back.
``view:{NN}:c``  hash: the shard's counters (see :mod:`models.readmodel`)
``view:{NN}:NAME``  sorted sets, member = lead id: ``lb`` open leads by score, ``lb:STAGE``,
    ``lbo:OWNER``, ``hot``; ``st:STAGE`` / ``sto:OWNER`` open leads by stage entry time;
    ``due`` open leads by next rescoring time; ``dtc`` closed leads by days to close.
``model:serving`` / ``model:version`` / ``model:trainer`` / ``model:report``
    the serving checkpoint (pickle), its version, the trainer's full state (pickle, with the
    offset of the last training message it applied) and its metrics (JSON), saved together every
    ``LEADSTREAM_CHECKPOINT_EVERY_DEALS`` deals or ``LEADSTREAM_CHECKPOINT_EVERY_SECONDS``. They hold
    aggregate weights over bounded features only: no private field's value (``models/fields.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pickle
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from models.features import load_state
from models.learner import MODEL_FORMAT, ServingModel, Trainer
from models.readmodel import Contribution, ViewChanges
from streams.clients import StreamedPipeline, hash_reply, pipelined

SHARDS = 32  # fixed: changing it moves every key (a migration, not a setting)
DIGEST_BYTES = 8

# The view changes of a lead's write (``member`` its id, ``ops`` the JSON [[op, key index, args...], ...]):
# z = ZADD score, r = ZREM, h = HINCRBY of the counters hash (a counter at 0 is removed).
_APPLY_VIEWS = """
for _, op in ipairs(cjson.decode(ops)) do
  local key = KEYS[op[2]]
  if op[1] == 'z' then
    redis.call('ZADD', key, op[3], member)
  elseif op[1] == 'r' then
    redis.call('ZREM', key, member)
  elseif redis.call('HINCRBY', key, op[3], op[4]) == 0 then
    redis.call('HDEL', key, op[3])
  end
end
return 1
"""

# KEYS: lead hash, tombstone, view keys. ARGV: expected version, expected tombstone, delete (1/0),
# tombstone to set ('' none), tombstone TTL, n fields, fields..., n deleted fields, names..., the lead
# id (the views' member), the view changes as JSON [[op, key index, args...], ...].
_WRITE = """
local v = redis.call('HGET', KEYS[1], 'v') or '0'
if v ~= ARGV[1] then return 0 end
local deleted
if v == '0' then deleted = redis.call('GET', KEYS[2]) else deleted = redis.call('HGET', KEYS[1], 'dts') end
if (deleted or '') ~= ARGV[2] then return 0 end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5]) end
local i = 6
local n = tonumber(ARGV[i])
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, unpack(ARGV, i + 1, i + 2 * n))
end
i = i + 2 * n + 1
local d = tonumber(ARGV[i])
if d > 0 and ARGV[3] ~= '1' then redis.call('HDEL', KEYS[1], unpack(ARGV, i + 1, i + d)) end
i = i + d + 1
local member, ops = ARGV[i], ARGV[i + 1]
""" + _APPLY_VIEWS

# A rescore's write (LeadWrite.state_only, the lead exists): only the state and the views change.
# KEYS: lead hash, view keys. ARGV: expected version, expected deletion time ('' none), the state, the
# lead id, the view changes. The same guards as _WRITE for a lead that exists: a deletion (the hash
# gone) or a deletion and a new start (a new ``dts``, the version counted again from 1) both refuse it.
_WRITE_STATE = """
local guards = redis.call('HMGET', KEYS[1], 'v', 'dts')
if guards[1] ~= ARGV[1] or (guards[2] or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(guards[1]) + 1, 's', ARGV[3])
local member, ops = ARGV[4], ARGV[5]
""" + _APPLY_VIEWS
_SCRIPTS = (_WRITE, _WRITE_STATE)

APPLIED, CONFLICT = 1, 0
log = logging.getLogger(__name__)


def shard_of(lead_id: str) -> int:
    return zlib.crc32(lead_id.encode()) % SHARDS


def tag(shard: int) -> str:
    return _TAGS[shard]


KEY_MEMO = 8192  # leads whose keys are kept: every write names both (a hash and a CRC: ~1 µs a lead)
_TAGS = tuple(f"{{{shard:02d}}}" for shard in range(SHARDS))  # formatted once: every key of every write has one


@lru_cache(maxsize=KEY_MEMO)
def lead_key(lead_id: str) -> str:
    return f"lead:{tag(shard_of(lead_id))}:{lead_id}"


@lru_cache(maxsize=KEY_MEMO)
def tombstone_key(lead_id: str) -> str:
    return f"gone:{tag(shard_of(lead_id))}:{hashlib.blake2b(lead_id.encode(), digest_size=16).hexdigest()}"


def view_key(shard: int, name: str) -> str:
    return f"view:{tag(shard)}:{name}"


def event_digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


def has_digest(ids: bytes, digest: bytes) -> bool:
    """Whether ``digest`` is one of the fixed-size digests packed in ``ids``."""
    start = ids.find(digest)
    while start != -1:
        if start % DIGEST_BYTES == 0:
            return True
        start = ids.find(digest, start + 1)
    return False


@dataclass(slots=True)  # no __dict__: a worker keeps thousands (one container less for the collector to walk)
class LeadRecord:
    """A lead as loaded for a batch: everything the pure step needs, plus the guards."""

    lead_id: str
    version: str = "0"
    state_raw: bytes | None = None  # the state's JSON, parsed on demand (the hot path parses it once)
    ids: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)
    snaps_raw: bytes | None = None  # the stage snapshots, compressed: decompressed only when needed
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # origin "kind/partition/offset" -> outputs
    tombstone: str = ""  # the deletion time as stored ('' when never deleted or expired)

    @property
    def deleted_ts(self) -> int | None:
        return int(self.tombstone) if self.tombstone else None

    @property
    def state(self) -> dict[str, Any] | None:
        """The stored state (parsed once, shared: do not change it; see :meth:`fresh_state`)."""
        if self.state_raw is None:
            return None
        if self._parsed is None:
            self._parsed = load_state(self.state_raw)
        return self._parsed

    def fresh_state(self) -> dict[str, Any] | None:
        """A state of its own to fold events into in place: the one the write that made this record
        handed over (:meth:`LeadStore.written`; once: nobody else holds it), else newly parsed."""
        handed, self.handed_state = self.handed_state, None
        if handed is not None:
            return handed
        return load_state(self.state_raw) if self.state_raw is not None else None

    @property
    def snaps(self) -> list[dict[str, Any]]:
        """The stage snapshots (a new list each time: only a deal's close and a stage entry need them)."""
        return orjson.loads(zlib.decompress(self.snaps_raw)) if self.snaps_raw else []

    _parsed: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Kept leads only (see LeadStore.written): the state as written, not parsed again (handed out once),
    # and what it contributes to the read models (a pure function of the state: not computed again).
    handed_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    views_held: Contribution | None = field(default=None, repr=False, compare=False)
    # When the pipeline kept it (monotonic s): the record itself is the cache's entry, no (time, record)
    # tuple beside it for the garbage collector to walk.
    kept_at: float = field(default=0.0, repr=False, compare=False)


@dataclass
class LeadWrite:
    """The new content of a lead after a batch, and the view changes that go with it."""

    record: LeadRecord  # as loaded: the compare-and-set expects its version and tombstone
    state: dict[str, Any] | None
    ids: bytes
    offsets: dict[str, int]
    snaps: list[dict[str, Any]] | None  # None: as stored (unchanged)
    pending: dict[str, dict[str, Any]]  # origin -> outputs of this write, kept until acknowledged
    deleted_ts: int | None
    views: ViewChanges
    state_only: bool = False  # only the state changes (a rescore): ids, offsets and snapshots stay as stored
    # The state's JSON and the snapshots' blob as the write's call carries them (set by LeadStore.write_call).
    state_json: bytes | None = field(default=None, repr=False)
    snaps_blob: bytes | None = field(default=None, repr=False)
    views_after: Contribution | None = field(default=None, repr=False)  # what ``state`` contributes to the views


class LeadWrites:
    """One round trip of lead writes (:meth:`LeadStore.writing`), each an atomic script call, sent
    while the caller is still computing the next ones (:class:`~streams.clients.StreamedPipeline`)."""

    def __init__(self, store: LeadStore) -> None:
        self.store = store
        self.calls: list[tuple[Any, ...]] = []
        self._pipe = StreamedPipeline(store.client)

    async def __aenter__(self) -> LeadWrites:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pipe.__aexit__(*exc_info)

    def add(self, w: LeadWrite) -> None:
        call = self.store.write_call(w)
        self.calls.append(call)
        self._pipe.add(call)

    async def statuses(self) -> list[int]:
        """APPLIED or CONFLICT for each write, in the order added."""
        try:
            return [int(r) for r in await self._pipe.replies()]
        except NoScriptError:  # first use, or Redis restarted: load the scripts and write again
            # Nothing ran unless the batch mixed a known and an unknown script (a batch is either
            # events or rescores: never in practice); a write that ran is then refused as stale.
            for script in _SCRIPTS:
                await self.store.client.script_load(script)
        return [int(r) for r in await pipelined(self.store.client, self.calls)]


PENDING = "o:"  # prefix of the re-send fields
_STATE_FIELDS = (b"v", b"s", b"dts")  # what a rescore reads and guards on


class LeadStore:
    def __init__(self, client: aioredis.Redis, tombstone_ttl_s: int = 30 * 86_400) -> None:
        self.client = client
        self.tombstone_ttl_s = tombstone_ttl_s
        self._write_sha, self._write_state_sha = _sha(_WRITE), _sha(_WRITE_STATE)

    async def load_many(self, lead_ids: Iterable[str], acked: Iterable[tuple[str, list[str]]] = (),
                        state_only: bool = False) -> dict[str, LeadRecord]:
        """Every lead of a batch in one round trip (plus, in the same trip, the clean-up of the
        re-send material of earlier writes whose outputs Kafka has acknowledged). ``state_only``:
        the state and its guards, not the event guards and snapshots (rescoring: a write of
        ``LeadWrite.state_only`` follows)."""
        commands: list[tuple[Any, ...]] = [("HDEL", lead_key(lead_id), *(PENDING + o for o in origins))
                                           for lead_id, origins in acked]
        ids = list(lead_ids)
        if state_only:
            commands += [("HMGET", lead_key(lead_id), *_STATE_FIELDS) for lead_id in ids]
        else:
            commands += [("HGETALL", lead_key(lead_id)) for lead_id in ids]
        results = await pipelined(self.client, commands)
        results = results[len(results) - len(ids):]
        if state_only:
            return {lead_id: _state_record(lead_id, *values) for lead_id, values in zip(ids, results)}
        hashes = {lead_id: hash_reply(reply) for lead_id, reply in zip(ids, results)}
        # A lead that exists carries its deletion time (if it was ever deleted) in ``dts``; only the
        # absent ones need their tombstone: a second trip, for new or deleted leads only.
        absent = [lead_id for lead_id, values in hashes.items() if not values]
        tombstones: dict[str, bytes | None] = {}
        if absent:
            tombstones = dict(zip(absent, await pipelined(self.client, [("GET", tombstone_key(lead_id))
                                                                          for lead_id in absent])))
        return {lead_id: _record(lead_id, hashes[lead_id], tombstones.get(lead_id)) for lead_id in ids}

    async def write_many(self, writes: list[LeadWrite]) -> list[int]:
        """Apply each lead's write atomically (one pipelined round trip); APPLIED or CONFLICT each."""
        async with self.writing() as stream:
            for w in writes:
                stream.add(w)
            return await stream.statuses()

    def writing(self) -> LeadWrites:
        """Writes sent as they are added (:meth:`LeadWrites.add`), so Redis applies the first while the
        caller computes the next; :meth:`LeadWrites.statuses` waits for them all."""
        return LeadWrites(self)

    def write_call(self, w: LeadWrite) -> tuple[Any, ...]:
        """The command that applies ``w`` atomically: EVALSHA of the rescore's script or the full one."""
        return ("EVALSHA", *(self._state_call(w) if _state_write(w) else self._script_call(w)))

    def _state_call(self, w: LeadWrite) -> list[Any]:
        """EVALSHA arguments of a rescore's write (:data:`_WRITE_STATE`): a third of the full write's."""
        lead_id = w.record.lead_id
        keys = [lead_key(lead_id)]
        ops = _view_ops(shard_of(lead_id), w.views, keys)
        return [self._write_state_sha, len(keys), *keys, w.record.version, w.record.tombstone,
                orjson.dumps(w.state), lead_id, ops]

    def _script_call(self, w: LeadWrite) -> list[Any]:
        """EVALSHA arguments of a lead's write (:data:`_WRITE`)."""
        lead_id = w.record.lead_id
        tombstone = str(w.deleted_ts) if w.deleted_ts is not None and str(w.deleted_ts) != w.record.tombstone else ""
        fields: list[Any] = []
        removed: list[str] = []
        if w.state_only:
            fields += ["s", orjson.dumps(w.state)]
        elif w.state is not None:
            w.state_json = orjson.dumps(w.state)
            fields += ["s", w.state_json, "ids", w.ids, "off", orjson.dumps(w.offsets)]
            if w.deleted_ts is not None:  # a lead started again after a deletion remembers it
                fields += ["dts", str(w.deleted_ts)]
            if w.snaps:
                w.snaps_blob = zlib.compress(orjson.dumps(w.snaps))
                fields += ["snaps", w.snaps_blob]
            elif w.snaps is not None and w.record.snaps_raw:
                removed.append("snaps")
            for origin, sent in w.pending.items():
                fields += [PENDING + origin, orjson.dumps(sent)]
        keys = [lead_key(lead_id), tombstone_key(lead_id)]
        ops = _view_ops(shard_of(lead_id), w.views, keys)
        args = [w.record.version, w.record.tombstone, "1" if w.state is None else "0", tombstone,
                self.tombstone_ttl_s, len(fields) // 2, *fields, len(removed), *removed, lead_id, ops]
        return [self._write_sha, len(keys), *keys, *args]

    @staticmethod
    def written(w: LeadWrite) -> LeadRecord | None:
        """The lead as Redis holds it once the full write ``w`` (made by :meth:`write_call`) applied,
        as :meth:`load_many` would load it; None for a deletion or a rescore's write (not rebuilt).
        ``w.state`` goes with it, handed to the next fold as is: the caller must not keep it.

        >>> before = LeadRecord("l1", "4", b"{}", b"", {"web/0": 3}, b"z", {"web/0/3": {"scores": None}})
        >>> w = LeadWrite(before, {"n": 1}, b"12345678", {"web/0": 4}, [], {"web/0/4": {"scores": None}}, None,
        ...               ViewChanges(), state_json=b'{"n":1}')  # snapshots [] after a close: removed
        >>> after = LeadStore.written(w)
        >>> after.version, after.state, after.snaps_raw, sorted(after.pending), after.offsets
        ('5', {'n': 1}, None, ['web/0/3', 'web/0/4'], {'web/0': 4})
        """
        if w.state is None or w.state_only or w.state_json is None:
            return None
        r = w.record
        snaps_raw = w.snaps_blob if w.snaps else (None if w.snaps is not None else r.snaps_raw)
        return LeadRecord(r.lead_id, str(int(r.version) + 1), w.state_json, w.ids, w.offsets, snaps_raw,
                          r.pending | w.pending, str(w.deleted_ts) if w.deleted_ts is not None else r.tombstone,
                          handed_state=w.state, views_held=w.views_after)

    async def get(self, lead_id: str) -> dict[str, Any] | None:
        """One lead for people and APIs: its state, score, grade, stage, source, the last scores."""
        record = (await self.load_many([lead_id]))[lead_id]
        return lead_view(record) if record.state is not None else None

    async def states(self, batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every lead's state (SCAN; for ``rebuild-views`` and offline reports, never for dashboards)."""
        keys: list[bytes] = []
        async for key in self.client.scan_iter(match="lead:{*}:*", count=batch, _type="HASH"):
            keys.append(key)
            if len(keys) >= batch:
                for state in await self._states(keys):
                    yield state
                keys = []
        for state in await self._states(keys):
            yield state

    async def _states(self, keys: list[bytes]) -> list[dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "s")
        return [orjson.loads(raw) for raw in await pipe.execute() if raw]


def _view_ops(shard: int, views: ViewChanges, keys: list[str]) -> bytes:
    """The view changes as one JSON argument (fewer arguments to pack, decoded in Redis), each op
    naming its key by its index in ``keys`` (1-based, as Lua's KEYS), the keys appended to ``keys``."""
    index: dict[str, int] = {}

    def key_no(name: str) -> int:
        if name not in index:
            keys.append(view_key(shard, name))
            index[name] = len(keys)
        return index[name]

    ops: list[list[Any]] = [["z", key_no(name), score] for name, score in views.set_adds.items()]
    ops += [["r", key_no(name)] for name in views.set_removes]
    ops += [["h", key_no("c"), name, delta] for name, delta in views.counters.items()]
    return orjson.dumps(ops)


def _state_write(w: LeadWrite) -> bool:
    """Whether :data:`_WRITE_STATE` does all ``w`` asks: a rescore of a lead that exists, its deletion
    time unchanged (else the full write, which also handles a tombstone)."""
    return w.state_only and w.state is not None and w.record.version != "0" and w.deleted_ts == w.record.deleted_ts


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def lead_view(record: LeadRecord) -> dict[str, Any]:
    state = record.state or {}
    return {
        "lead_id": record.lead_id, "v": record.version, "state": state,
        "score": state.get("score"), "grade": state.get("grade"), "stage": state.get("stage"),
        "source": state.get("source"), "hot": state.get("hot", False), "reasons": state.get("reasons", []),
        "model_version": state.get("model_version"), "updated_at": state.get("scored_at"),
        "history": [{"ts": ts, "score": score, "grade": grade, "trigger": trigger}
                    for ts, score, grade, trigger in state.get("history", [])],
        "stage_snapshots": len(record.snaps),
    }


def _record(lead_id: str, values: dict[bytes, bytes], tombstone: bytes | None) -> LeadRecord:
    s, off, snaps = values.get(b"s"), values.get(b"off"), values.get(b"snaps")
    pending = {k[2:].decode(): orjson.loads(v) for k, v in values.items() if k.startswith(b"o:")}
    return LeadRecord(
        lead_id, values.get(b"v", b"0").decode(), s or None, values.get(b"ids", b""),
        orjson.loads(off) if off else {}, snaps or None, pending, (values.get(b"dts") or tombstone or b"").decode())


def _state_record(lead_id: str, version: bytes | None, state: bytes | None, dts: bytes | None) -> LeadRecord:
    """A lead as a rescore loads it (the values of :data:`_STATE_FIELDS`): :func:`_record` of them, directly."""
    return LeadRecord(lead_id, version.decode() if version is not None else "0", state or None,
                      tombstone=(dts or b"").decode())


def _pickled(trainer: Trainer) -> tuple[bytes, bytes, dict[str, Any]]:
    return pickle.dumps(trainer), pickle.dumps(trainer.serving()), trainer.report()


class ModelStore:
    """Versioned model checkpoints: one trainer writes, every scorer reads.

    ``model:version`` (string), ``model:serving`` (pickle: the serving checkpoint), ``model:trainer``
    (pickle: the trainer's whole state with the offset of the last training message applied),
    ``model:report`` (JSON, with the checkpoint's size and save/load times).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.load_ms: float | None = None  # unpickling time of the last trainer loaded

    async def save(self, trainer: Trainer, **extra: Any) -> dict[str, Any]:
        """Write the trainer (with its ``last_offset``), the serving model, the version and the report
        in one transaction; returns the checkpoint's figures (also in the report's ``checkpoint``)."""
        started = time.perf_counter()
        # Pickling takes up to seconds for a big tournament: in a thread, so the event loop (the
        # scoring loop, in the same worker) keeps its turns instead of stalling for all of it.
        trainer_bytes, serving_bytes, report = await asyncio.to_thread(_pickled, trainer)
        figures = {"trainer_bytes": len(trainer_bytes), "serving_bytes": len(serving_bytes),
                   "offset": trainer.last_offset, "saved_at_ms": int(time.time() * 1000),
                   "load_ms": self.load_ms, **extra}
        pipe = self.client.pipeline(transaction=True)  # version, checkpoint and trainer move together
        pipe.set("model:trainer", trainer_bytes)
        pipe.set("model:serving", serving_bytes)
        pipe.set("model:version", trainer.version)
        figures["save_ms"] = round((time.perf_counter() - started) * 1000, 2)  # pickling; the write follows
        pipe.set("model:report", orjson.dumps(report | {"checkpoint": figures}))
        await pipe.execute()
        figures["save_ms_with_write"] = round((time.perf_counter() - started) * 1000, 2)
        return figures

    async def load_trainer(self) -> Trainer | None:
        """The saved trainer, or None when there is none or it is of an older model format."""
        raw = await self.client.get("model:trainer")
        started = time.perf_counter()
        trainer = await asyncio.to_thread(pickle.loads, raw) if raw else None
        self.load_ms = round((time.perf_counter() - started) * 1000, 2) if raw else None
        if trainer is not None and _format(trainer) != MODEL_FORMAT:
            log.warning("model:trainer has format %s, not %s: starting a new model", _format(trainer), MODEL_FORMAT)
            return None
        return trainer

    async def version(self) -> int:
        return int(await self.client.get("model:version") or 0)

    async def load_serving(self) -> ServingModel | None:
        raw = await self.client.get("model:serving")
        serving = await asyncio.to_thread(pickle.loads, raw) if raw else None
        return serving if serving is not None and _format(serving) == MODEL_FORMAT else None

    async def report(self) -> dict[str, Any] | None:
        raw = await self.client.get("model:report")
        return orjson.loads(raw) if raw else None


def _format(checkpoint: object) -> int:
    # The instance's own value: a checkpoint pickled before the field existed has none (format 1),
    # and must not pick up the class default.
    return vars(checkpoint).get("format", 1)
