"""Funnel diagnostics for department heads: where leads stall, reply rates, speed and conversion.

Pure: takes lead states (as stored in Redis) and returns a report.

>>> from models.features import new_state
>>> a = new_state("a") | {"stage": "proposal", "stage_ts": 0, "stages_visited": ["new", "proposal"], "grade": "A"}
>>> b = new_state("b") | {"stage": "new", "stage_ts": 0, "stages_visited": ["new"], "outcome": "lost", "closed_ts": 5}
>>> report = funnel_report([a, b], now_ms=30 * 86_400_000, stall_days=14)
>>> report["stages"]["proposal"]["open"], report["stages"]["proposal"]["stalled"], report["closed"]
(1, 1, {'won': 0, 'lost': 1})
>>> report["stages"]["new"]["reached"], report["stages"]["new"]["conversion_to_next"]
(2, 0.5)
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

from models.events import STAGES
from models.features import State

DAY_MS = 86_400_000


def funnel_report(states: Iterable[State], now_ms: int, stall_days: float = 14.0) -> dict[str, Any]:
    """Per stage: leads that reached it, open leads in it, how many stall (no stage move for
    ``stall_days``), median days in stage, conversion to the next stage, grade mix; overall:
    email reply rate, overdue activities, won/lost counts and median days to close."""
    reached: Counter[str] = Counter()
    advanced: Counter[str] = Counter()
    open_in: dict[str, list[float]] = {s: [] for s in STAGES}
    grades: dict[str, Counter[str]] = {s: Counter() for s in STAGES}
    closed: Counter[str] = Counter()
    days_to_close: list[float] = []
    opens = replies = overdue = n_leads = 0
    for st in states:
        n_leads += 1
        visited = [STAGES.index(s) for s in st.get("stages_visited", []) if s in STAGES]
        for i in visited:
            reached[STAGES[i]] += 1
            advanced[STAGES[i]] += any(j > i for j in visited)  # skipping stages still counts as moving on
        opens += st["counts"].get("email_open", 0)
        replies += st["counts"].get("email_replied", 0)
        overdue += sum(1 for a in st.get("activities", {}).values() if a[0] == "overdue")
        if st.get("outcome"):
            closed[st["outcome"]] += 1
            start = st["created_ts"] if st.get("created_ts") is not None else st.get("first_ts")
            if start is not None and st.get("closed_ts") is not None:
                days_to_close.append((st["closed_ts"] - start) / DAY_MS)
        elif st.get("stage") in open_in:
            open_in[st["stage"]].append((now_ms - st["stage_ts"]) / DAY_MS)
            grades[st["stage"]][st.get("grade", "?")] += 1
    stages = {}
    for i, stage in enumerate(STAGES):
        days = open_in[stage]
        last = i + 1 == len(STAGES)
        stages[stage] = {
            "reached": reached[stage],
            "open": len(days),
            "stalled": sum(1 for d in days if d > stall_days),
            "median_days_in_stage": round(statistics.median(days), 1) if days else None,
            "conversion_to_next": round(advanced[stage] / reached[stage], 3) if reached[stage] and not last else None,
            "grades": dict(sorted(grades[stage].items())),
        }
    return {
        "leads": n_leads,
        "stall_days": stall_days,
        "stages": stages,
        "closed": {"won": closed["won"], "lost": closed["lost"]},
        "win_rate": round(closed["won"] / sum(closed.values()), 3) if closed else None,
        "median_days_to_close": round(statistics.median(days_to_close), 1) if days_to_close else None,
        "email_reply_rate": round(replies / opens, 3) if opens else None,
        "overdue_activities": overdue,
        "bottleneck": _bottleneck(stages),
    }


def _bottleneck(stages: dict[str, dict[str, Any]]) -> str | None:
    """The stage with the lowest conversion to the next one (among stages at least 5 leads reached)."""
    rates = {s: v["conversion_to_next"] for s, v in stages.items()
             if v["conversion_to_next"] is not None and v["reached"] >= 5}
    return min(rates, key=rates.__getitem__) if rates else None
