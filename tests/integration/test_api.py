"""``leadstream api`` against the real Kafka and Redis: webhook ingest, tokens, reads that match
Redis, and metrics that Prometheus' parser reads."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.state import lead_key
from tests.integration.api_process import Reply, http, start_api, stop
from tests.integration.conftest import settings_env

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000  # 2026-01-01
DAY = 86_400_000
TOKEN = secrets.token_hex(16)


def ev(event_id: str, lead_id: str, type_: str, ts: int, **props: object) -> dict:
    return {"event_id": event_id, "lead_id": lead_id, "type": type_, "ts": ts, "props": props}


@pytest.fixture
def api(pipeline_settings, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``api(**env_overrides)`` starts ``leadstream api`` with the token; returns its base URL."""
    procs = []

    def start(**overrides: str) -> str:
        env = settings_env(pipeline_settings) | {"LEADSTREAM_API_TOKEN": TOKEN} | overrides
        procs.append(start_api(env, pipeline_settings.api_port, tmp_path / f"api-{len(procs)}.log"))
        return f"http://127.0.0.1:{pipeline_settings.api_port}"

    yield start
    for proc in procs:
        stop(proc)


async def call(method: str, url: str, body: bytes | None = None, token: str | None = TOKEN, **kw) -> Reply:
    return await asyncio.to_thread(http, method, url, body, token, **kw)


async def test_webhook_publishes_exactly_what_it_accepted(pipeline_settings, api, consume) -> None:
    s = pipeline_settings
    base = api(LEADSTREAM_API_MAX_BODY_BYTES="4096", LEADSTREAM_API_MAX_BATCH="10")
    good = [ev("h1", "lead-w1", "lead_created", T0, fields={"owner": "Ana", "country": "Germany"}),
            ev("h2", "lead-w1", "download", T0 + 1000, asset="guide.pdf"),
            ev("h3", "lead-w2", "page_view", "2026-01-01T00:00:03Z", url="/pricing")]
    bad = [ev("h4", "lead-w2", "page_view", T0),  # no url: schema violation
           {"lead_id": "lead-w3", "type": "teleport"}]
    batch = [good[0], bad[0], good[1], bad[1], good[2]]
    r = await call("POST", f"{base}/events", orjson.dumps(batch), headers={"Content-Type": "application/json"})
    assert r.status == 207, r.body
    doc = r.json()
    assert [x["status"] for x in doc["results"]] == ["accepted", "rejected", "accepted", "rejected", "accepted"]
    assert "'url' is a required property" in doc["results"][1]["reason"]
    assert "unknown event type 'teleport'" in doc["results"][3]["reason"]
    assert (doc["accepted"], doc["rejected"]) == (3, 2)

    # NDJSON, one bad line among good ones: answered per line.
    ndjson = orjson.dumps(ev("h5", "lead-w2", "lead_updated", T0 + 5, fields={"owner": "Ben"})) + b"\n{oops\n"
    r = await call("POST", f"{base}/events", ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert r.status == 207 and [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
    assert r.json()["results"][1]["reason"].startswith("invalid JSON")

    # Bodies that are not events at all, or too big: a clear 4xx, nothing published.
    for body, status in ((b"[1, 2", 400), (b"", 400), (b"x" * 5000, 413),
                         (orjson.dumps([good[0]] * 11), 413)):
        r = await call("POST", f"{base}/events", body)
        assert r.status == status, (body[:20], r.status, r.body)
        assert b"error" in r.body
    r = await call("POST", f"{base}/events", orjson.dumps(bad))
    assert r.status == 422 and r.json()["accepted"] == 0

    # Exactly the accepted events, keyed by lead_id, on the topic of their type; nothing else.
    web = await consume(s.topic_web, 2)
    crm = await consume(s.topic_crm, 2)
    assert sorted(orjson.loads(rec.value)["event_id"] for rec in web) == ["h2", "h3"]
    assert sorted(orjson.loads(rec.value)["event_id"] for rec in crm) == ["h1", "h5"]
    assert all(rec.key.decode() == orjson.loads(rec.value)["lead_id"] for rec in web + crm)
    assert {orjson.loads(rec.value)["event_id"]: orjson.loads(rec.value) for rec in web + crm}["h1"] == good[0]
    with pytest.raises(AssertionError):  # and no more than that
        await consume(s.topic_web, 3, timeout=3)


async def test_every_route_but_healthz_needs_the_token(api) -> None:
    base = api()
    assert (await call("GET", f"{base}/healthz", token=None)).status == 200
    for method, path in (("GET", "/leads"), ("GET", "/leads/x"), ("GET", "/funnel"), ("GET", "/owners"),
                         ("GET", "/model"), ("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/dashboard"),
                         ("POST", "/events")):
        for token in (None, "wrong-" + TOKEN):
            r = await call(method, f"{base}{path}", b"{}" if method == "POST" else None, token=token)
            assert r.status == 401, (method, path, token, r.status)
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert (await call("GET", f"{base}/owners")).status == 200
    # A browser trades ?token= for a cookie once; the redirect drops the token from the URL.
    r = await call("GET", f"{base}/dashboard?token={TOKEN}&owner=Ana", token=None)
    assert r.status == 302 and r.headers["Location"] == "/dashboard?owner=Ana"
    cookie = r.headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in r.headers["Set-Cookie"]
    assert (await call("GET", f"{base}/owners", token=None, headers={"Cookie": cookie})).status == 200


async def test_api_answers_match_redis_and_metrics_parse(pipeline_settings, start_worker, api, consume,
                                                         redis_client) -> None:
    s = pipeline_settings
    # No decay rescoring while the test compares Redis and the API (its events are from 2026-01-01).
    start_worker(LEADSTREAM_API_TOKEN=TOKEN, LEADSTREAM_RESCORE_EVERY_SECONDS=str(10 * 365 * 86400))
    base = api()
    owners = {"lead-1": "Ana", "lead-2": "Ana", "lead-3": "Ben", "lead-4": "Ben"}
    events = [ev(f"c-{lead}", lead, "lead_created", T0, fields={"owner": owner, "industry": "software"})
              for lead, owner in owners.items()]
    events.append(ev("u-1", "lead-1", "lead_updated", T0 + 1, fields={"job_title": "<script>alert(1)</script>"}))
    events += [ev(f"d-{lead}-{i}", lead, "download", T0 + 1000 * i, asset="a.pdf")
               for n, lead in enumerate(owners) for i in range(n)]
    events += [ev("s-3", "lead-3", "stage_changed", T0 + DAY, stage="proposal"),
               ev("won-4", "lead-4", "deal_won", T0 + 2 * DAY, amount=1000),
               ev("x", "lead-5", "<script>alert(1)</script>", T0)]  # rejected at the door
    r = await call("POST", f"{base}/events", orjson.dumps(events))
    assert r.status == 207 and r.json()["accepted"] == len(events) - 1
    await consume(s.topic_scores, len(events) - 1, timeout=60)

    for lead in owners:
        got = (await call("GET", f"{base}/leads/{lead}")).json()
        stored = orjson.loads(await redis_client.hget(lead_key(lead), "s"))  # the raw state in Redis
        assert (got["score"], got["grade"], got["stage"]) == (stored["score"], stored["grade"], stored["stage"])
        assert got["owner"] == owners[lead] and got["state"] == stored and got["reasons"] == stored["reasons"]
        assert [h["score"] for h in got["history"]] == [h[1] for h in stored["history"]]
        assert set(got["stage_probabilities"]) <= {"new", "contacted", "engaged", "qualified", "proposal",
                                                   "negotiation", "closing"}
    assert (await call("GET", f"{base}/leads/nobody")).status == 404

    # Ranked open leads of one owner, as Redis has them; lead-4's deal is closed, so it is not open.
    scores = {lead: orjson.loads(await redis_client.hget(lead_key(lead), "s"))["score"] for lead in owners}
    page = (await call("GET", f"{base}/leads?owner=Ben")).json()
    assert [row["lead_id"] for row in page["leads"]] == ["lead-3"]
    page = (await call("GET", f"{base}/leads?limit=2")).json()
    ranked = sorted(["lead-1", "lead-2", "lead-3"], key=lambda lead: -scores[lead])
    assert [row["lead_id"] for row in page["leads"]] == ranked[:2] and page["next_cursor"]
    rest = (await call("GET", f"{base}/leads?limit=2&cursor={page['next_cursor']}")).json()
    assert [row["lead_id"] for row in rest["leads"]] == ranked[2:] and rest["next_cursor"] is None
    assert (await call("GET", f"{base}/leads?stage=nowhere")).status == 400

    team = {row["owner"]: row for row in (await call("GET", f"{base}/owners")).json()["owners"]}
    assert (team["Ana"]["open"], team["Ben"]["open"], team["Ben"]["won"]) == (2, 1, 1)
    funnel = (await call("GET", f"{base}/funnel")).json()
    assert funnel["stages"]["proposal"]["open"] == 1 and funnel["closed"] == {"won": 1, "lost": 0}

    page = (await call("GET", f"{base}/dashboard")).body.decode()
    assert "lead-3" in page and "<svg" in page and "<rect" in page
    page = (await call("GET", f"{base}/dashboard/leads/lead-1")).body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page  # escaped, not run

    # Metrics: the worker's and the api's both parse; the worker counted what it read (a batch is
    # counted once its records are acknowledged, which the loop sees at its next fetch: a moment later).
    for _ in range(50):
        worker_metrics = await call("GET", f"http://127.0.0.1:{s.web_port}/metrics")
        assert worker_metrics.status == 200
        families = {f.name: f for f in text_string_to_metric_families(worker_metrics.body.decode())}
        events_in = sum(x.value for x in families["leadstream_events_in"].samples if x.name.endswith("_total"))
        if events_in >= len(events) - 1:
            break
        await asyncio.sleep(0.2)
    assert events_in == len(events) - 1
    scored = {x.labels["trigger"]: x.value for x in families["leadstream_scored"].samples if x.name.endswith("_total")}
    assert scored["event"] == len(events) - 1  # (old event times: decay rescoring may add trigger="decay")
    assert {"leadstream_step_seconds", "leadstream_event_to_score_seconds", "leadstream_consumer_lag",
            "leadstream_model_version", "leadstream_redis_errors"} <= set(families)
    assert (await call("GET", f"http://127.0.0.1:{s.web_port}/metrics", token=None)).status == 401
    api_metrics = await call("GET", f"{base}/metrics")
    api_families = {f.name: f for f in text_string_to_metric_families(api_metrics.body.decode())}
    accepted = [x.value for x in api_families["leadstream_webhook_events"].samples
                if x.labels.get("result") == "accepted" and x.name.endswith("_total")]
    assert accepted == [len(events) - 1]

    ready = await call("GET", f"http://127.0.0.1:{s.web_port}/readyz")
    assert ready.status == 200 and ready.json()["checks"] == {"redis": "ok", "kafka": "ok", "partitions": "ok"}
    assert (await call("GET", f"{base}/readyz")).json()["ready"] is True
    assert (await call("GET", f"http://127.0.0.1:{s.web_port}/healthz", token=None)).status == 200
