"""Reads of the read models (leaderboards, funnel, owners, success curve), and their rebuild.

Every read is a pipelined round trip (two for the aggregates) over the :data:`~streams.state.SHARDS`
shards, each command O(log N + page) or O(counters), never a scan of the leads: a few dozen to
about a hundred commands per read whatever the number of leads. What is not exact is said so:
medians (days in stage, days to close) are the median of the shards' medians, weighted by their
sizes; exact while every shard holds at most :data:`EXACT_UP_TO` members of the set, approximate
beyond (the shards are random samples of the whole, so close).

``rebuild_views`` recomputes every view from the lead hashes (SCAN: a repair tool, not a read
path): after a bug, a restore, or a change of the rescoring cadence.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from models.events import STAGES
from models.grading import GRADE_NAMES, Grades
from models.readmodel import DAY_MS, contributions, diff
from streams.state import SHARDS, LeadRecord, LeadStore, LeadWrite, lead_key, lead_view, shard_of, view_key

MAX_PAGE = 500
QUANTILES = 1  # points per shard (the midpoints of equal parts of its ranks) for the medians: its median
EXACT_UP_TO = 9  # a shard with at most this many members sends them all: medians are exact while all are small


# KEYS: the sets to count, then the sets to sample. ARGV: the stall bound (exclusive, '(TS'), how
# many sets to count, and the ranks to read as one string: per sampled set "n r1 .. rn". Returns the
# counts, then each asked rank's score (nil past the end). Reads only.
_READ = """
local out = {}
local counted = tonumber(ARGV[2])
for i = 1, counted do out[i] = redis.call('ZCOUNT', KEYS[i], '-inf', ARGV[1]) end
local numbers = {}
for x in string.gmatch(ARGV[3], '%d+') do numbers[#numbers + 1] = x end
local a = 1
for i = counted + 1, #KEYS do
  local n = tonumber(numbers[a])
  for j = 1, n do
    local row = redis.call('ZRANGE', KEYS[i], numbers[a + j], numbers[a + j], 'WITHSCORES')
    out[#out + 1] = row[2] or false
  end
  a = a + n + 1
end
return out
"""
_READ_SHA = hashlib.sha1(_READ.encode()).hexdigest()


class Views:
    def __init__(self, client: aioredis.Redis, grades: Grades | None = None) -> None:
        self.client = client
        self.grades = grades

    # ---- ranked open leads --------------------------------------------------------------------

    async def leaderboard(self, *, stage: str | None = None, grade: str | None = None, owner: str | None = None,
                          hot: bool | None = None, limit: int = 50, cursor: str | None = None
                          ) -> tuple[list[dict[str, Any]], str | None]:
        """Open leads ranked by score (desc, then lead id desc); returns (page, next_cursor).

        The most selective index answers (owner, else stage, else hot, else all open leads); other
        filters are applied to the candidates, reading at most a bounded number of them."""
        limit = max(1, min(limit, MAX_PAGE))
        name = f"lbo:{owner}" if owner else f"lb:{stage}" if stage else "hot" if hot else "lb"
        low, high = self._grade_range(grade)
        after = _parse_cursor(cursor)
        page: list[dict[str, Any]] = []
        scanned = 0
        while len(page) < limit and scanned < 20 * MAX_PAGE:
            candidates = await self._ranked(name, after, high, low, limit)
            if not candidates:
                return page, None
            scanned += len(candidates)
            leads = await self._states([lead for lead, _ in candidates])
            for lead, score in candidates:
                after = (score, lead)
                view = _lead_row(LeadRecord(lead, state_raw=leads[lead]))
                if view is not None and _matches(view, stage, owner, hot):
                    page.append(view)
                    if len(page) == limit:
                        break
        return page, (f"{after[0]!r}|{after[1]}" if after and len(page) == limit else None)

    async def _states(self, lead_ids: list[str]) -> dict[str, bytes | None]:
        """Each lead's state JSON alone: a row needs neither its event digests nor its stage snapshots."""
        pipe = self.client.pipeline(transaction=False)
        for lead_id in lead_ids:
            pipe.hget(lead_key(lead_id), "s")
        return dict(zip(lead_ids, await pipe.execute()))

    def _grade_range(self, grade: str | None) -> tuple[float, float]:
        if grade is None or self.grades is None:
            return float("-inf"), float("inf")
        bands = dict(self.grades.bands)
        if grade not in GRADE_NAMES:
            raise ValueError(f"grade {grade!r}: expected one of {', '.join(GRADE_NAMES)}")
        names = list(GRADE_NAMES)
        low = bands.get(grade, float("-inf"))
        better = names[names.index(grade) - 1] if names.index(grade) > 0 else None
        high = bands[better] if better else float("inf")
        return low, high

    async def _ranked(self, name: str, after: tuple[float, str] | None, high: float, low: float,
                      limit: int) -> list[tuple[str, float]]:
        """The next ``limit`` members below ``after`` across the shards, in ranking order.

        Each shard first sends a few members (a shard holds about 1/32 of the best ones); a shard
        whose last member sent still ranks among the best ``limit`` may hold more of them and is
        asked again, further on, until it is not (or is exhausted). Members tied with the cursor's
        score that come before it are skipped over the same way, however many they are."""
        if after and after[0] < high:
            top_arg: Any = after[0]  # inclusive: ties with the cursor are filtered below
        else:
            top_arg = "+inf" if high == float("inf") else f"({high}"
        low_arg = "-inf" if low == float("-inf") else low
        kept: list[tuple[float, str]] = []
        offsets = dict.fromkeys(range(SHARDS), 0)
        pending, num = list(range(SHARDS)), max(4, 2 * limit // SHARDS + 2)
        while pending:
            pipe = self.client.pipeline(transaction=False)
            for shard in pending:
                pipe.zrevrangebyscore(view_key(shard, name), top_arg, low_arg, start=offsets[shard], num=num,
                                      withscores=True)
            last: dict[int, tuple[float, str]] = {}
            for shard, rows in zip(pending, await pipe.execute()):
                offsets[shard] += len(rows)
                fetched = [(s, m.decode()) for m, s in rows]
                kept += [sm for sm in fetched if (after is None or sm < after) and sm[0] < high]
                if len(rows) == num:  # the shard may hold more
                    last[shard] = fetched[-1]
            kept.sort(reverse=True)
            kth = kept[limit - 1] if len(kept) >= limit else None
            pending = [shard for shard, sm in last.items() if kth is None or sm >= kth]
            num = limit + 8
        return [(m, s) for s, m in kept[:limit]]

    # ---- funnel, owners, success curve ----------------------------------------------------------

    async def counters(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.hgetall(view_key(shard, "c"))
        return _sum(await pipe.execute())

    async def aggregates(self, *, now_ms: int, stall_days: float = 14.0, funnel: bool = True,
                         owners: bool = True) -> dict[str, Any]:
        """The funnel, the team (per owner) and the success curve from one reading of the views, in two
        pipelined round trips of 2 and 1 commands per shard: the counters (and the size of ``dtc``),
        then one read-only script per shard that counts its stalled leads per stage and per owner and
        reads the few ranks the medians need (:func:`_ranks`). Per-command client work, not Redis's,
        is what a reading of hundreds of small commands costs; a script per shard stays on one hash
        tag, so it runs on one Redis Cluster slot like the writes."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.hgetall(view_key(shard, "c"))
            pipe.zcard(view_key(shard, "dtc"))
        first = await pipe.execute()
        c = _sum(first[0::2])
        names = sorted({k.split(":", 1)[1].rsplit(":", 1)[0] for k in c if k.startswith("o:")}) if owners else []
        counted = ([f"st:{stage}" for stage in STAGES] if funnel else []) + [f"sto:{owner}" for owner in names]
        # A set's size is known without asking: an open lead with a stage is in st:STAGE exactly
        # when it counts in open:STAGE (models.readmodel._open); dtc's came with the counters.
        sampled = [f"st:{stage}" for stage in STAGES] + ["dtc"] if funnel else []
        open_in = [f"open:{stage}".encode() for stage in STAGES]
        sizes = [[int(h.get(k, 0)) for k in open_in] + [dtc] for h, dtc in zip(first[0::2], first[1::2])]
        calls = []
        for shard in range(SHARDS):
            ranks = [_ranks(n) for n in sizes[shard]] if funnel else []
            keys = [view_key(shard, name) for name in counted + sampled]
            # the ranks travel as one argument, "n r1 .. rn" per sampled set: fewer arguments to pack
            wanted = " ".join(f"{len(r)} {' '.join(map(str, r))}" if r else "0" for r in ranks)
            calls.append((keys, [f"({now_ms - stall_days * DAY_MS}", len(counted), wanted], ranks))
        replies = await self._run_read_script(calls)
        stalled: dict[str, int] = defaultdict(int)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sampled}
        for shard, ((_, _, ranks), reply) in enumerate(zip(calls, replies)):
            for name, n in zip(counted, reply):
                stalled[name] += n
            scores = iter(reply[len(counted):])
            for name, n, shard_ranks in zip(sampled, sizes[shard], ranks):
                weight = n / len(shard_ranks) if shard_ranks else 0.0
                samples[name] += [(float(s), weight) for s in (next(scores) for _ in shard_ranks) if s is not None]
        medians = {name: _weighted_median(points) for name, points in samples.items()}
        out: dict[str, Any] = {"counters": c, "success_curve": _success_curve(c)}
        if funnel:
            out["funnel"] = _funnel(c, [stalled[f"st:{stage}"] for stage in STAGES], medians, now_ms, stall_days)
        if owners:
            out["owners"] = _owners(c, names, [stalled[f"sto:{owner}"] for owner in names])
        return out

    async def _run_read_script(self, calls: list[tuple[list[str], list[Any], Any]]) -> list[list[Any]]:
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args, _ in calls:
                pipe.evalsha(_READ_SHA, len(keys), *keys, *args)
            try:
                return await pipe.execute()
            except NoScriptError:  # first use, or Redis restarted: nothing ran; load it and read again
                await self.client.script_load(_READ)
        raise RuntimeError("the views' read script could not be loaded into Redis")

    async def funnel(self, *, now_ms: int, stall_days: float = 14.0, owner: str | None = None) -> dict[str, Any]:
        """The funnel report (the shape of :func:`models.funnel.funnel_report`) plus ``grade_mix``."""
        return (await self.aggregates(now_ms=now_ms, stall_days=stall_days, owners=False))["funnel"]

    async def owners(self, *, now_ms: int, stall_days: float = 14.0) -> list[dict[str, Any]]:
        return (await self.aggregates(now_ms=now_ms, stall_days=stall_days, funnel=False))["owners"]

    async def success_curve(self) -> dict[str, Any]:
        """Actual win rate per grade and per score decile, by what the lead had just before its outcome."""
        return _success_curve(await self.counters())


def _sum(shards: list[dict[bytes, bytes]]) -> dict[str, int]:
    """The shards' counters added up (names decoded once, not once per shard)."""
    total: dict[bytes, int] = defaultdict(int)
    for counters in shards:
        for name, n in counters.items():
            total[name] += int(n)
    return {name.decode(): n for name, n in total.items()}


def _funnel(c: dict[str, int], stalled: list[int], medians: dict[str, float | None], now_ms: int,
            stall_days: float) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for i, stage in enumerate(STAGES):
        reached, advanced = c.get(f"reached:{stage}", 0), c.get(f"adv:{stage}", 0)
        entered = medians[f"st:{stage}"]
        stages[stage] = {
            "reached": reached, "open": c.get(f"open:{stage}", 0), "stalled": stalled[i],
            "median_days_in_stage": round((now_ms - entered) / DAY_MS, 1) if entered is not None else None,
            "conversion_to_next": round(advanced / reached, 3) if reached and i + 1 < len(STAGES) else None,
            "grades": {g: c[f"sg:{stage}:{g}"] for g in GRADE_NAMES if c.get(f"sg:{stage}:{g}")},
        }
    won, lost = c.get("closed:won", 0), c.get("closed:lost", 0)
    to_close = medians["dtc"]
    return {
        "leads": c.get("leads", 0), "stall_days": stall_days, "stages": stages,
        "closed": {"won": won, "lost": lost},
        "win_rate": round(won / (won + lost), 3) if won + lost else None,
        "median_days_to_close": round(to_close, 1) if to_close is not None else None,
        "email_reply_rate": round(c.get("replies", 0) / c["opens"], 3) if c.get("opens") else None,
        "overdue_activities": c.get("overdue", 0),
        "bottleneck": _bottleneck(stages),
        "grade_mix": {g: c.get(f"grade:{g}", 0) for g in GRADE_NAMES},
        "open": c.get("open", 0),
        "approximate": ["median_days_in_stage", "median_days_to_close"],
    }


def _owners(c: dict[str, int], names: list[str], stalled: list[int]) -> list[dict[str, Any]]:
    rows = []
    for owner, n_stalled in zip(names, stalled):
        won, lost = c.get(f"o:{owner}:won", 0), c.get(f"o:{owner}:lost", 0)
        rows.append({"owner": owner, "open": c.get(f"o:{owner}:open", 0), "hot": c.get(f"o:{owner}:hot", 0),
                     "stalled": n_stalled, "overdue_activities": c.get(f"o:{owner}:overdue", 0),
                     "won": won, "lost": lost, "win_rate": round(won / (won + lost), 3) if won + lost else None})
    return sorted(rows, key=lambda r: (-r["open"], r["owner"]))


def _success_curve(c: dict[str, int]) -> dict[str, Any]:
    def row(prefix: str) -> dict[str, Any]:
        won, lost = c.get(f"{prefix}:won", 0), c.get(f"{prefix}:lost", 0)
        return {"won": won, "lost": lost, "win_rate": round(won / (won + lost), 3) if won + lost else None}

    return {"by_grade": {g: row(f"cg:{g}") for g in GRADE_NAMES},
            "by_decile": [{"decile": d, **row(f"cd:{d}")} for d in range(10)]}


def _ranks(n: int) -> list[int]:
    """The ranks a shard holding ``n`` members of a sorted set reads for a median.

    At most :data:`EXACT_UP_TO` members: all of them (each weighs 1, so medians are exact while every
    shard is that small); more: the midpoints of :data:`QUANTILES` equal parts of its ranks (one
    part: the shard's median), each weighing a part. Shards split leads by a hash of their id, so
    each is a random sample of the whole: the median of the shards' medians, weighted by their
    sizes, is close to the whole's, and costs one read per shard whatever the number of leads.

    >>> _ranks(0), _ranks(3), _ranks(300)
    ([], [0, 1, 2], [150])
    """
    if n <= EXACT_UP_TO:
        return list(range(n))
    return [(n * (2 * part + 1)) // (2 * QUANTILES) for part in range(QUANTILES)]


def _weighted_median(points: list[tuple[float, float]]) -> float | None:
    """The median of values with weights (with weights 1: ``statistics.median``).

    >>> _weighted_median([(3, 1), (1, 1), (2, 1), (10, 1)]), _weighted_median([(1, 5), (2, 1), (9, 1)])
    (2.5, 1)
    """
    if not points:
        return None
    points = sorted(points)
    half, acc = sum(w for _, w in points) / 2, 0.0
    for i, (value, weight) in enumerate(points):
        acc += weight
        if acc > half:
            return value
        if acc == half and i + 1 < len(points):
            return (value + points[i + 1][0]) / 2
    return points[-1][0]


def _bottleneck(stages: dict[str, dict[str, Any]]) -> str | None:
    rates = {s: v["conversion_to_next"] for s, v in stages.items()
             if v["conversion_to_next"] is not None and v["reached"] >= 5}
    return min(rates, key=rates.__getitem__) if rates else None


def _parse_cursor(cursor: str | None) -> tuple[float, str] | None:
    if not cursor:
        return None
    score, sep, lead = cursor.partition("|")
    try:
        return float(score), lead
    except ValueError:
        raise ValueError(f"cursor {cursor!r}: expected the next_cursor of an earlier page") from None


def _lead_row(record: LeadRecord) -> dict[str, Any] | None:
    if record.state is None:
        return None
    view = lead_view(record)
    state = view.pop("state")
    owner = state["fields"].get("owner")
    return {"lead_id": record.lead_id, "score": view["score"], "grade": view["grade"], "stage": view["stage"],
            "owner": owner, "hot": view["hot"], "source": view["source"], "model_version": view["model_version"],
            "reasons": view["reasons"], "updated_at": view["updated_at"]}


def _matches(row: dict[str, Any], stage: str | None, owner: str | None, hot: bool | None) -> bool:
    return ((stage is None or (row["stage"] or "none") == stage) and (owner is None or row["owner"] == owner)
            and (hot is None or row["hot"] == hot))


async def rebuild_views(client: aioredis.Redis, rescore_every_ms: int) -> dict[str, int]:
    """Recompute every view from the lead hashes: delete the views, then add each lead's contributions."""
    deleted = 0
    async for key in client.scan_iter(match="view:{*}:*", count=1000):
        deleted += await client.unlink(key)
    store = LeadStore(client)
    leads = 0
    batch: list[LeadWrite] = []
    async for key in client.scan_iter(match="lead:{*}:*", count=1000, _type="HASH"):
        lead_id = key.decode().split(":", 2)[2]
        record = (await store.load_many([lead_id]))[lead_id]
        if record.state is None:
            continue
        changes = diff(({}, {}), contributions(record.state, rescore_every_ms=rescore_every_ms))
        batch.append(_views_only(record, changes))
        leads += 1
        if len(batch) >= 500:
            await _write_views(client, batch)
            batch = []
    await _write_views(client, batch)
    return {"leads": leads, "view_keys_deleted": deleted, "shards": SHARDS}


def _views_only(record: LeadRecord, changes: Any) -> LeadWrite:
    return LeadWrite(record, None, b"", {}, [], {}, None, changes)


async def _write_views(client: aioredis.Redis, writes: list[LeadWrite]) -> None:
    """Apply the view changes alone (no lead content) in one pipeline of per-shard commands."""
    if not writes:
        return
    pipe = client.pipeline(transaction=False)
    for w in writes:
        shard, member = shard_of(w.record.lead_id), w.record.lead_id
        for name, score in w.views.set_adds.items():
            pipe.zadd(view_key(shard, name), {member: score})
        for name, delta in w.views.counters.items():
            pipe.hincrby(view_key(shard, "c"), name, delta)
    await pipe.execute()


async def dump_views(client: aioredis.Redis) -> dict[str, Any]:
    """Every view's content (for tests comparing incremental and rebuilt views)."""
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match="view:{*}:*", count=1000):
        name = key.decode()
        kind = (await client.type(key)).decode()
        if kind == "hash":
            out[name] = {k.decode(): int(v) for k, v in (await client.hgetall(key)).items() if int(v)}
        else:
            out[name] = {m.decode(): s for m, s in await client.zrange(key, 0, -1, withscores=True)}
    return {k: v for k, v in out.items() if v}

