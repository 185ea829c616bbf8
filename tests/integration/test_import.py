"""A history import and a simulation published through the real broker with ``publish_events``."""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from models.offline.history import load_mapping, rows_to_events
from models.offline.simulate import simulate
from streams.offline import read_rows
from streams.publish import publish_events
from streams.settings import Settings

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _own_topics(settings: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:12]
    return dataclasses.replace(settings, topic_web=f"test-web-{suffix}", topic_crm=f"test-crm-{suffix}")


async def _delete(kafka_admin, settings: Settings) -> None:
    await kafka_admin.delete_topics([settings.topic_web, settings.topic_crm])


async def test_import_publishes_every_good_row(stack: Settings, kafka_admin, consume) -> None:
    settings = _own_topics(stack)
    mapping = load_mapping((FIXTURES / "history-small.toml").read_text())
    results = list(rows_to_events(read_rows(FIXTURES / "history-small.csv"), mapping))
    good = [r for r in results if not r.error]
    events = [e for r in good for e in r.events]
    try:
        counts = await publish_events(settings, events, progress=None)
        assert counts == Counter(e["type"] for e in events)
        web = await consume(settings.topic_web, counts["visit"])
        crm = await consume(settings.topic_crm, sum(counts.values()) - counts["visit"])
    finally:
        await _delete(kafka_admin, settings)
    assert len(web) + len(crm) == len(events)
    assert all(r.key == orjson.loads(r.value)["lead_id"].encode() for r in web + crm)
    received = [orjson.loads(r.value) for r in web + crm]
    assert sorted(received, key=lambda e: e["event_id"]) == sorted(events, key=lambda e: e["event_id"])
    assert {orjson.loads(r.value)["type"] for r in web} == {"visit"}  # the rest went to the CRM topic
    # every good row became events: its lead_created arrived, and its outcome when it has one
    created = {e["lead_id"] for e in received if e["type"] == "lead_created"}
    assert created == {r.lead_id for r in good} == {"p-a", "p-b", "p-c", "p-d"}
    # one lead's events share a partition and keep their order
    by_lead: dict[str, list[tuple[int, int, str]]] = {}
    for r in crm:
        by_lead.setdefault(r.key.decode(), []).append((r.partition, r.offset, orjson.loads(r.value)["event_id"]))
    for lead, seen in by_lead.items():
        assert len({p for p, _, _ in seen}) == 1, lead
        ids = [i for _, _, i in sorted(seen)]
        assert ids == sorted(ids, key=lambda i: int(i.rsplit(":", 1)[1]))


async def test_simulation_publishes_in_order_with_rate(stack: Settings, kafka_admin, consume) -> None:
    settings = _own_topics(stack)
    events = simulate(5, seed=9)
    try:
        counts = await publish_events(settings, events, rate=2000, progress=None)
        n_web = sum(n for t, n in counts.items() if t in {"visit", "page_view", "click", "email_open",
                                                          "email_click", "download", "form_submit"})
        web = await consume(settings.topic_web, n_web)
        crm = await consume(settings.topic_crm, len(events) - n_web)
    finally:
        await _delete(kafka_admin, settings)
    assert sum(counts.values()) == len(events)
    assert {orjson.loads(r.value)["event_id"] for r in web + crm} == {e["event_id"] for e in events}
