"""The worker's own HTTP routes: metrics, health and the model report (no dashboards here:
those are ``leadstream api``'s, so reading them never competes with scoring).

``/healthz`` is open; the other routes need ``Authorization: Bearer <LEADSTREAM_API_TOKEN>``
when a token is set.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import faust
import faust.web
from redis.exceptions import RedisError

from streams.clients import redis_readiness
from streams import metrics
from streams.pipeline import EventPipeline
from streams.settings import Settings
from streams.state import ModelStore

View = Callable[[faust.web.Web, faust.web.Request], Awaitable[faust.web.Response]]


def authorized(request: faust.web.Request, token: str) -> bool:
    """Whether the request carries the token (always true when no token is set)."""
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


async def kafka_reachable(bootstrap: str, timeout_s: float = 2.0) -> str:
    """"ok" when a TCP connection to one of the bootstrap servers opens, else why not."""
    errors = []
    for hostport in bootstrap.split(","):
        host, _, port = hostport.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
            writer.close()
            return "ok"
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(f"{hostport}: {exc!r}")
    return "unreachable: " + "; ".join(errors)


def register_web(app: faust.App, settings: Settings, pipeline: EventPipeline, models: ModelStore,
                 lags: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
    """``/metrics``, ``/healthz``, ``/readyz``, ``/model`` and ``/health`` on the worker's web server;
    ``lags`` gives (topic, partition, lag) of the input partitions this worker holds (a worker that
    only trains is ready without any)."""
    metrics.REGISTRY.register(metrics.LagCollector(lambda: list(lags())))

    def page(path: str, open_: bool = False) -> Callable[[View], View]:
        def wrap(view: View) -> View:
            async def guarded(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
                if not open_ and not authorized(request, settings.api_token):
                    return web.json({"error": "missing or wrong token: send Authorization: Bearer "
                                              "<LEADSTREAM_API_TOKEN>"}, status=401)
                return await view(web, request)

            guarded.__name__ = view.__name__
            app.page(path)(guarded)
            return view

        return wrap

    @page("/healthz", open_=True)
    async def healthz(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json({"ok": True})

    @page("/readyz")
    async def readyz(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        checks: dict[str, Any] = {}
        checks["redis"] = await redis_readiness(models.client)
        checks["kafka"] = await kafka_reachable(settings.kafka_bootstrap)
        assigned = [f"{t}/{p}" for t, p, _ in lags()]
        if settings.runs("scoring"):
            checks["partitions"] = "ok" if assigned else "no input partitions assigned to this worker (yet)"
        ready = all(v == "ok" for v in checks.values())
        return web.json({"ready": ready, "checks": checks, "assigned": assigned}, status=200 if ready else 503)

    @page("/metrics")
    async def metrics_view(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        metrics.sync_counts(pipeline.counts)  # rescoring runs between batches
        try:
            metrics.set_model_report(await models.report())
        except RedisError:
            metrics.observe_redis_error(retry=False)
        body, content_type = metrics.render()
        # text/plain is Prometheus' text format (aiohttp refuses the full content type with its parameters).
        return web.bytes(body, content_type=content_type.split(";")[0].strip())

    @page("/model")
    async def model_report(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json(await models.report() or {"version": 0})

    @page("/health")
    async def health(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json({"ok": True, "counts": dict(pipeline.counts)})

    @page("/dashboard")
    async def dashboard(web: faust.web.Web, request: faust.web.Request) -> faust.web.Response:
        return web.json({"moved": f"the dashboard is served by `leadstream api` on port {settings.api_port}"},
                        status=404)
