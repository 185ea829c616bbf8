"""INTERIM read models by scanning every lead: the ``streams.views.Views`` interface, used by
``leadstream api`` only until ``streams/views.py`` (per-shard sorted sets, never a scan) is in.

Fine for a demo of a few thousand leads; delete this module once ``streams.views`` exists.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from typing import Any

import orjson
import redis.asyncio as aioredis

from models.funnel import DAY_MS, funnel_report
from streams.state import LeadStore

DECILES = 10


class ScanViews:
    """Same methods and shapes as ``streams.views.Views`` (see docs/api.md)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.store = LeadStore(client, dedupe_ttl_s=1)

    async def _leads(self) -> list[dict[str, Any]]:
        keys = [k async for k in self.client.scan_iter(match="lead:{*}", count=500, _type="HASH")]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "state", "score", "grade", "stage", "source", "updated_at")
        out = []
        for state, score, grade, stage, source, updated in await pipe.execute():
            if not state:
                continue
            st = orjson.loads(state)
            out.append(st | {"score": float(score or 0), "grade": (grade or b"?").decode(),
                             "source": (source or b"").decode(), "updated_at": int(updated or 0),
                             "owner": st.get("fields", {}).get("owner")})
        return out

    async def leaderboard(self, *, stage: str | None = None, grade: str | None = None, owner: str | None = None,
                          hot: bool | None = None, limit: int = 50, cursor: str | None = None
                          ) -> tuple[list[dict], str | None]:
        rows = [st for st in await self._leads() if not st.get("outcome")
                and (stage is None or st.get("stage") == stage) and (grade is None or st["grade"] == grade)
                and (owner is None or st["owner"] == owner) and (hot is None or bool(st.get("hot")) == hot)]
        rows.sort(key=lambda st: (-st["score"], st["lead_id"]))
        start = int(base64.urlsafe_b64decode(cursor.encode()).decode()) if cursor else 0
        page = rows[start:start + limit]
        more = start + limit < len(rows)
        return ([{"lead_id": st["lead_id"], "score": st["score"], "grade": st["grade"], "stage": st.get("stage"),
                  "owner": st["owner"], "hot": bool(st.get("hot")), "source": st["source"],
                  "model_version": st.get("model_version", 0), "reasons": st.get("reasons", []),
                  "updated_at": st["updated_at"]} for st in page],
                base64.urlsafe_b64encode(str(start + limit).encode()).decode() if more else None)

    async def funnel(self, *, now_ms: int, stall_days: float = 14.0, owner: str | None = None) -> dict:
        leads = [st for st in await self._leads() if owner is None or st["owner"] == owner]
        report = funnel_report(leads, now_ms, stall_days)
        report["grade_mix"] = dict(Counter(st["grade"] for st in leads if not st.get("outcome")))
        return report

    async def owners(self, *, now_ms: int, stall_days: float = 14.0) -> list[dict]:
        rows: dict[str, Counter[str]] = {}
        for st in await self._leads():
            if not st["owner"]:
                continue
            c = rows.setdefault(st["owner"], Counter())
            if st.get("outcome"):
                c[st["outcome"]] += 1
                continue
            c["open"] += 1
            c["hot"] += bool(st.get("hot"))
            c["stalled"] += st.get("stage_ts") is not None and (now_ms - st["stage_ts"]) / DAY_MS > stall_days
            c["overdue_activities"] += sum(1 for a in st.get("activities", {}).values() if a[0] == "overdue")
        out = [{"owner": o, "open": c["open"], "hot": c["hot"], "stalled": c["stalled"],
                "overdue_activities": c["overdue_activities"], "won": c["won"], "lost": c["lost"],
                "win_rate": round(c["won"] / (c["won"] + c["lost"]), 3) if c["won"] + c["lost"] else None}
               for o, c in rows.items()]
        return sorted(out, key=lambda r: (-r["open"], r["owner"]))

    async def success_curve(self) -> dict:
        # The interim uses the lead's last stored grade/score (the one at its outcome event).
        by_grade: dict[str, Counter[str]] = {}
        by_decile = [Counter() for _ in range(DECILES)]
        for st in await self._leads():
            if st.get("outcome") in ("won", "lost"):
                by_grade.setdefault(st["grade"], Counter())[st["outcome"]] += 1
                by_decile[min(DECILES - 1, int(st["score"] * DECILES))][st["outcome"]] += 1
        return {"by_grade": {g: _rate(c) for g, c in by_grade.items()},
                "by_decile": [{"decile": d, **_rate(c)} for d, c in enumerate(by_decile)]}


def _rate(c: Counter[str]) -> dict[str, Any]:
    n = c["won"] + c["lost"]
    return {"won": c["won"], "lost": c["lost"], "win_rate": round(c["won"] / n, 3) if n else None}


def now_ms() -> int:
    return int(time.time() * 1000)
