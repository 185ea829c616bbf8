"""The read models' reads against the real Redis at a few thousand leads: the benchmark's populated
leads equal what the write path leaves, leaderboard pages equal a full sort (ties included), and
the funnel and team figures equal the exact ones computed from every lead's state."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from models.events import STAGES, topic_kind_of
from models.funnel import funnel_report
from models.offline.simulate import simulate
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer
from streams.bench import populate_leads
from streams.pipeline import EventPipeline, Message
from streams.state import SHARDS, LeadStore, view_key
from streams.views import EXACT_UP_TO, Views, dump_views, rebuild_views
from tests.conftest import redis_test_url

pytestmark = pytest.mark.integration
DAY = 86_400_000
RULES_TEXT = DEFAULT_CONFIG.read_text()
RULES = load_rules(RULES_TEXT)


async def states(client) -> list[dict[str, Any]]:
    return [s async for s in LeadStore(client).states()]


@pytest.fixture
async def populated(stack, redis_client):
    """4,000 leads copied from 150 simulated ones: many leads share a score, as ties do in real data."""
    settings = dataclasses.replace(stack, redis_url=redis_test_url(stack.redis_url))
    figures = await populate_leads(settings, 4000, RULES_TEXT, batch=300, templates=150)
    assert figures["leads"] == 4000
    return settings


async def test_populated_leads_are_what_the_write_path_leaves(populated, redis_client) -> None:
    stored = await states(redis_client)
    assert len(stored) == 4000 and len({s["lead_id"] for s in stored}) == 4000
    incremental = await dump_views(redis_client)
    assert any(k.endswith(":lb") for k in incremental) and any(k.endswith(":c") for k in incremental)
    await rebuild_views(redis_client, populated.rescore_every_s * 1000)  # from the lead hashes alone
    assert await dump_views(redis_client) == incremental
    async for key in redis_client.scan_iter(match="lead:*", count=1000):
        assert {b"v", b"s", b"ids", b"off"} <= set(await redis_client.hgetall(key))  # as the write script sets



@pytest.mark.parametrize("filters", [{}, {"stage": "qualified"}, {"owner": "Manager 03"}, {"hot": True},
                                     {"grade": "C"}, {"stage": "engaged", "owner": "Manager 01"}])
async def test_leaderboard_pages_equal_a_full_sort(populated, redis_client, filters: dict[str, Any]) -> None:
    def matches(s: dict[str, Any]) -> bool:
        return (not s.get("outcome") and "score" in s
                and all(s["fields"].get("owner") == v if k == "owner" else s.get(k) == v for k, v in filters.items()))

    expected = [s["lead_id"] for s in sorted((s for s in await states(redis_client) if matches(s)),
                                             key=lambda s: (s["score"], s["lead_id"]), reverse=True)]
    assert len(expected) > 6  # three pages at least
    views, got, cursor = Views(redis_client, RULES.grades), [], None
    for _ in range(1000):
        page, cursor = await views.leaderboard(limit=3, cursor=cursor, **filters)
        got += [row["lead_id"] for row in page]
        if cursor is None:
            break
    assert got == expected


async def test_funnel_and_team_equal_the_exact_figures_of_the_lead_states(redis_client) -> None:
    pipeline = EventPipeline(LeadStore(redis_client), Scorer(RULES), topic_kinds={"web": "web", "crm": "crm"},
                             max_event_bytes=65536)
    events = simulate(150, seed=5)
    last = max(e["ts"] for e in events)
    for lead in sorted({e["lead_id"] for e in events})[:40]:  # overdue work on leads open or not
        events.append({"event_id": f"{lead}-late", "lead_id": lead, "type": "activity_overdue", "ts": last + 1,
                       "props": {"activity_id": f"{lead}-call", "kind": "call", "due_ts": last}})
    events.sort(key=lambda e: e["ts"])
    msgs = [Message(topic_kind_of(e["type"]), 0, i, e["lead_id"].encode(), orjson.dumps(e))
            for i, e in enumerate(events)]
    for i in range(0, len(msgs), 400):
        await pipeline.handle_batch(msgs[i:i + 400])
        pipeline.acknowledged()
    now = max(e["ts"] for e in events) + 20 * DAY
    every = await states(redis_client)
    sizes = [await redis_client.zcard(view_key(shard, name)) for shard in range(SHARDS)
             for name in [f"st:{stage}" for stage in STAGES] + ["dtc"]]
    assert max(sizes) <= EXACT_UP_TO  # small shards: the medians are exact, not approximate

    got = await Views(redis_client).aggregates(now_ms=now, stall_days=14.0)
    exact = funnel_report(every, now_ms=now, stall_days=14.0)
    funnel = got["funnel"]
    for key in ("leads", "closed", "win_rate", "email_reply_rate", "bottleneck"):
        assert funnel[key] == exact[key], key
    # The views count the overdue activities of open leads only (a closed deal's are no work left).
    assert 0 < funnel["overdue_activities"] < exact["overdue_activities"]
    assert funnel["overdue_activities"] == sum(a[0] == "overdue" for s in every if not s.get("outcome")
                                               for a in s["activities"].values())
    assert funnel["median_days_to_close"] == pytest.approx(exact["median_days_to_close"], abs=0.051)
    assert sum(row["stalled"] for row in funnel["stages"].values()) > 0  # the check below sees stalls
    for stage in STAGES:
        mine, theirs = funnel["stages"][stage], exact["stages"][stage]
        for key in ("reached", "open", "stalled", "conversion_to_next", "grades"):
            assert mine[key] == theirs[key], (stage, key)
        if theirs["median_days_in_stage"] is None:
            assert mine["median_days_in_stage"] is None
        else:
            assert mine["median_days_in_stage"] == pytest.approx(theirs["median_days_in_stage"], abs=0.051)

    team = {row["owner"]: row for row in got["owners"]}
    owners = {s["fields"].get("owner") for s in every} - {None}
    assert set(team) == owners and len(owners) > 1
    for owner in owners:
        mine = [s for s in every if s["fields"].get("owner") == owner]
        open_ = [s for s in mine if not s.get("outcome")]
        assert team[owner]["open"] == len(open_)
        assert team[owner]["hot"] == sum(bool(s.get("hot")) for s in open_)
        assert team[owner]["overdue_activities"] == sum(a[0] == "overdue" for s in open_ for a in s["activities"].values())
        assert team[owner]["stalled"] == sum(s["stage"] is not None and s["stage_ts"] < now - 14 * DAY for s in open_)
        assert (team[owner]["won"], team[owner]["lost"]) == (sum(s.get("outcome") == "won" for s in mine),
                                                             sum(s.get("outcome") == "lost" for s in mine))

