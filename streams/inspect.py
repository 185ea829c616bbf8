"""``leadstream lead LEAD_ID``: a lead's state, score, grade and reasons, read from Redis."""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
import redis.asyncio as aioredis

from models.features import features
from models.rules import load_rules
from streams.settings import Settings
from streams.state import LeadStore, ModelStore


async def lead_view(settings: Settings, lead_id: str) -> dict | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        stored = await LeadStore(client, settings.dedupe_ttl_s).get(lead_id)
    finally:
        await client.aclose()
    if stored is None:
        return None
    rules = load_rules(settings.scoring_config.read_text())
    state = stored["state"]
    return {
        "lead_id": lead_id,
        "score": float(stored["score"]), "grade": stored["grade"], "source": stored["source"],
        "stage": stored["stage"] or None, "reasons": state.get("reasons", []),
        "hot": state.get("hot", False), "outcome": state.get("outcome"),
        "features_now": features(state, int(time.time() * 1000), half_life_s=rules.half_life_s),
        "counts": state["counts"], "fields": state["fields"],
        "stage_snapshots": stored["stage_snapshots"], "version": int(stored["v"]),
    }


def print_lead(settings: Settings, lead_id: str) -> int:
    view = asyncio.run(lead_view(settings, lead_id))
    if view is None:
        print(f"leadstream: no lead {lead_id!r} in {settings.redis_url}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def model_report(settings: Settings) -> dict | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await ModelStore(client).report()
    finally:
        await client.aclose()


def print_model(settings: Settings) -> int:
    report = asyncio.run(model_report(settings))
    if report is None:
        print(f"leadstream: no model yet in {settings.redis_url}: it appears with the first closed deal", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
