"""Reports read from Redis: one lead (`leadstream lead`), the model (`leadstream model`), the funnel (`leadstream funnel`)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

import orjson
import redis.asyncio as aioredis

from models.features import features
from models.fields import public
from models.rules import load_rules
from streams.clients import redis_client
from streams.settings import Settings, redact_url
from streams.state import LeadStore, ModelStore
from streams.views import Views


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client for one report: opened, used, closed."""
    client = redis_client(settings)
    try:
        yield client
    finally:
        await client.aclose()


async def lead_view(settings: Settings, lead_id: str) -> dict | None:
    async with _redis(settings) as client:
        stored = await LeadStore(client).get(lead_id)
    if stored is None:
        return None
    rules = load_rules(settings.scoring_config.read_text())
    state = stored.pop("state")
    return stored | {
        "outcome": state.get("outcome"),
        "features_now": public(features(state, int(time.time() * 1000), half_life_s=rules.half_life_s), rules.fields),
        "counts": state["counts"], "fields": state["fields"],
    }


def print_lead(settings: Settings, lead_id: str) -> int:
    view = asyncio.run(lead_view(settings, lead_id))
    if view is None:
        print(f"leadstream: no lead {lead_id!r} in {redact_url(settings.redis_url)}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def model_report(settings: Settings) -> dict | None:
    async with _redis(settings) as client:
        return await ModelStore(client).report()


def print_model(settings: Settings) -> int:
    report = asyncio.run(model_report(settings))
    if report is None:
        print(f"leadstream: no model yet in {redact_url(settings.redis_url)}: it appears with the first closed deal", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def funnel(settings: Settings, stall_days: float) -> dict:
    """The funnel report from the read models (never a scan), with the model's learned win rate per stage."""
    async with _redis(settings) as client:
        report = await Views(client).funnel(now_ms=int(time.time() * 1000), stall_days=stall_days)
        model = await ModelStore(client).report()
    for stage, rates in (model or {}).get("stage_rates", {}).items():
        report["stages"][stage]["learned_win_rate"] = rates["win_rate"]
    return report


def print_funnel(settings: Settings, stall_days: float, as_json: bool) -> int:
    report = asyncio.run(funnel(settings, stall_days))
    if as_json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
        return 0
    print(f"{report['leads']} leads; closed: {report['closed']['won']} won, {report['closed']['lost']} lost "
          f"(win rate {report['win_rate']}); median days to close {report['median_days_to_close']}; "
          f"email reply rate {report['email_reply_rate']}; overdue activities {report['overdue_activities']}")
    print(f"{'stage':12} {'reached':>8} {'open':>6} {'stalled':>8} {'days in':>8} {'to next':>8} {'win rate':>9}  grades (open)")
    for stage, row in report["stages"].items():
        grades = " ".join(f"{g}:{n}" for g, n in row["grades"].items())
        print(f"{stage:12} {row['reached']:>8} {row['open']:>6} {row['stalled']:>8} "
              f"{_fmt(row['median_days_in_stage']):>8} {_fmt(row['conversion_to_next']):>8} "
              f"{_fmt(row.get('learned_win_rate')):>9}  {grades}")
    if report["bottleneck"]:
        print(f"lowest conversion: {report['bottleneck']} -> next stage")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
