"""Fast tests of the api's pure parts: webhook bodies, validation, charts, templates, metrics labels,
settings; and its auth middleware on a real aiohttp server (no Kafka, no Redis needed)."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from models.events import RejectedEvent, parse_event, topic_kind_of
from streams import api, charts, metrics
from streams.settings import Settings, SettingsError

GOOD = {"event_id": "e1", "lead_id": "l1", "type": "download", "ts": 5, "props": {"asset": "a.pdf"}}


def test_webhook_bodies_split_into_events() -> None:
    one = orjson.dumps(GOOD)
    assert api.split_events(one, 10) == [one]
    assert api.split_events(b"[" + one + b"," + one + b"]", 10) == [one, one]
    assert api.split_events(one + b"\n\n" + one + b"\n", 10) == [one, one]
    pretty = orjson.dumps(GOOD, option=orjson.OPT_INDENT_2)
    assert api.split_events(pretty, 10) == [pretty.strip()]
    for body in (b"", b"  \n", b"[1,", b"[]"):
        with pytest.raises(api.BadBody):
            api.split_events(body, 10)
    with pytest.raises(api.BadBody, match="at most 2"):
        api.split_events(b"\n".join([one] * 3), 2)


def test_webhook_validation_is_the_workers() -> None:
    """Every event the api rejects, the worker would reject with the same reason, and vice versa."""
    cases = [GOOD, GOOD | {"type": "page_view"}, GOOD | {"type": "teleport"}, GOOD | {"ts": "yesterday"},
             {"lead_id": 5}, [1, 2], GOOD | {"props": {"asset": "x" * 2000}}]
    for doc in cases:
        raw = orjson.dumps(doc)
        checked = api.check_event(0, raw, max_event_bytes=1000)
        fields = doc if isinstance(doc, dict) else {}
        key = fields["lead_id"].encode() if isinstance(fields.get("lead_id"), str) else None
        kind = topic_kind_of(fields["type"]) if isinstance(fields.get("type"), str) else "crm"
        try:
            event = parse_event(key, raw, topic_kind=kind, max_bytes=1000)
            assert checked.reason is None and checked.lead_id == event.lead_id
        except RejectedEvent as exc:
            assert checked.reason == str(exc)
    assert api.check_event(0, b"{not json", 1000).reason.startswith("invalid JSON")


def test_every_dead_letter_reason_has_its_own_label() -> None:
    bad = [(b"k", None), (b"k", b"x" * 300), (b"k", b"{"), (b"k", b"[]"), (b"k", b'{"type": "nope"}'),
           (b"l1", orjson.dumps(GOOD | {"props": {"asset": 5}})), (b"l1", orjson.dumps(GOOD | {"ts": "2026-01-01"})),
           (None, orjson.dumps(GOOD)), (b"other", orjson.dumps(GOOD))]
    labels = []
    for key, value in bad:
        with pytest.raises(RejectedEvent) as exc:
            parse_event(key, value, topic_kind="web", max_bytes=256)
        labels.append(metrics.reason_label(str(exc.value)))
    with pytest.raises(RejectedEvent) as exc:
        parse_event(b"l1", orjson.dumps(GOOD), topic_kind="crm")
    labels.append(metrics.reason_label(str(exc.value)))
    assert labels == ["null_value", "too_large", "invalid_json", "not_an_object", "unknown_type", "schema",
                      "bad_timestamp", "missing_key", "key_mismatch", "wrong_topic"]
    assert set(labels) <= set(metrics.REASON_LABELS)


def test_metrics_text_parses() -> None:
    metrics.observe_dead_letter("schema violation at (root): x")
    metrics.set_model_report({"version": 4, "rules": {"roc_auc": 0.7}, "champion": {"roc_auc": 0.8}})
    body, content_type = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert content_type.startswith("text/plain")
    assert [s.value for s in families["leadstream_model_version"].samples] == [4.0]
    assert any(s.labels == {"reason": "schema"} and s.value >= 1 for s in families["leadstream_dead_lettered"].samples)



def test_leads_the_model_could_not_rescore_are_exported() -> None:
    before = metrics.RESCORE_FAILED._value.get()
    seen = metrics._seen_counts.get("rescore_failed", 0)  # the pipeline's counter when last synced
    metrics.sync_counts({"rescore_failed": seen + 2})
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    assert metrics.RESCORE_FAILED._value.get() - before == 2
    assert families["leadstream_rescore_failed"].samples[0].value == before + 2


FUNNEL = {"leads": 3, "stall_days": 14.0, "open": 2, "closed": {"won": 1, "lost": 0}, "win_rate": 1.0,
          "median_days_to_close": 3.0, "email_reply_rate": None, "overdue_activities": 0, "bottleneck": None,
          "grade_mix": {"A": 1, "D": 1},
          "stages": {s: {"reached": 2, "open": 1, "stalled": 0, "median_days_in_stage": 1.0,
                         "conversion_to_next": 0.5, "grades": {}} for s in ("new", "contacted")}}


def test_dashboard_renders_charts_and_escapes_what_came_from_events() -> None:
    evil = "<img src=x onerror=alert(1)>"
    curve = {"by_grade": {"A": {"won": 1, "lost": 0, "win_rate": 1.0}},
             "by_decile": [{"decile": d, "won": d % 2, "lost": 1, "win_rate": (d % 2) / (1 + d % 2)} for d in range(10)]}
    html = api.render(
        "dashboard.html", funnel=FUNNEL, owners=[{"owner": evil, "open": 1, "hot": 0, "stalled": 0,
                                                  "overdue_activities": 0, "won": 0, "lost": 0, "win_rate": None}],
        leads=[{"lead_id": evil, "score": 0.5, "grade": "B", "stage": "new", "owner": evil, "hot": True,
                "reasons": [{"feature": evil, "contribution": 1.0}]}],
        model=None, charts=api.dashboard_charts(FUNNEL, curve, [{"version": 1, "rules": 0.6, "champion": 0.7}]),
        alerts=api.alerts(FUNNEL), filters={"owner": None, "stage": None, "grade": None}, stages=("new",),
        grades=("A", "B"), open_leads=2, stage_rates={})
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<svg") == 5 and "<polyline" in html and 'class="bar s0"' in html


def test_charts_scale_to_their_data() -> None:
    c = charts.funnel_chart(FUNNEL["stages"])
    assert len(c.bars) == 6 and max(b.h for b in c.bars) == pytest.approx(charts.HEIGHT - charts.PAD_T - charts.PAD_B)
    assert charts.success_chart([("A", {})], "t").empty == "no data yet"
    assert charts.line_chart({"x": []}).empty == "no data yet"


def test_api_settings() -> None:
    s = Settings.from_env({})
    assert (s.api_port, s.api_bind, s.api_token, s.log_format) == (6067, "127.0.0.1", "", "text")
    with pytest.raises(SettingsError, match="LEADSTREAM_API_TOKEN=<hidden>: expected 16"):
        Settings.from_env({"LEADSTREAM_API_TOKEN": "short"})
    with pytest.raises(SettingsError, match="LEADSTREAM_LOG_FORMAT='xml': expected one of text, json"):
        Settings.from_env({"LEADSTREAM_LOG_FORMAT": "xml"})
    assert "secret" not in repr(Settings.from_env({"LEADSTREAM_API_TOKEN": "secret" * 4}))
    with pytest.raises(SettingsError, match="without LEADSTREAM_API_TOKEN"):
        api.check_bind(dataclasses.replace(s, api_bind="0.0.0.0"))


def test_token_from_a_file(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("t" * 20 + "\n")
    assert Settings.from_env({"LEADSTREAM_API_TOKEN_FILE": str(path)}).api_token == "t" * 20
    with pytest.raises(SettingsError, match="both set"):
        Settings.from_env({"LEADSTREAM_API_TOKEN_FILE": str(path), "LEADSTREAM_API_TOKEN": "u" * 20})
    with pytest.raises(SettingsError, match="expected a readable file"):
        Settings.from_env({"LEADSTREAM_API_TOKEN_FILE": str(tmp_path / "missing")})


async def test_auth_middleware_on_a_real_server() -> None:
    token = "k" * 32
    settings = dataclasses.replace(Settings.from_env({}), api_token=token, redis_url="redis://127.0.0.1:1/0")
    async with TestClient(TestServer(api.build_app(settings))) as client:
        assert (await client.get("/healthz")).status == 200
        for headers in ({}, {"Authorization": "Bearer " + "x" * 32}, {"Authorization": token}):
            r = await client.get("/leads", headers=headers)
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await client.get("/leads?stage=nowhere", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 400 and "stage='nowhere'" in (await r.json())["error"]
        r = await client.post("/events", data=b"[1,", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]


async def test_aggregates_cache_computes_once_per_ttl_and_shares_a_computation() -> None:
    import asyncio

    now = [0.0]
    cache = api.TtlCache(2.0, clock=lambda: now[0], max_keys=3)
    calls: list[str] = []

    async def compute(name: str) -> str:
        calls.append(name)
        await asyncio.sleep(0.01)
        return f"{name}#{len(calls)}"

    # Callers arriving during one computation share it.
    assert await asyncio.gather(cache.get("a", lambda: compute("a")), cache.get("a", lambda: compute("a"))) == [
        "a#1", "a#1"]
    now[0] = 1.9
    assert await cache.get("a", lambda: compute("a")) == "a#1"  # still fresh
    now[0] = 2.0
    assert await cache.get("a", lambda: compute("a")) == "a#2"  # expired: read again
    for key in "bcde":  # more keys than max_keys: expired entries are dropped, live ones kept
        now[0] += 1.0
        await cache.get(key, lambda key=key: compute(key))
    assert len(cache._entries) <= 3

    async def failing() -> str:
        calls.append("boom")
        raise RuntimeError("Redis is down")

    for _ in range(2):  # a failure is not cached: the next caller tries again
        with pytest.raises(RuntimeError):
            await cache.get("f", failing)
    assert calls.count("boom") == 2
