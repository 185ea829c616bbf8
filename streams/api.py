"""``leadstream api``: the read API, the dashboard, webhook ingest and metrics, in their own process.

Dashboard and API reads never run in the worker, so they cannot slow scoring down. Reads come
from the read models (``streams.views.Views``) and the lead hashes; ``POST /events`` validates
webhook events with the contract's schemas and publishes the good ones to the input topics.
Every route but ``/healthz`` needs the token when ``LEADSTREAM_API_TOKEN`` is set. Routes and
examples: docs/api.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jinja2
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer
from redis.exceptions import RedisError

from models.events import STAGES, RejectedEvent, parse_event, topic_kind_of
from models.grading import GRADE_NAMES
from models.readmodel import owner_of
from models.rules import load_rules
from streams import charts, metrics
from streams.clients import redis_readiness
from streams.publish import topic_for
from streams.settings import Settings
from streams.state import LeadStore, ModelStore
from streams.topics import ensure_topics
from streams.views import Views

log = logging.getLogger("leadstream.api")

OPEN_PATHS = frozenset({"/healthz"})
TOKEN_COOKIE = "leadstream_token"
MAX_LIMIT = 500
AUC_HISTORY_KEY = "model:auc_history"  # sorted set, score = model version, member = JSON
AUC_HISTORY_LEN = 500
HISTORY_EVERY_S = 5.0
DASHBOARD_LEADS = 25

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("streams", "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


class BadBody(ValueError):
    """The request body cannot be read as events at all (answered with 400)."""


class TtlCache:
    """Values computed at most once per ``ttl_s`` per key; callers arriving during a computation
    share it, and a failure is not kept (the next caller tries again).

    The dashboard's aggregates (funnel, team, success curve, model) are sums over every lead: a
    second's staleness costs nothing to a reader, while reading them costs Redis (single-threaded,
    shared with the worker's writes) hundreds of commands. Values are shared: do not change them.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 256) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_keys = max_keys
        self._entries: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[Any]]) -> Any:
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            if len(self._entries) >= self.max_keys:  # keys carry query parameters: keep only live ones
                self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
            entry = self._entries[key] = (now + self.ttl_s, asyncio.ensure_future(compute()))
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]
            raise


# ---------------------------------------------------------------- webhook bodies (pure)

def split_events(body: bytes, max_events: int) -> list[bytes]:
    """The events in a webhook body: one JSON object, a JSON array, or NDJSON (one per line).

    Each item comes back as its own JSON bytes, to be validated one by one; an NDJSON line that
    is not JSON is kept, so it is rejected with its reason instead of failing the whole body.

    >>> split_events(b'{"a": 1}', 10)
    [b'{"a": 1}']
    >>> split_events(b'[{"a":1},{"b":2}]', 10)
    [b'{"a":1}', b'{"b":2}']
    >>> split_events(b'{"a":1}\\n\\n{"b":\\n', 10)
    [b'{"a":1}', b'{"b":']
    >>> split_events(b'[1, 2', 10)
    Traceback (most recent call last):
    ...
    streams.api.BadBody: the body starts a JSON array but is not valid JSON: unexpected end of data: line 1 column 6 (char 5)
    """
    text = body.strip()
    if not text:
        raise BadBody("empty body: expected a JSON event, a JSON array of events, or NDJSON")
    if text[:1] == b"[":
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BadBody(f"the body starts a JSON array but is not valid JSON: {exc}") from None
        out = [orjson.dumps(item) for item in items]
    else:
        lines = [line.strip() for line in text.split(b"\n")]
        out = [line for line in lines if line]
        if len(out) > 1 and _is_json(text) and not _is_json(out[0]):  # one pretty-printed object
            out = [text]
    if not out:
        raise BadBody("the body holds no events")
    if len(out) > max_events:
        raise BadBody(f"{len(out)} events in one request: at most {max_events} (LEADSTREAM_API_MAX_BATCH)")
    return out


def _is_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Checked:
    index: int
    raw: bytes
    lead_id: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    reason: str | None = None  # None when valid


def check_event(index: int, raw: bytes, max_event_bytes: int) -> Checked:
    """Validate one webhook event exactly as the worker will (same schemas, same limits).

    >>> check_event(0, b'{"event_id":"e1","lead_id":"l1","type":"download","ts":5,"props":{}}', 1000).reason is None
    True
    >>> check_event(1, b'{"event_id":"e1","lead_id":"l1","type":"page_view","ts":5,"props":{}}', 1000).reason
    "schema violation at props: 'url' is a required property"
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    fields = doc if isinstance(doc, dict) else {}
    lead_id = fields.get("lead_id") if isinstance(fields.get("lead_id"), str) else None
    event_type = fields.get("type") if isinstance(fields.get("type"), str) else None
    event_id = fields.get("event_id") if isinstance(fields.get("event_id"), str) else None
    try:
        parse_event(lead_id.encode() if lead_id is not None else None, raw,
                    topic_kind=topic_kind_of(event_type or ""), max_bytes=max_event_bytes)
    except RejectedEvent as exc:
        return Checked(index, raw, lead_id, event_id, event_type, str(exc))
    return Checked(index, raw, lead_id, event_id, event_type)


def ingest_status(results: list[dict[str, Any]]) -> int:
    """200 when every event was accepted, 207 when some were, 422 when none was.

    >>> ingest_status([{"status": "accepted"}]), ingest_status([{"status": "accepted"}, {"status": "rejected"}])
    (200, 207)
    """
    accepted = sum(r["status"] == "accepted" for r in results)
    return 200 if accepted == len(results) else 207 if accepted else 422


# ---------------------------------------------------------------- presentation helpers (pure)

def pct(value: float | None) -> str:
    """A share as a percentage, ``-`` when unknown.

    >>> pct(0.4567), pct(None)
    ('45.7%', '-')
    """
    return "-" if value is None else f"{100 * value:.1f}%"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def why(reasons: list[dict[str, Any]]) -> str:
    """The top three reasons of a score, in one line.

    >>> why([{"feature": "download", "contribution": 1.2}])
    'download +1.20'
    """
    return ", ".join(f"{r['feature']} {r['contribution']:+.2f}" for r in reasons[:3])


def when(ts_ms: int | None) -> str:
    if not ts_ms:
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def alerts(funnel: dict[str, Any]) -> list[str]:
    """Funnel problems a department head should look at: stalls, low reply rate, slow sales,
    low conversion, overdue work.

    >>> alerts({"stages": {"new": {"open": 4, "stalled": 3, "conversion_to_next": 0.2}}, "stall_days": 14,
    ...         "bottleneck": "new", "email_reply_rate": 0.05, "overdue_activities": 0, "median_days_to_close": 90})
    ... # doctest: +NORMALIZE_WHITESPACE
    ['stalls: 3 of 4 open leads in new have not moved for over 14 days',
     'low conversion: only 20.0% of the leads that reach new move on (the lowest of all stages)',
     'low reply rate: 5.0% of opened emails get a reply', 'slow sales: deals take 90 days to close (median)']
    """
    out = []
    stall_days = funnel.get("stall_days", 14.0)
    for stage, row in funnel["stages"].items():
        if row["open"] and row["stalled"] / row["open"] >= 0.5:
            out.append(f"stalls: {row['stalled']} of {row['open']} open leads in {stage} have not moved for "
                       f"over {num(stall_days)} days")
    if funnel.get("bottleneck"):
        rate = funnel["stages"][funnel["bottleneck"]]["conversion_to_next"]
        out.append(f"low conversion: only {pct(rate)} of the leads that reach {funnel['bottleneck']} move on "
                   "(the lowest of all stages)")
    if funnel.get("email_reply_rate") is not None and funnel["email_reply_rate"] < 0.1:
        out.append(f"low reply rate: {pct(funnel['email_reply_rate'])} of opened emails get a reply")
    if (funnel.get("median_days_to_close") or 0) > 60:
        out.append(f"slow sales: deals take {num(funnel['median_days_to_close'])} days to close (median)")
    if funnel.get("overdue_activities"):
        out.append(f"overdue work: {funnel['overdue_activities']} sales activities are overdue")
    return out


def dashboard_charts(funnel: dict[str, Any], curve: dict[str, Any], auc_history: list[dict[str, Any]]
                     ) -> dict[str, charts.Chart]:
    """Every chart of the dashboard, from the read models' data."""
    by_grade = [(g, curve.get("by_grade", {}).get(g, {})) for g in GRADE_NAMES]
    by_decile = [(f"{d['decile'] / 10:.1f}", d) for d in curve.get("by_decile", [])]
    return {
        "funnel": charts.funnel_chart(funnel["stages"]),
        "grades": charts.grade_mix_chart(funnel.get("grade_mix", {}), GRADE_NAMES),
        "by_grade": charts.success_chart(by_grade, "Actual win rate per grade (closed deals)"),
        "by_decile": charts.success_chart(by_decile, "Actual win rate per score decile (closed deals)"),
        "accuracy": charts.line_chart(
            {name: [(h["version"], h[name]) for h in auc_history if h.get(name) is not None]
             for name in ("rules", "champion", "challenger")},
            title="Prequential ROC AUC by model version", y_min=0.4, y_max=1.0, x_label="model version"),
    }


def render(template: str, **context: Any) -> str:
    return TEMPLATES.get_template(template).render(pct=pct, num=num, why=why, when=when, **context)


# ---------------------------------------------------------------- the application

class Api:
    """The process's shared things: settings, Redis, the read models, a Kafka producer (lazy)."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.views = Views(client, load_rules(settings.scoring_config.read_text()).grades)
        self.models = ModelStore(client)
        self.leads = LeadStore(client)
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self.cache = TtlCache(settings.api_cache_s)  # LEADSTREAM_API_CACHE_SECONDS

    async def producer(self) -> AIOKafkaProducer:
        """The producer, started on first use (so the API starts, and reads work, without Kafka)."""
        async with self._lock:
            if self._producer is None:
                await ensure_topics(self.settings, {self.settings.topic_web: self.settings.partitions,
                                                    self.settings.topic_crm: self.settings.partitions})
                producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                            enable_idempotence=True, linger_ms=2)
                await producer.start()
                self._producer = producer
            return self._producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self.client.aclose()

    async def lead(self, lead_id: str) -> dict[str, Any] | None:
        """``GET /leads/{id}``: the lead hash, its state, reasons, history and per-stage probabilities."""
        stored = await self.leads.get(lead_id)
        if stored is None:
            return None
        report = await self.models.report() or {}
        state = stored["state"]
        return {
            "lead_id": lead_id, "score": stored["score"], "grade": stored["grade"], "stage": stored["stage"],
            "source": stored["source"], "owner": owner_of(state), "hot": bool(stored["hot"]),
            "outcome": state.get("outcome"), "updated_at": stored["updated_at"],
            "model_version": stored["model_version"], "reasons": stored["reasons"],
            # Until per-stage models exist: the learned win rate of the leads that reached each stage.
            "stage_probabilities": {s: r["win_rate"] for s, r in report.get("stage_rates", {}).items()},
            "history": stored["history"],
            "fields": state.get("fields", {}), "counts": state.get("counts", {}), "state": state,
        }

    async def record_auc(self) -> None:
        """Keep the model's AUC per version (for the accuracy-over-time chart); idempotent."""
        report = await self.models.report()
        if not report:
            return
        point = {"version": report["version"], "ts": int(time.time() * 1000),
                 **{k: (report.get(k) or {}).get("roc_auc") for k in ("rules", "champion", "challenger")}}
        version = report["version"]
        if not await self.client.zcount(AUC_HISTORY_KEY, version, version):
            pipe = self.client.pipeline(transaction=True)
            pipe.zadd(AUC_HISTORY_KEY, {orjson.dumps(point): version})
            pipe.zremrangebyrank(AUC_HISTORY_KEY, 0, -AUC_HISTORY_LEN - 1)
            await pipe.execute()

    async def auc_history(self) -> list[dict[str, Any]]:
        return [orjson.loads(m) for m in await self.client.zrange(AUC_HISTORY_KEY, 0, -1)]

    async def aggregates(self, stall_days: float) -> dict[str, Any]:
        """Funnel (with the model's learned win rate per stage and the problems found), team, success
        curve, model report and AUC history: read at most once per LEADSTREAM_API_CACHE_SECONDS."""
        return await self.cache.get(("aggregates", stall_days), lambda: self._aggregates(stall_days))

    async def _aggregates(self, stall_days: float) -> dict[str, Any]:
        views = await self.views.aggregates(now_ms=_now_ms(), stall_days=stall_days)
        model = await self.models.report()
        funnel = views["funnel"]
        rates = (model or {}).get("stage_rates", {})
        for stage, row in funnel["stages"].items():
            row["learned_win_rate"] = rates.get(stage, {}).get("win_rate")
        funnel["problems"] = alerts(funnel)
        return {"funnel": funnel, "owners": views["owners"], "success_curve": views["success_curve"],
                "model": model, "auc_history": await self.auc_history()}

    async def dashboard(self, filters: dict[str, Any], stall_days: float) -> dict[str, Any]:
        """Everything the dashboard page shows: the cached aggregates and a fresh page of the best leads."""
        agg = await self.aggregates(stall_days)
        leads, _ = await self.views.leaderboard(**(filters | {"limit": DASHBOARD_LEADS, "cursor": None}))
        funnel, model = agg["funnel"], agg["model"]
        return {"funnel": funnel, "owners": agg["owners"], "leads": leads, "model": model,
                "charts": dashboard_charts(funnel, agg["success_curve"], agg["auc_history"]),
                "alerts": funnel["problems"], "filters": filters, "stages": STAGES, "grades": GRADE_NAMES,
                "open_leads": sum(row["open"] for row in funnel["stages"].values()),
                "stage_rates": (model or {}).get("stage_rates", {})}


API: web.AppKey[Api] = web.AppKey("api", Api)


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Bearer token on every route but /healthz; a browser may trade ``?token=`` for a cookie once."""
    token = request.app[API].settings.api_token
    if not token or request.path in OPEN_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.cookies.get(TOKEN_COOKIE, "")
    if given and _same(given, token):
        return await handler(request)
    query = request.query.get("token")
    if request.method == "GET" and query and _same(query, token):
        rest = [(k, v) for k, v in request.query.items() if k != "token"]
        response = web.Response(status=302, headers={"Location": str(request.rel_url.with_query(rest or None))})
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response
    return web.json_response({"error": "missing or wrong token: send Authorization: Bearer <LEADSTREAM_API_TOKEN>"},
                             status=401, headers={"WWW-Authenticate": 'Bearer realm="leadstream"'})


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count requests; a Redis outage is a 503 with a reason, not a stack trace."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.HTTP_REQUESTS.labels(route, f"{exc.status // 100}xx").inc()
        raise
    except RedisError as exc:
        log.warning("%s %s: Redis: %r", request.method, request.path, exc)
        response = web.json_response({"error": f"Redis is unavailable: {exc}"}, status=503)
    metrics.HTTP_REQUESTS.labels(route, f"{response.status // 100}xx").inc()
    return response


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=orjson.dumps({"error": message}).decode(), content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name) or None
    if value is not None and value not in allowed:
        raise _bad(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def _float(request: web.Request, name: str, default: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        value = -1.0
    if not 0 < value < 10_000:
        raise _bad(f"{name}={request.query.get(name)!r}: expected a number of days > 0")
    return value


def _filters(request: web.Request) -> dict[str, Any]:
    """The /leads and /dashboard filters, validated (a bad one is a 400 naming it)."""
    hot_raw = request.query.get("hot") or None
    if hot_raw not in (None, "true", "false", "1", "0"):
        raise _bad(f"hot={hot_raw!r}: expected true or false")
    try:
        limit = int(request.query.get("limit", 50))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit={request.query.get('limit')!r}: expected a whole number from 1 to {MAX_LIMIT}")
    owner = request.query.get("owner") or None
    if owner is not None and len(owner) > 200:
        raise _bad("owner: expected at most 200 characters")
    cursor = request.query.get("cursor") or None
    if cursor is not None and len(cursor) > 500:
        raise _bad("cursor: expected the next_cursor of a previous page")
    return {"stage": _choice(request, "stage", STAGES), "grade": _choice(request, "grade", GRADE_NAMES),
            "owner": owner, "hot": None if hot_raw is None else hot_raw in ("true", "1"),
            "limit": limit, "cursor": cursor}


def _now_ms() -> int:
    return int(time.time() * 1000)


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    api = request.app[API]
    checks: dict[str, str] = {}
    checks["redis"] = await redis_readiness(api.client)
    try:
        producer = await asyncio.wait_for(api.producer(), 10.0)
        partitions = await asyncio.wait_for(producer.partitions_for(api.settings.topic_web), 5.0)
        checks["kafka"] = "ok" if partitions else "no partitions for the web topic"
    except Exception as exc:  # any failure to reach Kafka makes the process not ready, with the reason
        checks["kafka"] = f"unreachable: {exc!r}"
    ready = all(v == "ok" for v in checks.values())
    return _json({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics_route(request: web.Request) -> web.Response:
    metrics.set_model_report(await request.app[API].models.report())
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_lead(request: web.Request) -> web.Response:
    doc = await request.app[API].lead(request.match_info["lead_id"])
    if doc is None:
        return _json({"error": f"no lead {request.match_info['lead_id']!r}"}, status=404)
    return _json(doc)


async def list_leads(request: web.Request) -> web.Response:
    f = _filters(request)
    try:
        page, cursor = await request.app[API].views.leaderboard(**f)
    except ValueError as exc:  # a cursor that no page handed out
        raise _bad(str(exc)) from None
    return _json({"leads": page, "next_cursor": cursor})


async def get_funnel(request: web.Request) -> web.Response:
    agg = await request.app[API].aggregates(_float(request, "stall_days", 14.0))
    return _json(agg["funnel"])


async def get_owners(request: web.Request) -> web.Response:
    agg = await request.app[API].aggregates(_float(request, "stall_days", 14.0))
    return _json({"owners": agg["owners"]})


async def get_model(request: web.Request) -> web.Response:
    agg = await request.app[API].aggregates(14.0)
    return _json((agg["model"] or {"version": 0}) | {"auc_history": agg["auc_history"]})


async def get_success_curve(request: web.Request) -> web.Response:
    return _json((await request.app[API].aggregates(14.0))["success_curve"])


async def post_events(request: web.Request) -> web.Response:
    """Webhook ingest: validate each event, publish the good ones (acks=all), answer per event."""
    api = request.app[API]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _json({"error": f"body larger than {api.settings.api_max_body_bytes} bytes "
                               "(LEADSTREAM_API_MAX_BODY_BYTES): send smaller batches"}, status=413)
    try:
        items = split_events(body, api.settings.api_max_batch)
    except BadBody as exc:
        status = 413 if "at most" in str(exc) else 400
        return _json({"error": str(exc)}, status=status)
    checked = [check_event(i, raw, api.settings.max_event_bytes) for i, raw in enumerate(items)]
    good = [c for c in checked if c.reason is None]
    results: dict[int, dict[str, Any]] = {
        c.index: {"index": c.index, "event_id": c.event_id, "status": "rejected", "reason": c.reason}
        for c in checked if c.reason is not None}
    if good:
        try:
            producer = await asyncio.wait_for(api.producer(), 10.0)
            futures = [await producer.send(topic_for(api.settings, c.event_type or ""), value=c.raw,
                                           key=(c.lead_id or "").encode()) for c in good]
            sent = await asyncio.gather(*futures, return_exceptions=True)
        except Exception as exc:  # Kafka unreachable: nothing of this request is known to be published
            log.warning("POST /events: Kafka: %r", exc)
            return _json({"error": f"Kafka is unavailable, nothing was published; retry later ({exc!r})"},
                         status=503, )
        for c, outcome in zip(good, sent):
            if isinstance(outcome, BaseException):
                results[c.index] = {"index": c.index, "event_id": c.event_id, "status": "failed",
                                    "reason": f"not published: {outcome!r}; retry it"}
            else:
                results[c.index] = {"index": c.index, "event_id": c.event_id, "status": "accepted"}
    ordered = [results[i] for i in range(len(checked))]
    for r in ordered:
        metrics.WEBHOOK_EVENTS.labels(r["status"]).inc()
    summary = {s: sum(r["status"] == s for r in ordered) for s in ("accepted", "rejected", "failed")}
    status = 503 if summary["failed"] else ingest_status(ordered)
    return _json(summary | {"results": ordered}, status=status)


async def dashboard(request: web.Request) -> web.Response:
    """The page, rendered at most once per LEADSTREAM_API_CACHE_SECONDS per filter: a dashboard left open and
    reloading (or many people opening it) costs Redis and the CPU the worker needs one reading."""
    api, filters, stall_days = request.app[API], _filters(request), _float(request, "stall_days", 14.0)

    async def page() -> str:
        return render("dashboard.html", **await api.dashboard(filters, stall_days))

    key = ("page", filters["owner"], filters["stage"], filters["grade"], filters["hot"], stall_days)
    return web.Response(text=await api.cache.get(key, page), content_type="text/html")


async def lead_page(request: web.Request) -> web.Response:
    lead = await request.app[API].lead(request.match_info["lead_id"])
    if lead is None:
        raise web.HTTPNotFound(text=f"no lead {request.match_info['lead_id']!r}")
    history = charts.line_chart({"score": [(h["ts"] / 86_400_000, h["score"]) for h in lead["history"]]},
                                title="Score over time", x_label="days since 1970 (event time)")
    rates = lead["stage_probabilities"]
    stage_chart = charts.bar_chart([(s[:5], rates.get(s), f"{s}: {pct(rates.get(s))}") for s in STAGES],
                                   title="Win probability per stage (learned)", max_value=1.0, fmt=".0%")
    html = render("lead.html", lead=lead, history_chart=history, stage_chart=stage_chart)
    return web.Response(text=html, content_type="text/html")


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


ROUTES: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/healthz", healthz), ("GET", "/readyz", readyz), ("GET", "/metrics", metrics_route),
    ("GET", "/leads", list_leads), ("GET", "/leads/{lead_id}", get_lead), ("GET", "/funnel", get_funnel),
    ("GET", "/owners", get_owners), ("GET", "/model", get_model), ("GET", "/success-curve", get_success_curve),
    ("POST", "/events", post_events), ("GET", "/", root), ("GET", "/dashboard", dashboard),
    ("GET", "/dashboard/leads/{lead_id}", lead_page),
)


async def _record_auc_forever(api: Api) -> None:
    while True:
        try:
            await api.record_auc()
        except (RedisError, OSError) as exc:
            log.warning("model AUC history: %r", exc)
        await asyncio.sleep(HISTORY_EVERY_S)


def build_app(settings: Settings, client: aioredis.Redis | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware],
                          client_max_size=settings.api_max_body_bytes)
    app[API] = Api(settings, client or aioredis.Redis.from_url(settings.redis_url))
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def background(app: web.Application) -> Any:
        task = asyncio.create_task(_record_auc_forever(app[API]))
        yield
        task.cancel()
        await app[API].close()

    app.cleanup_ctx.append(background)
    return app


def check_bind(settings: Settings) -> str:
    """The address to listen on: without a token only the loopback address is allowed."""
    if settings.api_token:
        return settings.api_bind
    if settings.api_bind not in ("127.0.0.1", "localhost", "::1"):
        from streams.settings import SettingsError

        raise SettingsError(f"LEADSTREAM_API_BIND={settings.api_bind!r}: without LEADSTREAM_API_TOKEN (or "
                            "LEADSTREAM_API_TOKEN_FILE) the api listens on 127.0.0.1 only; set a token to bind elsewhere")
    return settings.api_bind


def run_api(settings: Settings) -> int:
    from streams.logs import configure_logging

    configure_logging(settings)
    host = check_bind(settings)
    if not settings.api_token:
        log.warning("no LEADSTREAM_API_TOKEN: no authentication, listening on %s only", host)
    log.info("leadstream api: dashboard at http://%s:%d/dashboard", host, settings.api_port)
    web.run_app(build_app(settings), host=host, port=settings.api_port, print=None, access_log=None)
    return 0
