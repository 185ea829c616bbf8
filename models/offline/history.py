"""Historical exports (one row per lead) to contract events, driven by a TOML mapping.

Pure: rows come in as ``(line, row)`` pairs. The file side (reading CSV or JSON Lines, spilling the
sorted runs of a long export to temporary files) is :mod:`streams.offline`.
The mapping format is documented in ``deploy/mappings/README.md``. Each good row becomes, in order:
``lead_created`` (explicit fields), the behavioural events (counts expanded into that many events,
totals and rates carried as props of those events), then ``deal_won``/``deal_lost`` unless the
outcome is empty (still open). Rows are sorted by the order column (stable); every event id is
``{lead_id}:{line}:{k}``, so importing the same file again is deduplicated downstream.

>>> mapping = load_mapping('''
... [lead]
... id = "id"
... order = "n"
... [outcome]
... column = "won"
... positive = "1"
... [explicit]
... "Country" = "country"
... [behaviour]
... "Visits" = { event = "visit", as = "count" }
... "Seconds" = { event = "visit", as = "total", prop = "duration_s" }
... ''')
>>> rows = [{"id": "b", "n": "2", "won": "", "Country": "", "Visits": "1", "Seconds": "30"},
...         {"id": "a", "n": "1", "won": "1", "Country": "India", "Visits": "2", "Seconds": "90"},
...         {"id": "", "n": "3", "won": "0", "Country": "", "Visits": "x", "Seconds": "0"}]
>>> for r in rows_to_events(enumerate(rows, start=2), mapping):
...     print(r.line, r.error or [(e["type"], e["props"]) for e in r.events])
4 column 'id' (lead id): missing; column 'Visits' (visit count): 'x' is not a whole number >= 0
3 [('lead_created', {'fields': {'country': 'India'}}), ('visit', {'duration_s': 45.0}), \
('visit', {'duration_s': 45.0}), ('deal_won', {})]
2 [('lead_created', {'fields': {}}), ('visit', {'duration_s': 30.0})]
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any


from models.events import WEB_TYPES, parse_ts, validators

BAD_LINE = "__bad_line__"  # key of a row the file reader could not parse; its value is the reason
ROW_ID = "@row"  # [lead] id = "@row": the export has no id column, the lead id is "row-{line}"
RUN_ROWS = 50_000  # rows sorted in memory at once; longer exports are sorted in runs spilled to disk
BEHAVIOUR_EVENTS = (*WEB_TYPES, "email_replied")
TABLES = ("lead", "outcome", "values", "explicit", "behaviour", "drop")
DEFAULT_START = "2026-01-01T00:00:00Z"
Row = MappingABC[str, Any]


class MappingError(ValueError):
    """The mapping file is invalid; the message names the key and the expected form."""


@dataclass(frozen=True)
class Explicit:
    column: str
    field: str
    type: str = "string"  # "string" | "number" | "bool"
    private: bool = False  # kept in the lead's state, never a model feature (see models/fields.py)


@dataclass(frozen=True)
class Behaviour:
    column: str
    event: str
    kind: str  # "count" | "total" | "rate"
    prop: str | None = None
    integer: bool = False
    props: dict[str, Any] = field(default_factory=dict)
    max: int = 1000


@dataclass(frozen=True)
class Mapping:
    """A validated mapping; build it with :func:`load_mapping`."""

    id_column: str
    outcome_column: str
    positive: frozenset[str]
    negative: frozenset[str] | None = None
    order_column: str | None = None
    order_kind: str = "sequence"
    start_ms: int = 1_767_225_600_000
    row_gap_s: float = 60.0
    missing: frozenset[str] = frozenset({""})
    true_values: frozenset[str] = frozenset({"yes", "true", "1"})
    false_values: frozenset[str] = frozenset({"no", "false", "0"})
    explicit: tuple[Explicit, ...] = ()

    @property
    def private_fields(self) -> list[str]:
        """Fields the mapping marks ``private = true``: the model must never learn them."""
        return [e.field for e in self.explicit if e.private]
    behaviour: tuple[Behaviour, ...] = ()
    drop: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> set[str]:
        """Every column the mapping reads."""
        cols = {self.outcome_column} | ({self.id_column} - {ROW_ID}) | {e.column for e in self.explicit}
        cols |= {b.column for b in self.behaviour}
        return cols | ({self.order_column} if self.order_column else set())


@dataclass(frozen=True)
class RowResult:
    """One input row: its events, or the reason it was rejected (then ``events`` is empty)."""

    line: int
    lead_id: str | None
    events: list[dict[str, Any]]
    error: str | None = None


# ---------------------------------------------------------------- mapping


def _where(table: str, *keys: str) -> str:
    path = "".join("." + (k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'"{k}"') for k in keys)
    return f"mapping [{table}]{path}"


def _fail(where: str, problem: str, expected: str) -> MappingError:
    return MappingError(f"{where}: {problem}; expected {expected}")


def _only(table: str, doc: dict[str, Any], allowed: Iterable[str], *keys: str) -> None:
    allowed = tuple(allowed)
    for key in doc:
        if key not in allowed:
            raise _fail(_where(table, *keys, key), "unknown key", "one of " + ", ".join(allowed))


def _str(table: str, doc: dict[str, Any], key: str, expected: str, *, required: bool = True,
         keys: tuple[str, ...] = ()) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _fail(_where(table, *keys, key), "missing", expected)
        return None
    if not isinstance(value, str) or not value:
        raise _fail(_where(table, *keys, key), f"{value!r} is not a non-empty string", expected)
    return value


def _str_set(table: str, doc: dict[str, Any], key: str, expected: str, default: Iterable[str] | None,
             *, required: bool = False) -> frozenset[str] | None:
    """A string or list of strings, lower-cased (cells are compared case-insensitively)."""
    value = doc.get(key)
    if value is None:
        if required:
            raise _fail(_where(table, key), "missing", expected)
        return None if default is None else frozenset(default)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _fail(_where(table, key), f"{value!r} is not a string or a list of strings", expected)
    return frozenset(v.strip().lower() for v in values)


def _required_props(event: str) -> list[str]:
    return list(validators()[event].schema["properties"].get("props", {}).get("required", []))


def _explicit_spec(column: str, spec: Any) -> Explicit:
    where = _where("explicit", column)
    form = 'a field name such as "country", or { field = "age", type = "number" } (type: string, number, bool)'
    if isinstance(spec, str) and spec:
        return Explicit(column, spec)
    if not isinstance(spec, dict):
        raise _fail(where, f"{spec!r} is not a field name or a table", form)
    _only("explicit", spec, ("field", "type", "private"), column)
    name = _str("explicit", spec, "field", form, keys=(column,))
    kind = spec.get("type", "string")
    if kind not in ("string", "number", "bool"):
        raise _fail(where + ".type", f"{kind!r} is not allowed", '"string", "number" or "bool"')
    private = spec.get("private", False)
    if not isinstance(private, bool):
        raise _fail(where + ".private", f"{private!r} is not allowed", "true or false")
    return Explicit(column, name or "", kind, private)


def _behaviour_spec(column: str, spec: Any) -> Behaviour:
    where = _where("behaviour", column)
    form = '{ event = "visit", as = "count" | "total" | "rate", prop = "duration_s" } (see deploy/mappings/README.md)'
    if not isinstance(spec, dict):
        raise _fail(where, f"{spec!r} is not a table", form)
    _only("behaviour", spec, ("event", "as", "prop", "integer", "props", "max"), column)
    event = spec.get("event")
    if event not in BEHAVIOUR_EVENTS:
        problem = "missing" if event is None else f"{event!r} is not allowed"
        raise _fail(where + ".event", problem, "one of " + ", ".join(BEHAVIOUR_EVENTS))
    kind = spec.get("as")
    if kind not in ("count", "total", "rate"):
        problem = "missing" if kind is None else f"{kind!r} is not allowed"
        raise _fail(where + ".as", problem, '"count" (N events), "total" (split over the events) or "rate" '
                    "(the value of each event)")
    prop = spec.get("prop")
    if kind == "count" and prop is not None:
        raise _fail(where + ".prop", "not used with as = \"count\"", "no prop (constant props go in props = {...})")
    if kind != "count" and (not isinstance(prop, str) or not prop):
        raise _fail(where + ".prop", "missing" if prop is None else f"{prop!r} is not a name",
                    f'the name of the {event} prop that carries the value, e.g. "duration_s"')
    integer = spec.get("integer", False)
    if not isinstance(integer, bool):
        raise _fail(where + ".integer", f"{integer!r} is not a boolean", "true or false")
    props = spec.get("props", {})
    if not isinstance(props, dict) or not all(isinstance(v, (str, int, float, bool)) for v in props.values()):
        raise _fail(where + ".props", f"{props!r} is not a table of constants", 'e.g. props = { url = "/" }')
    limit = spec.get("max", 1000)
    if kind != "count" and "max" in spec:
        raise _fail(where + ".max", 'only used with as = "count"', "no max")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise _fail(where + ".max", f"{limit!r} is not a whole number >= 0", "the largest count accepted per row")
    absent = [p for p in _required_props(event) if p not in props and p != prop]
    if absent:
        raise _fail(where + ".props", f"{event} events need {', '.join(absent)}",
                    f"props = {{ {absent[0]} = \"...\" }} giving a constant value")
    return Behaviour(column, event, kind, prop, integer, dict(props), limit)


def load_mapping(source: str | dict[str, Any]) -> Mapping:
    """Validate a mapping given as TOML text (or the parsed dict).

    Raises
    ------
    MappingError
        Naming the offending key and the expected form.

    Examples
    --------
    >>> load_mapping('[lead]\\nid = "Prospect ID"\\n[outcome]\\ncolumn = "Converted"')
    Traceback (most recent call last):
    ...
    models.offline.history.MappingError: mapping [outcome].positive: missing; expected the value of column 'Converted' that means won
    """
    if isinstance(source, str):
        try:
            doc = tomllib.loads(source)
        except tomllib.TOMLDecodeError as exc:
            raise MappingError(f"mapping: not valid TOML: {exc}") from None
    else:
        doc = source
    for table in doc:
        if table not in TABLES:
            raise _fail(f"mapping [{table}]", "unknown table", "one of " + ", ".join(f"[{t}]" for t in TABLES))
        if not isinstance(doc[table], dict):
            raise _fail(f"mapping [{table}]", "not a table", f"a [{table}] section")
    lead, outcome, values = doc.get("lead", {}), doc.get("outcome", {}), doc.get("values", {})
    _only("lead", lead, ("id", "order", "order_kind", "start", "row_gap_s"))
    _only("outcome", outcome, ("column", "positive", "negative"))
    _only("values", values, ("missing", "true", "false"))
    id_column = _str("lead", lead, "id", "the name of the column holding the lead id "
                     f"(or \"{ROW_ID}\": the row's line number, for an export without one)")
    order = _str("lead", lead, "order", "the name of the column giving arrival order", required=False)
    order_kind = lead.get("order_kind", "sequence")
    if order_kind not in ("sequence", "time"):
        raise _fail(_where("lead", "order_kind"), f"{order_kind!r} is not allowed",
                    '"sequence" (numbers giving arrival order) or "time" (RFC 3339 or epoch ms)')
    start = _str("lead", lead, "start", "an RFC 3339 time such as 2026-01-01T00:00:00Z", required=False) \
        or DEFAULT_START
    try:
        start_ms = parse_ts(start)
    except ValueError:
        raise _fail(_where("lead", "start"), f"{start!r} is not a time", "an RFC 3339 time such as "
                    "2026-01-01T00:00:00Z") from None
    gap = lead.get("row_gap_s", 60)
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0:
        raise _fail(_where("lead", "row_gap_s"), f"{gap!r} is not a number > 0", "seconds between rows, e.g. 60")
    column = _str("outcome", outcome, "column", "the name of the column holding the outcome")
    positive = _str_set("outcome", outcome, "positive", f"the value of column {column!r} that means won", None,
                        required=True)
    negative = _str_set("outcome", outcome, "negative", f"the values of column {column!r} that mean lost", None)
    missing = _str_set("values", values, "missing", 'a list of cell values meaning "absent"', [""])
    true_values = _str_set("values", values, "true", "a list of cell values meaning true", ["yes", "true", "1"])
    false_values = _str_set("values", values, "false", "a list of cell values meaning false", ["no", "false", "0"])
    explicit = tuple(_explicit_spec(c, s) for c, s in doc.get("explicit", {}).items())
    behaviour = tuple(_behaviour_spec(c, s) for c, s in doc.get("behaviour", {}).items())
    _check_consistency(explicit, behaviour)
    drop = doc.get("drop", {})
    for col, reason in drop.items():
        if not isinstance(reason, str) or not reason.strip():
            raise _fail(_where("drop", col), f"{reason!r} is not a reason", "a short string saying why the column "
                        "is left out, e.g. \"filled in after contact: leaks the outcome\"")
    used = {id_column, column, order} | {e.column for e in explicit} | {b.column for b in behaviour}
    for col in drop:
        if col in used:
            raise _fail(_where("drop", col), "the column is also used by the mapping",
                        "a column that no other table reads")
    return Mapping(id_column or "", column or "", positive or frozenset(), negative, order, order_kind,
                   start_ms, float(gap), missing or frozenset(), true_values or frozenset(),
                   false_values or frozenset(), explicit, behaviour, dict(drop))


def _check_consistency(explicit: tuple[Explicit, ...], behaviour: tuple[Behaviour, ...]) -> None:
    seen: dict[str, str] = {}
    for e in explicit:
        if e.field in seen:
            raise _fail(_where("explicit", e.column), f"field {e.field!r} is already set by column {seen[e.field]!r}",
                        "one column per field")
        seen[e.field] = e.column
    props: dict[tuple[str, str], str] = {}
    for b in behaviour:
        if b.prop is None:
            continue
        if (b.event, b.prop) in props:
            raise _fail(_where("behaviour", b.column, "prop"),
                        f"{b.event}.{b.prop} is already set by column {props[b.event, b.prop]!r}",
                        "one column per event prop")
        props[b.event, b.prop] = b.column


# ---------------------------------------------------------------- rows


def check_columns(columns: set[str], mapping: Mapping, source: str) -> list[str]:
    """Warnings for ``columns`` (a history's, as read from ``source``) the mapping ignores.

    >>> m = load_mapping({"lead": {"id": "id"}, "outcome": {"column": "won", "positive": "1"}})
    >>> check_columns({"id", "won", "notes"}, m, "leads.csv")
    ["column 'notes' is neither mapped nor in [drop]: ignored"]
    >>> check_columns({"id"}, m, "leads.csv")
    Traceback (most recent call last):
    ...
    models.offline.history.MappingError: columns not in leads.csv: 'won'

    Raises
    ------
    MappingError
        The mapping names columns that are not there.
    """
    absent = sorted(mapping.columns - columns)
    if absent:
        raise MappingError(f"columns not in {source}: {', '.join(map(repr, absent))}")
    unmapped = sorted(columns - mapping.columns - set(mapping.drop))
    return [f"column {c!r} is neither mapped nor in [drop]: ignored" for c in unmapped]


def _cell(row: Row, column: str, mapping: Mapping) -> Any:
    """The value of a cell, or None when it is absent (a missing value)."""
    value = row.get(column)
    if isinstance(value, str):
        value = value.strip()
        return None if value.lower() in mapping.missing else value
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _explicit_value(spec: Explicit, value: Any, mapping: Mapping) -> tuple[Any, str | None]:
    if not isinstance(value, (str, int, float, bool)):
        return None, f"{value!r} is not a single value"
    if spec.type == "string":
        return str(value), None
    if spec.type == "number":
        number = _number(value)
        if number is None:
            return None, f"{value!r} is not a number"
        return (int(number) if number.is_integer() and abs(number) < 2**53 else number), None
    if isinstance(value, bool):
        return value, None
    text = str(value).lower()
    if text in mapping.true_values or text in mapping.false_values:
        return text in mapping.true_values, None
    return None, f"{value!r} is neither true ({'/'.join(sorted(mapping.true_values))}) " \
                 f"nor false ({'/'.join(sorted(mapping.false_values))})"


def _order_value(value: Any, kind: str) -> tuple[float | None, str | None]:
    if kind == "sequence":
        number = _number(value)
        return (number, None) if number is not None else (None, f"{value!r} is not a number")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    try:
        return float(parse_ts(value)), None
    except ValueError:
        return None, f"{value!r} is not an RFC 3339 time or epoch milliseconds"


def _split(total: float, n: int, integer: bool) -> list[float | int]:
    """``total`` split over ``n`` parts that add up to it (whole numbers when ``integer``)."""
    if integer:
        whole = round(total)
        return [whole // n + (1 if i < whole % n else 0) for i in range(n)]
    part = round(total / n, 3)
    return [part] * (n - 1) + [round(total - part * (n - 1), 3)]


@dataclass
class _Parsed:
    line: int
    lead_id: str
    order: float
    fields: dict[str, Any]
    counts: list[tuple[Behaviour, int]]
    values: list[tuple[Behaviour, float]]
    outcome: str | None


def _parse_row(line: int, row: Row, mapping: Mapping) -> _Parsed | str:
    """The row's values, or the reasons it is bad joined by '; '."""
    if BAD_LINE in row:
        return str(row[BAD_LINE])
    problems: list[str] = []
    lead_id = f"row-{line}" if mapping.id_column == ROW_ID else _cell(row, mapping.id_column, mapping)
    if lead_id is None:
        problems.append(f"column {mapping.id_column!r} (lead id): missing")
    elif not isinstance(lead_id, (str, int)) or isinstance(lead_id, bool) or len(str(lead_id)) > 200:
        problems.append(f"column {mapping.id_column!r} (lead id): {lead_id!r} is not an id of 1-200 characters")
    order: float | None = float(line)
    if mapping.order_column:
        raw = _cell(row, mapping.order_column, mapping)
        order, problem = (None, "missing") if raw is None else _order_value(raw, mapping.order_kind)
        if problem:
            problems.append(f"column {mapping.order_column!r} (order): {problem}")
    fields: dict[str, Any] = {}
    for spec in mapping.explicit:
        value = _cell(row, spec.column, mapping)
        if value is not None:
            fields[spec.field], problem = _explicit_value(spec, value, mapping)
            if problem:
                problems.append(f"column {spec.column!r} ({spec.field}): {problem}")
    counts, values = [], []
    for b in mapping.behaviour:
        value = _cell(row, b.column, mapping)
        if value is None:
            continue
        number = _number(value)
        what = f"{b.event} {b.kind if b.kind == 'count' else b.prop}"
        if b.kind == "count" and (number is None or number < 0 or not number.is_integer()):
            problems.append(f"column {b.column!r} ({what}): {value!r} is not a whole number >= 0")
        elif b.kind == "count" and number is not None and number > b.max:
            problems.append(f"column {b.column!r} ({what}): {value!r} is above the mapping's max of {b.max}")
        elif number is None or number < 0:
            problems.append(f"column {b.column!r} ({what}): {value!r} is not a number >= 0")
        elif b.kind == "count":
            counts.append((b, int(number)))
        else:
            values.append((b, number))
    outcome = _cell(row, mapping.outcome_column, mapping)
    label: str | None = None
    if outcome is not None:
        text = str(outcome).lower()
        label = "won" if text in mapping.positive else "lost"
        if label == "lost" and mapping.negative is not None and text not in mapping.negative:
            problems.append(f"column {mapping.outcome_column!r} (outcome): {outcome!r} is neither won "
                            f"({'/'.join(sorted(mapping.positive))}) nor lost ({'/'.join(sorted(mapping.negative))})")
    if problems:
        return "; ".join(problems)
    assert order is not None and lead_id is not None
    return _Parsed(line, str(lead_id), order, fields, counts, values, label)


def _row_events(p: _Parsed, t0: int) -> list[dict[str, Any]]:
    """The row's events; the k-th is stamped t0 + k seconds."""
    items: list[tuple[str, dict[str, Any]]] = [("lead_created", {"fields": p.fields})]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for b, n in p.counts:
        new = [dict(b.props) for _ in range(n)]
        by_type.setdefault(b.event, []).extend(new)
        items.extend((b.event, props) for props in new)
    summaries: dict[str, dict[str, Any]] = {}
    for b, value in p.values:
        targets = by_type.get(b.event)
        if targets:
            parts = _split(value * len(targets) if b.kind == "rate" else value, len(targets), b.integer)
            for props, part in zip(targets, parts):
                props[b.prop or ""] = part
        elif value:  # nothing to carry it: one summary event of that type
            summary = summaries.setdefault(b.event, {})
            summary.update(b.props)
            summary[b.prop or ""] = round(value) if b.integer else value
    items.extend(summaries.items())
    if p.outcome is not None:
        items.append(("deal_won" if p.outcome == "won" else "deal_lost", {}))
    id_part = p.lead_id if len(p.lead_id) <= 150 else hashlib.sha1(p.lead_id.encode()).hexdigest()
    return [{"event_id": f"{id_part}:{p.line}:{k}", "lead_id": p.lead_id, "type": t, "ts": t0 + k * 1000,
             "props": props} for k, (t, props) in enumerate(items)]


Spill = Callable[[list[_Parsed]], Iterator[_Parsed]]


def rows_to_events(rows: Iterable[tuple[int, Row]], mapping: Mapping, *, spill: Spill | None = None,
                   run_rows: int = RUN_ROWS) -> Iterator[RowResult]:
    """Convert ``(line, row)`` pairs; one :class:`RowResult` per row, none skipped.

    With an order column, bad rows (``error`` naming the column and the problem) come first, in
    line order, then the good rows sorted by it (stable). Without one, every row comes out in file
    order as soon as it is read. With
    ``order_kind = "sequence"`` row ``r`` starts at ``start + r * row_gap_s`` (or 1 s after the
    previous row's last event, whichever is later), so arrival order is kept; with ``"time"`` it
    starts at its own time. A row's events are 1 s apart.

    Rows are consumed lazily. Sorting needs every good row, so they are held as parsed rows; with
    ``spill`` (:func:`streams.offline.spill_run`), every ``run_rows`` of them are sorted and handed to it (it
    writes them out and gives them back later), and the sorted runs are merged: memory stays
    bounded for any length of export. Without an order column nothing is sorted or held.
    """
    seen: dict[int, int] = {}  # 64-bit hash of a lead id -> its line: 1M ids in tens of MB
    runs: list[Iterator[_Parsed]] = []
    good: list[_Parsed] = []
    timer = _Stamper(mapping)
    for line, row in rows:
        parsed = _parse_row(line, row, mapping)
        if isinstance(parsed, _Parsed):
            key = _id_hash(parsed.lead_id)
            if key in seen:
                parsed = f"lead id {parsed.lead_id!r} already on line {seen[key]}"
            else:
                seen[key] = line
        if isinstance(parsed, str):
            lead = f"row-{line}" if mapping.id_column == ROW_ID else (
                row.get(mapping.id_column) if BAD_LINE not in row else None)
            yield RowResult(line, str(lead) if lead else None, [], parsed)
            continue
        if mapping.order_column is None:  # file order is arrival order: nothing to sort or hold
            yield timer.row(parsed)
            continue
        good.append(parsed)
        if spill is not None and len(good) >= run_rows:
            good.sort(key=_sort_key)
            runs.append(spill(good))
            good = []
    good.sort(key=_sort_key)
    ordered = heapq.merge(*runs, iter(good), key=_sort_key) if runs else iter(good)
    for p in ordered:
        yield timer.row(p)


class _Stamper:
    """Event times of the good rows, in arrival order (see :func:`rows_to_events`)."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping, self.rank, self.next_free = mapping, 0, mapping.start_ms

    def row(self, p: _Parsed) -> RowResult:
        m = self.mapping
        t0 = int(p.order) if m.order_kind == "time" else \
            max(m.start_ms + int(self.rank * m.row_gap_s * 1000), self.next_free)
        events = _row_events(p, t0)
        self.rank += 1
        self.next_free = events[-1]["ts"] + 1000
        return RowResult(p.line, p.lead_id, events)


def _sort_key(p: _Parsed) -> tuple[float, int]:
    return p.order, p.line  # stable: file order among equal order values


def _id_hash(lead_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(lead_id.encode(), digest_size=8).digest(), "little")
