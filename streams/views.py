"""Reads of the read models (leaderboards, funnel, owners, success curve), and their rebuild.

Every read is a pipelined round trip over the :data:`~streams.state.SHARDS` shards, each command
O(log N + page) or O(counters), never a scan of the leads. What is not exact is said so:
medians (days in stage, days to close) combine each shard's quantiles (9 per shard), so they are
approximate when the shards disagree.

``rebuild_views`` recomputes every view from the lead hashes (SCAN: a repair tool, not a read
path): after a bug, a restore, or a change of the rescoring cadence.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis

from models.events import STAGES
from models.grading import GRADE_NAMES, Grades
from models.readmodel import DAY_MS, contributions, diff
from streams.state import SHARDS, LeadRecord, LeadStore, LeadWrite, lead_view, shard_of, view_key

MAX_PAGE = 500
QUANTILES = 4  # per shard (5 points), for the approximate medians


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
            leads = await LeadStore(self.client).load_many([lead for lead, _ in candidates])
            for lead, score in candidates:
                after = (score, lead)
                view = _lead_row(leads[lead])
                if view is not None and _matches(view, stage, owner, hot):
                    page.append(view)
                    if len(page) == limit:
                        break
        return page, (f"{after[0]!r}|{after[1]}" if after and len(page) == limit else None)

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
        """The next ``limit`` members below ``after`` across the shards, in ranking order."""
        if after and after[0] < high:
            top_arg: Any = after[0]  # inclusive: ties with the cursor are filtered below
        else:
            top_arg = "+inf" if high == float("inf") else f"({high}"
        low_arg = "-inf" if low == float("-inf") else low
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrevrangebyscore(view_key(shard, name), top_arg, low_arg, start=0, num=limit + 8, withscores=True)
        merged = [(m.decode(), s) for rows in await pipe.execute() for m, s in rows]
        if after:
            merged = [(m, s) for m, s in merged if (s, m) < after]
        merged = [(m, s) for m, s in merged if s < high]
        merged.sort(key=lambda ms: (ms[1], ms[0]), reverse=True)
        return merged[:limit]

    # ---- funnel, owners, success curve ----------------------------------------------------------

    async def counters(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.hgetall(view_key(shard, "c"))
        total: dict[str, int] = defaultdict(int)
        for counters in await pipe.execute():
            for name, n in counters.items():
                total[name.decode()] += int(n)
        return dict(total)

    async def funnel(self, *, now_ms: int, stall_days: float = 14.0, owner: str | None = None) -> dict[str, Any]:
        """The funnel report (the shape of :func:`models.funnel.funnel_report`) plus ``grade_mix``."""
        c = await self.counters()
        stall_before = now_ms - stall_days * DAY_MS
        names = [f"st:{stage}" for stage in STAGES] + ["dtc"]
        samples = await self._quantiles(names)
        pipe = self.client.pipeline(transaction=False)
        for stage in STAGES:
            for shard in range(SHARDS):
                pipe.zcount(view_key(shard, f"st:{stage}"), "-inf", f"({stall_before}")
        stalled = await pipe.execute()
        stages: dict[str, Any] = {}
        for i, stage in enumerate(STAGES):
            reached, advanced = c.get(f"reached:{stage}", 0), c.get(f"adv:{stage}", 0)
            entered = _median(samples[f"st:{stage}"])
            stages[stage] = {
                "reached": reached, "open": c.get(f"open:{stage}", 0),
                "stalled": sum(stalled[i * SHARDS:(i + 1) * SHARDS]),
                "median_days_in_stage": round((now_ms - entered) / DAY_MS, 1) if entered is not None else None,
                "conversion_to_next": round(advanced / reached, 3) if reached and i + 1 < len(STAGES) else None,
                "grades": {g: c[f"sg:{stage}:{g}"] for g in GRADE_NAMES if c.get(f"sg:{stage}:{g}")},
            }
        won, lost = c.get("closed:won", 0), c.get("closed:lost", 0)
        to_close = _median(samples["dtc"])
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

    async def owners(self, *, now_ms: int, stall_days: float = 14.0) -> list[dict[str, Any]]:
        c = await self.counters()
        names = sorted({k.split(":", 1)[1].rsplit(":", 1)[0] for k in c if k.startswith("o:")})
        stall_before = now_ms - stall_days * DAY_MS
        pipe = self.client.pipeline(transaction=False)
        for owner in names:
            for shard in range(SHARDS):
                pipe.zcount(view_key(shard, f"sto:{owner}"), "-inf", f"({stall_before}")
        stalled = await pipe.execute()
        rows = []
        for i, owner in enumerate(names):
            won, lost = c.get(f"o:{owner}:won", 0), c.get(f"o:{owner}:lost", 0)
            rows.append({"owner": owner, "open": c.get(f"o:{owner}:open", 0), "hot": c.get(f"o:{owner}:hot", 0),
                         "stalled": sum(stalled[i * SHARDS:(i + 1) * SHARDS]),
                         "overdue_activities": c.get(f"o:{owner}:overdue", 0), "won": won, "lost": lost,
                         "win_rate": round(won / (won + lost), 3) if won + lost else None})
        return sorted(rows, key=lambda r: (-r["open"], r["owner"]))

    async def success_curve(self) -> dict[str, Any]:
        """Actual win rate per grade and per score decile, by what the lead had just before its outcome."""
        c = await self.counters()

        def row(prefix: str) -> dict[str, Any]:
            won, lost = c.get(f"{prefix}:won", 0), c.get(f"{prefix}:lost", 0)
            return {"won": won, "lost": lost, "win_rate": round(won / (won + lost), 3) if won + lost else None}

        return {"by_grade": {g: row(f"cg:{g}") for g in GRADE_NAMES},
                "by_decile": [{"decile": d, **row(f"cd:{d}")} for d in range(10)]}

    async def _quantiles(self, names: list[str]) -> dict[str, list[float]]:
        """Per sorted set: each shard's quantiles of its scores, repeated by the shard's size (two trips)."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for shard in range(SHARDS):
                pipe.zcard(view_key(shard, name))
        sizes = await pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        asked: list[tuple[str, int]] = []
        for i, name in enumerate(names):
            for shard in range(SHARDS):
                n = sizes[i * SHARDS + shard]
                for q in range(QUANTILES + 1) if n else ():
                    rank = (n - 1) * q // QUANTILES
                    pipe.zrange(view_key(shard, name), rank, rank, withscores=True)
                    asked.append((name, n))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for (name, n), rows in zip(asked, await pipe.execute()):
            if rows:
                samples[name] += [rows[0][1]] * max(1, n // (QUANTILES + 1))
        return samples


def _median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


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

