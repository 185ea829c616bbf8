"""Fold events into a lead's state, and read features off that state. Pure functions, no I/O.

The state is a JSON-able dict (it lives in Redis between events). :func:`fold` is the
``(state, event) -> state`` step; it never mutates its input. Out-of-order events are safe:
counts include them, but recency, decay reference time, stage and explicit fields only move
forward in event time (per-field timestamps guard the explicit fields).

>>> from models.events import Event
>>> s = fold(new_state("l1"), Event("e1", "l1", "download", 1_000_000, {"asset": "a.pdf"}), half_life_s=3600)
>>> s = fold(s, Event("e2", "l1", "download", 1_000_000 + 3_600_000, {}), half_life_s=3600)
>>> s["counts"]["download"], round(s["decayed"]["download"], 3)
(2, 1.5)
"""

from __future__ import annotations

import time
import zlib
from functools import lru_cache
from typing import Any

import orjson

from models import kernels
from models.events import EVENT_TYPES, STAGES, WEB_TYPES, Event
from models.fields import FieldPolicy

State = dict[str, Any]
Features = dict[str, float | str]

# Events the lead itself starts: they define "last touch" (recency); CRM bookkeeping does not.
TOUCH_TYPES = frozenset(WEB_TYPES) | {"email_replied"}
# Bounds that keep a lead's stored state small whatever it does (issue: memory per lead must not
# grow with its events): distinct pages and sessions as sets of 32-bit hashes, the latest activities.
MAX_PAGES = 100
MAX_ACTIVITIES = 50
# An explicit number beyond this is taken as this (its sign kept): a field of 1e308 overflowed the
# model's sums to inf (an OverflowError or a NaN score); no revenue or head count comes near it.
MAX_FIELD_NUMBER = 1e15
_DIGITS = [str(i) for i in range(13)]
STAGE_INDEX = {s: i for i, s in enumerate(STAGES)}


def new_state(lead_id: str) -> State:
    return {
        "lead_id": lead_id, "created_ts": None, "first_ts": None, "last_ts": None, "last_touch_ts": None,
        "counts": {}, "decayed": {}, "decay_ref_ts": None,
        "sessions": (), "pages": (), "visit_duration_s": 0.0,
        "fields": {}, "fields_ts": {},
        "stage": None, "stage_ts": None, "stages_visited": (),
        "activities": {}, "outcome": None, "closed_ts": None,
    }


def fold(state: State, event: Event, *, half_life_s: float, copy: bool = True) -> State:
    """Return the state after ``event``; ``state`` is left unchanged unless ``copy`` is False."""
    s = copy_state(state) if copy else state
    ts = event.ts_ms
    # Conditionals, not min/max calls (the hot path): the same values.
    first, last = s["first_ts"], s["last_ts"]
    s["first_ts"] = ts if first is None or ts < first else first
    s["last_ts"] = ts if last is None or ts > last else last
    s["counts"][event.type] = s["counts"].get(event.type, 0) + 1
    _fold_decay(s, event.type, ts, half_life_s)
    if event.type in TOUCH_TYPES:
        touch = s["last_touch_ts"]
        s["last_touch_ts"] = ts if touch is None or ts > touch else touch
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(s, event)
    return s


# A state's arrays held as tuples (replaced by the fold, never appended to: see load_state).
_TUPLE_KEYS = ("sessions", "pages", "stages_visited", "reasons")


def load_state(raw: bytes) -> State:
    """A stored state from its JSON, its arrays as the fold and the scoring write them: tuples.

    A tuple of numbers and strings leaves the garbage collector's care, and a dict holding only such
    values does too: a scoring worker keeps thousands of leads' states in memory (streams.pipeline's
    lead cache), whose lists made its full collections pauses of 80-90 ms. The JSON is the same.

    >>> s = load_state(b'{"pages":["a"],"activities":{"x":["open",1,"call"]},"history":[[1,0.5,"C","event"]]}')
    >>> s["pages"], s["activities"], s["history"]
    (('a',), {'x': ('open', 1, 'call')}, ((1, 0.5, 'C', 'event'),))
    >>> orjson.dumps(s) == orjson.dumps(orjson.loads(orjson.dumps(s)))
    True
    """
    s = orjson.loads(raw)
    for key in _TUPLE_KEYS:
        value = s.get(key)
        if value:
            s[key] = tuple(value)
    activities = s.get("activities")
    if activities:
        s["activities"] = {k: tuple(v) for k, v in activities.items()}
    history = s.get("history")
    if history:
        s["history"] = tuple(map(tuple, history))
    return s


def copy_state(state: State) -> State:
    """A deep copy (~20x faster than ``copy.deepcopy`` for JSON data), in the form a stored state is
    loaded in (:func:`load_state`: its arrays as tuples)."""
    return load_state(orjson.dumps(state))


def _fold_decay(s: State, event_type: str, ts: int, half_life_s: float) -> None:
    """Exponentially decayed counts, kept as of ``decay_ref_ts`` (the newest event time seen)."""
    ref = s["decay_ref_ts"]
    decayed = s["decayed"]
    if ref is None or ts >= ref:
        if ref is not None and ts > ref:
            factor = 0.5 ** ((ts - ref) / 1000 / half_life_s)
            # rounded: a lead's state is stored as JSON, and 17-digit floats double its size
            kernels.IMPL.decay_all(decayed, factor)
        s["decay_ref_ts"] = ts
        decayed[event_type] = decayed.get(event_type, 0.0) + 1.0
    else:  # a late event: add it with the weight it has at the reference time
        decayed[event_type] = round(decayed.get(event_type, 0.0) + 0.5 ** ((ref - ts) / 1000 / half_life_s), 5)


def _on_visit(s: State, e: Event) -> None:
    sid = e.props.get("session_id")
    if sid:
        sid = _short_hash(str(sid))
        if sid not in s["sessions"] and len(s["sessions"]) < MAX_PAGES:
            s["sessions"] = (*s["sessions"], sid)
    s["visit_duration_s"] += float(e.props.get("duration_s", 0.0))
    s["visit_pages"] = s.get("visit_pages", 0) + float(e.props.get("pages", 0))


def _short_hash(text: str) -> str:
    return format(zlib.crc32(text.encode()), "08x")


def _on_page_view(s: State, e: Event) -> None:
    page = _short_hash(e.props["url"])
    if page not in s["pages"] and len(s["pages"]) < MAX_PAGES:
        s["pages"] = (*s["pages"], page)


def _on_fields(s: State, e: Event) -> None:
    if e.type == "lead_created":
        s["created_ts"] = e.ts_ms if s["created_ts"] is None else min(s["created_ts"], e.ts_ms)
    for name, value in e.props["fields"].items():
        if e.ts_ms < s["fields_ts"].get(name, -1):
            continue  # an older update must not overwrite a newer value
        s["fields_ts"][name] = e.ts_ms
        if value is None:
            s["fields"].pop(name, None)
        else:
            s["fields"][name] = value


def _on_stage(s: State, e: Event) -> None:
    stage = e.props["stage"]
    if stage not in s["stages_visited"]:
        s["stages_visited"] = (*s["stages_visited"], stage)
    if s["stage_ts"] is None or e.ts_ms >= s["stage_ts"]:
        s["stage"], s["stage_ts"] = stage, e.ts_ms


def _on_activity(s: State, e: Event) -> None:
    status = e.type.removeprefix("activity_")
    if status == "created":
        status = "open"
    acts = s["activities"]
    activity = _short_hash(e.props["activity_id"])  # the CRM's id may be long: a lead keeps 8 characters
    current = acts.get(activity)
    if current is not None and e.ts_ms < current[1]:
        return
    acts[activity] = (status, e.ts_ms, e.props["kind"])
    if len(acts) > MAX_ACTIVITIES:  # forget the oldest
        del acts[min(acts, key=lambda k: acts[k][1])]


def _on_outcome(s: State, e: Event) -> None:
    s["outcome"] = "won" if e.type == "deal_won" else "lost"
    s["closed_ts"] = e.ts_ms


_HANDLERS = {
    "visit": _on_visit, "page_view": _on_page_view,
    "lead_created": _on_fields, "lead_updated": _on_fields,
    "stage_changed": _on_stage,
    "activity_created": _on_activity, "activity_completed": _on_activity, "activity_overdue": _on_activity,
    "deal_won": _on_outcome, "deal_lost": _on_outcome,
}


def features(state: State, now_ms: int, *, half_life_s: float, fields: FieldPolicy | None = None) -> Features:
    """Static and dynamic features of a lead as of ``now_ms`` (the scored event's time).

    Static: creation month and weekday, the explicit fields (country, source, industry...) and how many
    of them are known (``fields_known``, flags aside: a form left blank says something).
    Dynamic: stage, time in stage, stages visited, activities, counts, decayed counts, recency.
    Absent information is an absent key: models must cope with features that come and go.
    With a ``fields`` policy, private fields (identifiers, see :mod:`models.fields`) are left out.

    >>> f = features(new_state("l1"), 0, half_life_s=60)
    >>> f["events_total"], "stage" in f
    (0.0, False)
    >>> s = new_state("l1") | {"fields": {"email": "a@b.c", "Country": " DE "}}
    >>> features(s, 0, half_life_s=60, fields=FieldPolicy())["f_Country"], "f_email" in features(s, 0, half_life_s=60, fields=FieldPolicy())
    ('de', False)
    """
    f: Features = {}
    created = state["created_ts"] if state["created_ts"] is not None else state["first_ts"]
    if created is not None:
        f["created_month"], f["created_weekday"] = created_parts(created // 1000)
        age = (now_ms - created) / 86_400_000
        f["age_days"] = age if age > 0.0 else 0.0  # max(0.0, age) without the call; NaN -> 0.0 as max gives
    explicit, known = explicit_features(state["fields"], fields)
    f.update(explicit)
    f["fields_known"] = known
    kernels.IMPL.dynamic_features(f, state, now_ms, half_life_s, COUNT_KEYS, STAGE_INDEX)
    return f


def explicit_features(values: dict[str, Any], policy: FieldPolicy | None) -> tuple[dict[str, float | str], float]:
    """The explicit fields' features and how many of them have a value, flags aside (how much of the
    form the lead filled in). Memoised by the fields' JSON: they change only on a lead's CRM updates.

    >>> explicit_features({"Country": " DE ", "email": "a@b.c", "vip": True, "size": 3}, FieldPolicy())
    ({'f_Country': 'de', 'f_vip': 'true', 'f_size': 3.0}, 2.0)
    """
    key = explicit_key(values)
    if key is not None:
        hit = _EXPLICIT.get((id(policy), key))
        if hit is not None and hit[0] is policy:  # the entry holds the policy: its id is not reused
            return hit[1], hit[2]
    out: dict[str, float | str] = {}
    known = 0
    for name, value in values.items():
        if policy is not None and policy.is_private(name):
            continue
        out[_field_key(name)] = _field_value(value)
        known += value.__class__ is not bool
    if key is not None:
        if len(_EXPLICIT) >= _EXPLICIT_SIZE:
            _EXPLICIT.clear()
        _EXPLICIT[id(policy), key] = (policy, out, float(known))
    return out, float(known)


def explicit_key(values: dict[str, Any]) -> bytes | None:
    """The fields as JSON (true, 1 and 1.0 apart), or None where JSON could confuse two values: a type
    other than str/int/float/bool (orjson writes a datetime as a string), or a NaN or infinity (null)."""
    if not values or not set(map(type, values.values())) <= _JSON_SCALARS:
        return None
    blob = orjson.dumps(values)
    return None if b"null" in blob else blob


_JSON_SCALARS = frozenset({str, int, float, bool})
# (policy id, fields JSON) -> (policy, features, known): a lead's fields come back with each of its events.
_EXPLICIT: dict[tuple[int, bytes], tuple[FieldPolicy | None, dict[str, float | str], float]] = {}
_EXPLICIT_SIZE = 8192  # leads whose fields are remembered: a batch's leads, and then some


# Memos for the hot path: the same few names and values come back with every event (bounded).
@lru_cache(maxsize=10_000)
def _field_key(name: str) -> str:
    return "f_" + name


# Each event type's count and decayed count features (a dict: the dynamic_features kernel reads it per type).
COUNT_KEYS = {t: ("n_" + t, "d_" + t) for t in EVENT_TYPES}


def _field_value(value: Any) -> float | str:
    """An explicit field as a feature: strings trimmed and lower-cased, numbers as floats within
    :data:`MAX_FIELD_NUMBER`.

    >>> _field_value(" DE "), _field_value(True), _field_value(3), _field_value(-1.7e308)
    ('de', 'true', 3.0, -1000000000000000.0)
    """
    if value.__class__ is str:
        return _normalised(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if -MAX_FIELD_NUMBER <= value <= MAX_FIELD_NUMBER:
            return float(value)
        return MAX_FIELD_NUMBER if value > 0 else -MAX_FIELD_NUMBER
    return str(value).strip().lower()


@lru_cache(maxsize=100_000)
def _normalised(value: str) -> str:
    return value.strip().lower()


@lru_cache(maxsize=4096)
def created_parts(seconds: int) -> tuple[str, str]:
    tm = time.gmtime(seconds)
    return _DIGITS[tm.tm_mon], _DIGITS[tm.tm_wday + 1]
