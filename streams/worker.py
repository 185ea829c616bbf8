"""``leadstream worker``: create the topics, then run the Faust worker with the agents."""

from __future__ import annotations

import asyncio
import gc

import faust

from streams.agents import register_agents
from streams.app import create_app
from streams.clients import check_connections
from streams.logs import handler
from streams.priority import lower_this_process
from streams.settings import Settings
from streams.topics import ensure_topics


def build_app(settings: Settings) -> faust.App:
    app = create_app(settings)
    register_agents(app, settings)
    return app


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    if settings.worker_roles == "training":  # first: every thread started from here on inherits it
        lower_this_process(settings.trainer_nice)
    (settings.home / "worker-data").mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    if settings.event_loop == "uvloop":  # every loop of this process, Faust's included
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(check_connections(settings))  # a wrong password or CA: one clear line, not a retry loop
    asyncio.run(ensure_topics(settings))
    app = build_app(settings)
    # JSON lines when LEADSTREAM_LOG_FORMAT=json: Faust's own handler is replaced by ours.
    handlers = [handler(settings)] if settings.log_format == "json" else None
    if handlers:
        app.conf.loghandlers = handlers
    worker = faust.Worker(app, loglevel=loglevel, logging_config=_json_logging(loglevel) if handlers else None)
    quiet_collector()
    worker.execute_from_commandline()  # returns when the worker stops (SIGTERM / Ctrl-C)
    return 0


def _json_logging(loglevel: str) -> dict:
    """A dictConfig that leaves the root logger without Faust's text handler (ours is added after)."""
    return {"version": 1, "disable_existing_loggers": False,
            "root": {"level": loglevel.upper(), "handlers": []}}


def quiet_collector() -> None:
    """Keep full garbage collections from pausing the event loop for a tenth of a second.

    Everything loaded by now (modules, Faust, River, scikit-learn: ~150,000 objects) lives as long
    as the process. Frozen, it is out of the collector's reach: a full collection walks only what
    was made since. Measured in one scoring worker on a burst of 30,000 events: 6 full collections
    of 190-356 ms each (1.6 s in all) during the burst before, 6 of at most 26 ms (91 ms) after.
    """
    gc.collect()
    gc.freeze()
