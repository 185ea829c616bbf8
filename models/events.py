"""The input contract: decode one Kafka message into a validated :class:`Event`, or say why not.

Each event type has a JSON Schema in ``models/schemas/<type>.json`` (the published contract);
``x-topic`` there says whether the type belongs on the web or the CRM topic.

>>> ev = parse_event(b"l1", b'{"event_id":"e1","lead_id":"l1","type":"download","ts":1700000000000,'
...                  b'"props":{"asset":"pricing.pdf"}}', topic_kind="web")
>>> ev.type, ev.ts_ms, ev.props["asset"]
('download', 1700000000000, 'pricing.pdf')
>>> parse_event(b"l1", b'{"event_id":"e1"', topic_kind="web")
Traceback (most recent call last):
...
models.events.RejectedEvent: invalid JSON: unexpected end of data: line 1 column 17 (char 16)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft7Validator

STAGES: tuple[str, ...] = ("new", "contacted", "engaged", "qualified", "proposal", "negotiation", "closing")
WEB_TYPES: tuple[str, ...] = ("visit", "page_view", "click", "email_open", "email_click", "download", "form_submit")
CRM_TYPES: tuple[str, ...] = (
    "lead_created", "lead_updated", "stage_changed", "activity_created", "activity_completed",
    "activity_overdue", "email_replied", "deal_won", "deal_lost", "lead_deleted",
)
EVENT_TYPES: tuple[str, ...] = WEB_TYPES + CRM_TYPES


class RejectedEvent(ValueError):
    """The message breaks the contract; ``str(exc)`` is the reason sent to the dead-letter topic."""


@dataclass(frozen=True)
class Event:
    event_id: str
    lead_id: str
    type: str
    ts_ms: int
    props: dict[str, Any] = field(default_factory=dict)


def topic_kind_of(event_type: str) -> str:
    """``'web'`` or ``'crm'``: the input topic an event type belongs on."""
    return "web" if event_type in WEB_TYPES else "crm"


@cache
def schemas() -> dict[str, dict[str, Any]]:
    base = resources.files("models") / "schemas"
    return {t: json.loads((base / f"{t}.json").read_text()) for t in EVENT_TYPES}


@cache
def validators() -> dict[str, Draft7Validator]:
    """Readable validators: used to explain a rejection (slow, so only once a message failed)."""
    return {t: Draft7Validator(schema) for t, schema in schemas().items()}


@cache
def _fast_checks() -> dict[str, Any]:
    """Compiled validators for the hot path (about 20x faster than the readable ones)."""
    return {t: fastjsonschema.compile(schema) for t, schema in schemas().items()}


def parse_ts(ts: Any) -> int:
    """Epoch milliseconds from an int (epoch ms) or an RFC 3339 string.

    >>> parse_ts("2026-01-01T00:00:00Z"), parse_ts(5)
    (1767225600000, 5)
    """
    if isinstance(ts, int) and not isinstance(ts, bool):
        return ts
    try:
        parsed = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        raise RejectedEvent(f"ts {ts!r}: expected an RFC 3339 string or epoch milliseconds") from None
    if parsed.tzinfo is None:
        raise RejectedEvent(f"ts {ts!r}: an RFC 3339 timestamp needs a UTC offset (e.g. Z or +02:00)")
    return int(parsed.timestamp() * 1000)


def parse_event(key: bytes | None, value: bytes | None, *, topic_kind: str, max_bytes: int = 65536) -> Event:
    """Decode and validate one message from the ``topic_kind`` (``'web'``/``'crm'``) input topic."""
    if value is None:
        raise RejectedEvent("empty value (null)")
    if len(value) > max_bytes:
        raise RejectedEvent(f"value of {len(value)} bytes exceeds the limit of {max_bytes}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RejectedEvent(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RejectedEvent(f"expected a JSON object, got {type(doc).__name__}")
    event_type = doc.get("type")
    if event_type not in EVENT_TYPES:
        raise RejectedEvent(f"unknown event type {event_type!r}")
    try:
        _fast_checks()[event_type](doc)
    except fastjsonschema.JsonSchemaException:
        error = next(iter(sorted(validators()[event_type].iter_errors(doc), key=lambda e: e.path)), None)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)" if error else "(root)"
        raise RejectedEvent(f"schema violation at {where}: {error.message if error else 'invalid'}") from None
    if topic_kind_of(event_type) != topic_kind:
        raise RejectedEvent(f"event type {event_type!r} does not belong on the {topic_kind} topic")
    if key is None:
        raise RejectedEvent("missing key: events must be keyed by lead_id")
    if key != doc["lead_id"].encode():
        raise RejectedEvent(f"key {key[:200]!r} does not match lead_id {doc['lead_id']!r}")
    return Event(doc["event_id"], doc["lead_id"], event_type, parse_ts(doc["ts"]), doc.get("props") or {})
