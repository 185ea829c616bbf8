"""The input contract: every kind of bad message is rejected with a reason that says what is wrong."""

import json

import orjson
import pytest

from models.events import EVENT_TYPES, RejectedEvent, parse_event, topic_kind_of, validators


def raw(**overrides):
    doc = {"event_id": "e1", "lead_id": "l1", "type": "page_view", "ts": "2026-03-01T10:00:00Z",
           "props": {"url": "/pricing"}}
    doc.update(overrides)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


def test_valid_event_is_parsed_with_ts_in_ms():
    ev = parse_event(b"l1", raw(), topic_kind="web")
    assert (ev.event_id, ev.lead_id, ev.type, ev.ts_ms) == ("e1", "l1", "page_view", 1772359200000)


@pytest.mark.parametrize("key,value,topic_kind,reason", [
    (b"l1", b"{not json", "web", "invalid JSON"),
    (b"l1", b"[1, 2]", "web", "expected a JSON object"),
    (b"l1", None, "web", "empty value"),
    (b"l1", raw(type="teleport"), "web", "unknown event type 'teleport'"),
    (b"l1", raw(props={}), "web", "schema violation at props: 'url' is a required property"),
    (b"l1", raw(event_id=...), "web", "'event_id' is a required property"),
    (b"l1", raw(ts="not-a-timestamp"), "web", "ts 'not-a-timestamp': expected an RFC 3339 string"),
    (b"l1", raw(ts="2026-03-01T10:00:00"), "web", "needs a UTC offset"),
    (b"l1", raw(ts=-5), "web", "schema violation at ts"),
    (None, raw(), "web", "missing key"),
    (b"other", raw(), "web", "does not match lead_id 'l1'"),
    (b"l1", raw(), "crm", "does not belong on the crm topic"),
    (b"l1", raw(type="stage_changed", props={"stage": "won"}), "crm", "schema violation at props/stage"),
    (b"l1", raw(props={"url": "/x" * 40000}), "web", "exceeds the limit of 65536"),
])
def test_bad_messages_are_rejected_with_reason(key, value, topic_kind, reason):
    with pytest.raises(RejectedEvent) as exc:
        parse_event(key, value, topic_kind=topic_kind)
    assert reason in str(exc.value)


def test_every_type_has_a_schema_naming_its_topic():
    for event_type in EVENT_TYPES:
        schema = validators()[event_type].schema
        assert schema["properties"]["type"] == {"const": event_type}
        assert schema["x-topic"] == topic_kind_of(event_type)
    assert json.loads(json.dumps(validators()["lead_created"].schema))["properties"]["props"]["required"] == ["fields"]
