"""Prometheus metrics of the worker and the api process, with bounded labels.

Each process has one registry, :data:`REGISTRY` (``GET /metrics`` renders it with :func:`render`).
The scoring loop calls the small ``observe_*`` functions; values that live elsewhere (consumer
lag, the model's report in Redis) are read when Prometheus scrapes.

>>> reason_label("schema violation at props: 'url' is a required property")
'schema'
>>> reason_label("key b'x' does not match lead_id 'y'")
'key_mismatch'
>>> reason_label("something nobody foresaw")
'other'
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# Dead-letter reasons (models.events.parse_event, the pipeline, the trainer) -> a fixed label set.
_REASONS: tuple[tuple[str, str], ...] = (
    (r"^empty value", "null_value"),
    (r"^value of \d+ bytes exceeds", "too_large"),
    (r"^invalid JSON", "invalid_json"),
    (r"^expected a JSON object", "not_an_object"),
    (r"^unknown event type", "unknown_type"),
    (r"^schema violation", "schema"),
    (r"^ts .*(expected|needs)", "bad_timestamp"),
    (r"does not belong on the \w+ topic", "wrong_topic"),
    (r"^missing key", "missing_key"),
    (r"^key .* does not match lead_id", "key_mismatch"),
    (r"^could not process the event", "processing_error"),
    (r"^trainer could not learn", "training_error"),
)
REASON_LABELS: tuple[str, ...] = tuple(label for _, label in _REASONS) + ("other",)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

EVENTS_IN = Counter("leadstream_events_in", "Input messages read, by input topic.", ["topic"], registry=REGISTRY)
SCORED = Counter("leadstream_scored", "Scores emitted, by what triggered them (event, decay, model).",
                 ["trigger"], registry=REGISTRY)
DEAD_LETTERED = Counter("leadstream_dead_lettered", "Messages sent to the dead-letter topic, by reason class.",
                        ["reason"], registry=REGISTRY)
DUPLICATES = Counter("leadstream_duplicates", "Events ignored because their event_id was already applied.",
                     registry=REGISTRY)
REDELIVERED = Counter("leadstream_redelivered", "Kafka redeliveries of an applied message (outputs sent again).",
                      registry=REGISTRY)
RESCORE_FAILED = Counter("leadstream_rescore_failed", "Leads the model could not rescore (decay or model pass): "
                         "left with their last score; see the worker's log.", registry=REGISTRY)
BATCH_SIZE = Histogram("leadstream_batch_size", "Events per processed batch.", buckets=BATCH_BUCKETS,
                       registry=REGISTRY)
STEP_SECONDS = Histogram("leadstream_step_seconds", "Processing time per event (decode to write), seconds.",
                         buckets=LATENCY_BUCKETS, registry=REGISTRY)
EVENT_TO_SCORE = Histogram("leadstream_event_to_score_seconds",
                           "From the input message's Kafka timestamp to its score being emitted, seconds.",
                           buckets=LATENCY_BUCKETS, registry=REGISTRY)
REDIS_ERRORS = Counter("leadstream_redis_errors", "Redis connection errors and timeouts.", registry=REGISTRY)
REDIS_RETRIES = Counter("leadstream_redis_retries", "Retries of a message after a Redis error or lead contention.",
                        registry=REGISTRY)
MODEL_VERSION = Gauge("leadstream_model_version", "Version of the serving model checkpoint (0 = none yet).",
                      registry=REGISTRY)
MODEL_PASS_VERSION = Gauge("leadstream_model_pass_version",
                           "Model version of the last rescoring pass this worker started (0: none yet).",
                           registry=REGISTRY)
MODEL_PASS_LEFT = Gauge("leadstream_model_pass_leads_left",
                        "Open leads the model rescoring pass under way has still to walk on this worker (0: none "
                        "under way).", registry=REGISTRY)
LEARNER_AUC = Gauge("leadstream_learner_auc",
                    "Prequential ROC AUC per learner (rules, champion, challenger, each tournament learner).",
                    ["learner"], registry=REGISTRY)
LEARNER_OUTCOMES = Gauge("leadstream_learner_outcomes", "Closed deals the model has learned from.", ["outcome"],
                         registry=REGISTRY)
WEBHOOK_EVENTS = Counter("leadstream_webhook_events", "Events received by POST /events, by result.", ["result"],
                         registry=REGISTRY)
HTTP_REQUESTS = Counter("leadstream_http_requests", "HTTP requests, by route and status class.",
                        ["route", "status"], registry=REGISTRY)


def reason_label(reason: str) -> str:
    """The bounded reason class of a dead-letter reason text."""
    for pattern, label in _REASONS:
        if re.search(pattern, reason):
            return label
    return "other"


def observe_in(topic: str) -> None:
    EVENTS_IN.labels(topic).inc()


def observe_dead_letter(reason: str) -> None:
    DEAD_LETTERED.labels(reason_label(reason)).inc()


def observe_scored(trigger: str = "event", n: int = 1) -> None:
    SCORED.labels(trigger).inc(n)


def observe_batch(messages: Sequence[Any], outs: Iterable[Any], counts: Mapping[str, int],
                  seconds: float) -> None:
    """One micro-batch of the scoring loop, once Kafka acknowledged its outputs.

    ``messages`` have ``topic`` and ``timestamp_ms`` (Kafka's record time; ``streams.pipeline.Message``),
    ``outs`` are the records sent (``streams.pipeline.Out``), ``counts`` the pipeline's running
    counters, ``seconds`` the batch's processing time (spread evenly over its events).
    """
    n = len(messages)
    BATCH_SIZE.observe(n)
    now = time.time()
    per_topic: dict[str, int] = {}
    for m in messages:
        per_topic[m.topic] = per_topic.get(m.topic, 0) + 1
    for topic, count in per_topic.items():
        EVENTS_IN.labels(topic).inc(count)
    for m in messages:
        STEP_SECONDS.observe(seconds / n)
        if m.timestamp_ms:
            EVENT_TO_SCORE.observe(max(0.0, now - m.timestamp_ms / 1000))
    for out in outs:
        if out.kind == "dead_letter":
            observe_dead_letter(orjson.loads(out.value).get("error", ""))
    sync_counts(counts)


_seen_counts: dict[str, int] = {}  # the pipeline's counters at the last sync
_COUNTED = {"scored": lambda n: SCORED.labels("event").inc(n), "rescored_decay": lambda n: SCORED.labels("decay").inc(n),
            "rescored_model": lambda n: SCORED.labels("model").inc(n), "duplicate": DUPLICATES.inc,
            "redelivered": REDELIVERED.inc, "rescore_failed": RESCORE_FAILED.inc}


def sync_counts(counts: Mapping[str, int]) -> None:
    """Bring the counters kept by the pipeline (scored, rescored, duplicates, redeliveries, failed
    rescores) up to date.

    >>> before = SCORED.labels("decay")._value.get()
    >>> sync_counts({"rescored_decay": 3}); sync_counts({"rescored_decay": 5})
    >>> SCORED.labels("decay")._value.get() - before
    5.0
    """
    for name, inc in _COUNTED.items():
        delta = counts.get(name, 0) - _seen_counts.get(name, 0)
        if delta > 0:
            inc(delta)
            _seen_counts[name] = counts.get(name, 0)


def observe_retry(redis_error: bool) -> None:
    """A message is retried, after a Redis error (``redis_error``) or lead contention."""
    if redis_error:
        REDIS_ERRORS.inc()
    REDIS_RETRIES.inc()


def set_model_report(report: dict[str, Any] | None) -> None:
    """Model gauges from the trainer's report (``model:report`` in Redis).

    >>> set_model_report({"version": 3, "outcomes": {"won": 2, "lost": 5}, "rules": {"roc_auc": 0.7},
    ...                   "champion": {"roc_auc": 0.8}, "challenger": {"roc_auc": None}})
    >>> MODEL_VERSION._value.get(), LEARNER_AUC.labels("champion")._value.get()
    (3.0, 0.8)
    """
    report = report or {}
    MODEL_VERSION.set(report.get("version", 0))
    for learner in ("rules", "champion", "challenger"):
        auc = (report.get(learner) or {}).get("roc_auc")
        if auc is not None:
            LEARNER_AUC.labels(learner).set(auc)
    for learner, figures in ((report.get("tournament") or {}).get("learners") or {}).items():  # every competitor
        auc = (figures.get("whole") or {}).get("roc_auc")
        if auc is not None:
            LEARNER_AUC.labels(learner).set(auc)
    for outcome, n in (report.get("outcomes") or {}).items():
        LEARNER_OUTCOMES.labels(outcome).set(n)


def set_model_pass(version: int, leads_left: int) -> None:
    """Where this worker's model rescoring pass stands: the version it rolls out, the leads of its
    leaderboard snapshot still to walk (``0``: the leaderboard reflects that model).

    >>> set_model_pass(7, 1200)
    >>> MODEL_PASS_VERSION._value.get(), MODEL_PASS_LEFT._value.get()
    (7.0, 1200.0)
    """
    MODEL_PASS_VERSION.set(version)
    MODEL_PASS_LEFT.set(leads_left)


class LagCollector(Collector):
    """``leadstream_consumer_lag{topic,partition}``, read at scrape time from ``lags()``:
    an iterable of (topic, partition, lag) for the partitions assigned to this process."""

    def __init__(self, lags: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.lags = lags

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("leadstream_consumer_lag", "Messages behind the end of each assigned input "
                                   "partition (highwater - position).", labels=["topic", "partition"])
        for topic, partition, lag in self.lags():
            family.add_metric([topic, str(partition)], lag)
        yield family


def render() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
