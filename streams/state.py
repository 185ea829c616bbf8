"""Lead state and model checkpoints in Redis.

Key layout (every key of a lead shares the hash tag ``{<lead_id>}``, so it is Redis-Cluster safe):

``lead:{ID}``  hash
    ``state`` the folded state (JSON), ``v`` a version for compare-and-set, ``score``, ``grade``,
    ``stage``, ``source``, ``updated_at`` (epoch ms) for humans and dashboards, ``snap_last`` the
    latest feature snapshot (JSON). After ``lead_deleted`` only ``v`` and ``deleted_ts`` remain.
``lead:{ID}:seen``  hash, expires ``LEADSTREAM_DEDUPE_TTL_SECONDS`` after the lead's last event
    event_id -> ``topic/partition/offset`` of the message that applied it, a newline, the score
    message sent for it. A known event_id changes nothing; if it comes back from the very same
    offset (Kafka redelivery after a crash) its score is sent again, so no score is lost.
``lead:{ID}:snaps``  list, the feature snapshots at each stage entry (bounded; deleted at close).
``model:serving`` / ``model:version`` / ``model:trainer`` / ``model:report``
    the serving checkpoint (pickle), its version, the trainer's full state (pickle, with the
    offset of the last training message it applied) and its metrics (JSON), saved together every
    ``LEADSTREAM_CHECKPOINT_EVERY_DEALS`` deals or ``LEADSTREAM_CHECKPOINT_EVERY_SECONDS``. They hold
    aggregate weights over bounded features only: no private field's value (``models/fields.py``).

Every event is one read round trip and one atomic write (a Lua script): the write only applies if
``v`` is still the version that was read and the event_id is not yet in ``seen``.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from models.learner import MODEL_FORMAT, ServingModel, Trainer
from models.scoring import MAX_STAGE_SNAPSHOTS

_WRITE = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -1 end
local v = redis.call('HGET', KEYS[1], 'v') or '0'
if v ~= ARGV[1] then return 0 end
if ARGV[5] == 'delete' then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, unpack(ARGV, 8))
else
  redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, unpack(ARGV, 8))
  if ARGV[5] == 'close' then redis.call('DEL', KEYS[3]) end
  if ARGV[6] ~= '' then
    redis.call('RPUSH', KEYS[3], ARGV[6])
    redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

APPLIED, CONFLICT, DUPLICATE = 1, 0, -1
log = logging.getLogger(__name__)


def lead_key(lead_id: str) -> str:
    return f"lead:{{{lead_id}}}"


@dataclass
class Loaded:
    version: str
    state: dict[str, Any] | None
    last_snapshot: dict[str, Any] | None
    seen: bytes | None  # the ``seen`` entry when the event_id was already applied
    stage_snapshots: list[dict[str, Any]]
    deleted_ts: int | None


class LeadStore:
    def __init__(self, client: aioredis.Redis, dedupe_ttl_s: int, max_snapshots: int = MAX_STAGE_SNAPSHOTS) -> None:
        self.client = client
        self.dedupe_ttl_s = dedupe_ttl_s
        self.max_snapshots = max_snapshots
        self._write = client.register_script(_WRITE)

    async def load(self, lead_id: str, event_id: str, with_snapshots: bool = False) -> Loaded:
        key = lead_key(lead_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(key, "v", "state", "snap_last", "deleted_ts")
        pipe.hget(f"{key}:seen", event_id)
        if with_snapshots:
            pipe.lrange(f"{key}:snaps", 0, -1)
        results = await pipe.execute()
        (v, state, last, deleted), seen = results[0], results[1]
        snaps = [orjson.loads(s) for s in results[2]] if with_snapshots else []
        return Loaded((v or b"0").decode(), orjson.loads(state) if state else None,
                      orjson.loads(last) if last else None, seen, snaps, int(deleted) if deleted else None)

    async def write(self, lead_id: str, event_id: str, *, expected_version: str, origin: str, sent: bytes,
                    state: dict[str, Any] | None, fields: dict[str, Any] | None = None,
                    stage_snapshot: bytes | None = None, close: bool = False) -> int:
        """Apply one event atomically; returns APPLIED, CONFLICT (retry) or DUPLICATE."""
        key = lead_key(lead_id)
        mode = "delete" if state is None else ("close" if close else "upsert")
        flat: list[Any] = [] if state is None else ["state", orjson.dumps(state)]
        for k, v in (fields or {}).items():
            flat += [k, v if isinstance(v, (bytes, str, int, float)) else orjson.dumps(v)]
        args = [expected_version, event_id, origin.encode() + b"\n" + sent, self.dedupe_ttl_s, mode,
                stage_snapshot or b"", self.max_snapshots, *flat]
        return int(await self._write(keys=[key, f"{key}:seen", f"{key}:snaps"], args=args))

    async def states(self, batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every lead's folded state (SCAN + pipelined reads; for reports, not the hot path)."""
        keys: list[bytes] = []
        async for key in self.client.scan_iter(match="lead:{*}", count=batch, _type="HASH"):
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
            pipe.hmget(key, "state", "grade")
        out = []
        for state, grade in await pipe.execute():
            if state:
                out.append(orjson.loads(state) | {"grade": (grade or b"?").decode()})
        return out

    async def get(self, lead_id: str) -> dict[str, Any] | None:
        raw = await self.client.hgetall(lead_key(lead_id))
        if b"state" not in raw:  # never seen, or deleted
            return None
        out = {k.decode(): v.decode() for k, v in raw.items() if k not in (b"state", b"snap_last")}
        out["state"] = orjson.loads(raw[b"state"])
        out["stage_snapshots"] = await self.client.llen(f"{lead_key(lead_id)}:snaps")
        return out


class ModelStore:
    """Versioned model checkpoints: one trainer writes, every scorer reads."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.load_ms: float | None = None  # unpickling time of the last trainer loaded

    async def save(self, trainer: Trainer, **extra: Any) -> dict[str, Any]:
        """Write the trainer (with its ``last_offset``), the serving model, the version and the report
        in one transaction; returns the checkpoint's figures (also in the report's ``checkpoint``)."""
        started = time.perf_counter()
        trainer_bytes = pickle.dumps(trainer)
        serving_bytes = pickle.dumps(trainer.serving())
        figures = {"trainer_bytes": len(trainer_bytes), "serving_bytes": len(serving_bytes),
                   "offset": trainer.last_offset, "saved_at_ms": int(time.time() * 1000),
                   "load_ms": self.load_ms, **extra}
        pipe = self.client.pipeline(transaction=True)  # version, checkpoint and trainer move together
        pipe.set("model:trainer", trainer_bytes)
        pipe.set("model:serving", serving_bytes)
        pipe.set("model:version", trainer.version)
        report = trainer.report()
        figures["save_ms"] = round((time.perf_counter() - started) * 1000, 2)  # pickling; the write follows
        pipe.set("model:report", orjson.dumps(report | {"checkpoint": figures}))
        await pipe.execute()
        figures["save_ms_with_write"] = round((time.perf_counter() - started) * 1000, 2)
        return figures

    async def load_trainer(self) -> Trainer | None:
        """The saved trainer, or None when there is none or it is of an older model format."""
        raw = await self.client.get("model:trainer")
        started = time.perf_counter()
        trainer = pickle.loads(raw) if raw else None
        self.load_ms = round((time.perf_counter() - started) * 1000, 2) if raw else None
        if trainer is not None and _format(trainer) != MODEL_FORMAT:
            log.warning("model:trainer has format %s, not %s: starting a new model", _format(trainer), MODEL_FORMAT)
            return None
        return trainer

    async def version(self) -> int:
        return int(await self.client.get("model:version") or 0)

    async def load_serving(self) -> ServingModel | None:
        raw = await self.client.get("model:serving")
        serving = pickle.loads(raw) if raw else None
        return serving if serving is not None and _format(serving) == MODEL_FORMAT else None

    async def report(self) -> dict[str, Any] | None:
        raw = await self.client.get("model:report")
        return orjson.loads(raw) if raw else None


def _format(checkpoint: object) -> int:
    # The instance's own value: a checkpoint pickled before the field existed has none (format 1),
    # and must not pick up the class default.
    return vars(checkpoint).get("format", 1)
