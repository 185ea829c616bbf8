"""``leadstream demo``: the whole pipeline on one machine, watched live.

Starts Kafka and Redis (``leadstream up``), a worker, streams simulated traffic into it, and
prints what a sales manager would see appear: scores and grades per event, hot leads, and the
model taking over from the rules as deals close. The stack stays up afterwards
(``leadstream down`` stops it); the worker stops with the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from models.grading import GRADE_NAMES
from models.offline.simulate import simulate
from streams import stack
from streams.clients import kafka_kwargs
from streams.publish import publish_events
from streams.reports import model_report
from streams.settings import Settings
from streams.topics import ensure_topics

REPORT_EVERY_S = 3.0


def start_worker(settings: Settings, log_path: Path, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``leadstream worker`` in the background (``env``: extra variables); return once it reports Ready."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], stdout=log_path.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    while b"[^Worker]: Ready" not in log_path.read_bytes()[offset:]:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_worker(proc)
            tail = log_path.read_bytes()[offset:].decode(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"the worker did not start (exit {proc.poll()}); its log {log_path} ends:\n" + "\n".join(tail))
        time.sleep(0.3)
    return proc


def start_api(settings: Settings, log_path: Path, timeout_s: float = 60.0,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``leadstream api`` in the background (``env``: extra variables; stop it with :func:`stop_worker`);
    return once it listens."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "api"], stdout=log_path.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", settings.api_port), timeout=1):
            return proc
        time.sleep(0.2)
    stop_worker(proc)
    raise RuntimeError(f"leadstream api did not start (exit {proc.poll()}); see {log_path}")


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Board:
    """What the demo prints: counts by grade and source, hot leads, the best leads now."""

    def __init__(self) -> None:
        self.scored = 0
        self.grades: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.latest: dict[str, dict] = {}
        self.hot: list[dict] = []
        self.model_version = 0

    def add_score(self, body: dict) -> None:
        self.scored += 1
        self.sources[body["source"]] += 1
        self.latest[body["lead_id"]] = body
        self.model_version = max(self.model_version, body["model_version"])

    def add_hot(self, body: dict) -> None:
        self.hot.append(body)
        print(f"  HOT  {body['lead_id']:<18} score {body['score']:.2f} grade {body['grade']:<2} "
              f"stage {body['stage'] or '-':<12} because {_why(body)}")

    def summary(self, published: int) -> str:
        grades = Counter(b["grade"] for b in self.latest.values())
        grade_line = "  ".join(f"{g}:{grades.get(g, 0)}" for g in GRADE_NAMES)
        sources = ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))
        return (f"published {published} | scored {self.scored} ({sources}) | model v{self.model_version} | "
                f"leads by grade  {grade_line} | hot {len(self.hot)}")

    def top(self, n: int = 5) -> list[str]:
        best = sorted(self.latest.values(), key=lambda b: -b["score"])[:n]
        return [f"  {b['lead_id']:<18} {b['score']:.2f} {b['grade']:<2} {b['stage'] or '-':<12} {_why(b)}"
                for b in best]


def _why(body: dict) -> str:
    return ", ".join(f"{r['feature']} {r['contribution']:+.2f}" for r in body["reasons"][:3])


async def _at_the_end(consumer: AIOKafkaConsumer, timeout_s: float = 60.0) -> None:
    """Fix the consumer's position at the topics' current end before any traffic: a score sent before
    that was resolved would never be seen, and the demo would wait for it (a cold broker is slow to
    answer, so a fixed pause was not always enough)."""
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the demo's consumer got no partition of the score topics in {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    for tp in consumer.assignment():
        await consumer.position(tp)  # resolves auto_offset_reset="latest" now


async def watch_and_publish(settings: Settings, events: list[dict], rate: float) -> Board:
    board = Board()
    consumer = AIOKafkaConsumer(settings.topic_scores, settings.topic_hot, **kafka_kwargs(settings),
                                group_id=None, auto_offset_reset="latest", enable_auto_commit=False)
    await consumer.start()
    await _at_the_end(consumer)
    publisher = asyncio.create_task(publish_events(settings, events, rate=rate, progress=None))
    expected = {e["event_id"] for e in events}
    seen: set[str] = set()
    deleted = {e["lead_id"] for e in events if e["type"] == "lead_deleted"}
    tombstones: set[str] = set()
    started = last = time.monotonic()
    try:
        while (not publisher.done() or len(seen) + len(tombstones) < len(expected)) and time.monotonic() - started < 900:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    if record.value is None:  # a tombstone: the lead was deleted
                        if record.key is not None and record.key.decode() in deleted:
                            tombstones.add(record.key.decode())
                            board.latest.pop(record.key.decode(), None)
                        continue
                    body = orjson.loads(record.value)
                    if record.topic == settings.topic_hot:
                        board.add_hot(body)
                    elif body["event_id"] in expected:
                        seen.add(body["event_id"])
                        board.add_score(body)
            if time.monotonic() - last > REPORT_EVERY_S:
                last = time.monotonic()
                print(board.summary(len(seen)))
            if publisher.done() and publisher.exception():
                raise publisher.exception()  # type: ignore[misc]
    finally:
        await consumer.stop()
    return board


def run_demo(settings: Settings, leads: int, rate: float, seed: int | None) -> int:
    stack.up(settings)
    asyncio.run(ensure_topics(settings))
    log_path = settings.home / "logs" / "worker.log"
    # A demo has a few hundred deals, not thousands: let the model take part after 20 of each class
    # (unless LEADSTREAM_MODEL_MIN_OUTCOMES says otherwise) so the switch from rules can be watched.
    env = {} if Settings.is_set("model_min_outcomes") else {"LEADSTREAM_MODEL_MIN_OUTCOMES": "20"}
    print(f"worker: starting (log: {log_path}); the model joins the rules after "
          f"{env.get('LEADSTREAM_MODEL_MIN_OUTCOMES', settings.model_min_outcomes)} won and lost deals")
    worker = start_worker(settings, log_path, env=env)
    api = start_api(settings, settings.home / "logs" / "api.log")
    token = f"?token={settings.api_token}" if settings.api_token else ""
    print(f"dashboard while the demo runs: http://127.0.0.1:{settings.api_port}/dashboard{token} "
          f"(afterwards: leadstream api)")
    seed = seed if seed is not None else int(time.time())  # fresh ids each run, or repeatable with --seed
    events = simulate(leads, seed)
    print(f"demo: {leads} simulated leads, {len(events)} events at up to {rate:.0f}/s (seed {seed})")
    try:
        board = asyncio.run(watch_and_publish(settings, events, rate))
    except KeyboardInterrupt:
        return 130
    finally:
        stop_worker(worker)
        stop_worker(api)
    print(board.summary(board.scored))
    print("best leads now (score, grade, stage, top reasons):")
    print("\n".join(board.top()))
    with contextlib.suppress(Exception):
        report = asyncio.run(model_report(settings))
        if report:
            print(f"model v{report['version']}: learned from {report['outcomes']['won']} won and "
                  f"{report['outcomes']['lost']} lost deals; prequential ROC AUC "
                  f"rules {report['rules']['roc_auc']}, model {report['champion']['roc_auc']}")
    print(f"inspect a lead: leadstream lead {next(iter(board.latest), 'LEAD_ID')}   |   stop the stack: leadstream down")
    return 0
