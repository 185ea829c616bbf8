"""The input contract: every kind of bad message is rejected with a reason that says what is wrong."""

import json

import fastjsonschema
import orjson
import pytest

from models.events import EVENT_TYPES, RejectedEvent, _fast_checks, parse_event, schemas, topic_kind_of, validators


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
    # Two visits of 1.7e308 s summed to inf, which JSON stores as null: every later event of the lead failed.
    (b"l1", raw(type="visit", props={"duration_s": 1.7e308}), "web", "schema violation at props/duration_s"),
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


NOW = 1_772_359_200_000  # 2026-03-01T10:00:00Z, the receive time in the event-time tests
DAY_MS = 86_400_000


@pytest.mark.parametrize("ts,reason", [
    (99999999999999999, "after 9999-12-31T23:59:59.999Z"),  # passed the schema and then broke the step
    ("0001-01-01T00:00:00+01:00", "before 1970-01-01"),
    ("1969-12-31T23:59:59Z", "before 1970-01-01"),
    (NOW + DAY_MS + 1, "ahead of the receive time"),
    ("2027-03-01T10:00:00Z", "31536000 s ahead of the receive time"),  # a clock off by a year
])
def test_event_times_out_of_range_or_too_far_ahead_are_rejected(ts, reason):
    with pytest.raises(RejectedEvent) as exc:
        parse_event(b"l1", raw(ts=ts), topic_kind="web", now_ms=NOW, max_future_skew_ms=DAY_MS)
    assert reason in str(exc.value)


@pytest.mark.parametrize("ts", [NOW + DAY_MS, NOW, 0, "1970-01-01T00:00:00Z", "2026-03-02T10:00:00Z"])
def test_event_times_within_the_skew_are_accepted(ts):
    ev = parse_event(b"l1", raw(ts=ts), topic_kind="web", now_ms=NOW, max_future_skew_ms=DAY_MS)
    assert ev.ts_ms <= NOW + DAY_MS


def test_without_a_receive_time_only_the_range_is_checked():
    # History imports and offline evaluation replay old events: no clock to compare with.
    assert parse_event(b"l1", raw(ts="9999-12-31T23:59:59Z"), topic_kind="web").ts_ms == 253402300799000


@pytest.mark.parametrize("ts", [0, 5, -1, 5.0, 5.5, True, None, "", "2026-03-01", "x" * 41, [1], {"a": 1}])
def test_the_fast_checks_give_the_published_schemas_verdict(ts):
    # The compiled checks read the ts oneOf (string or integer) as anyOf: the same verdict, cheaper.
    for event_type in ("page_view", "lead_created"):
        doc = orjson.loads(raw(type=event_type, ts=ts, props={"url": "/", "fields": {}}))
        as_published = fastjsonschema.compile(schemas()[event_type])
        verdicts = [_passes(_fast_checks()[event_type], doc), _passes(as_published, doc),
                    validators()[event_type].is_valid(doc)]
        assert verdicts in ([True] * 3, [False] * 3), (event_type, ts, verdicts)


def _passes(check, doc):
    try:
        check(doc)
        return True
    except fastjsonschema.JsonSchemaException:
        return False
