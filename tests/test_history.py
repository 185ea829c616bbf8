"""The history mapping format and rows -> contract events (models/offline/history.py; the files: streams/offline.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest

from models.events import parse_event, topic_kind_of
from models.offline.history import MappingError, load_mapping, rows_to_events
from streams.offline import read_rows

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
XEDU_CSV = ROOT.parent / "shared" / "data" / "xeducation-leads.csv"
XEDU_MAPPING = ROOT / "deploy" / "mappings" / "xeducation.toml"

MINIMAL = '[lead]\nid = "id"\n[outcome]\ncolumn = "won"\npositive = "1"\n'


def assert_contract(events: list[dict]) -> None:
    for e in events:
        parse_event(e["lead_id"].encode(), orjson.dumps(e), topic_kind=topic_kind_of(e["type"]))


# ---------------------------------------------------------------- the mapping format


def test_valid_mapping_file() -> None:
    m = load_mapping((FIXTURES / "history-small.toml").read_text())
    assert (m.id_column, m.order_column, m.order_kind, m.outcome_column) == \
        ("Prospect ID", "Lead Number", "sequence", "Converted")
    assert m.positive == {"1"} and m.negative is None
    assert m.missing == {"", "select"}
    assert [(e.column, e.field, e.type) for e in m.explicit] == [
        ("Country", "country", "string"), ("Specialization", "specialization", "string"),
        ("Do Not Email", "do_not_email", "bool"), ("Age", "age", "number")]
    assert [(b.column, b.event, b.kind, b.prop) for b in m.behaviour] == [
        ("TotalVisits", "visit", "count", None),
        ("Total Time Spent on Website", "visit", "total", "duration_s"),
        ("Page Views Per Visit", "visit", "rate", "pages")]
    assert m.drop == {"Tags": "sales notes after contact: leaks the outcome"}
    assert "Tags" not in m.columns and "TotalVisits" in m.columns


def test_minimal_mapping_has_defaults() -> None:
    m = load_mapping(MINIMAL)
    assert m.order_column is None and m.start_ms == 1_767_225_600_000 and m.row_gap_s == 60.0
    assert m.explicit == () and m.behaviour == ()


@pytest.mark.parametrize(("text", "message"), [
    ("[lead\nid = 1", "mapping: not valid TOML: "),
    ('[outcome]\ncolumn = "won"\npositive = "1"',
     "mapping [lead].id: missing; expected the name of the column holding the lead id"),
    ('[lead]\nid = "Prospect ID"\n[outcome]\ncolumn = "Converted"',
     "mapping [outcome].positive: missing; expected the value of column 'Converted' that means won"),
    ('[lead]\nid = "id"\n[outcome]\npositive = "1"',
     "mapping [outcome].column: missing; expected the name of the column holding the outcome"),
    (MINIMAL + "[leads]\nx = 1", "mapping [leads]: unknown table; expected one of [lead], [outcome], [values]"),
    (MINIMAL.replace('id = "id"', 'id = "id"\nidd = "x"'), "mapping [lead].idd: unknown key; expected one of id, "),
    (MINIMAL.replace('id = "id"', "id = 3"), "mapping [lead].id: 3 is not a non-empty string"),
    (MINIMAL.replace('id = "id"', 'id = "id"\norder = "n"\norder_kind = "date"'),
     "mapping [lead].order_kind: 'date' is not allowed; expected \"sequence\" (numbers giving arrival order) "
     'or "time"'),
    (MINIMAL.replace('id = "id"', 'id = "id"\nstart = "yesterday"'), "mapping [lead].start: 'yesterday' is not a time"),
    (MINIMAL.replace('id = "id"', 'id = "id"\nrow_gap_s = 0'), "mapping [lead].row_gap_s: 0 is not a number > 0"),
    (MINIMAL.replace('positive = "1"', "positive = 1"),
     "mapping [outcome].positive: 1 is not a string or a list of strings; expected the value of column 'won'"),
    (MINIMAL + '[explicit]\n"Your Age" = 3', 'mapping [explicit]."Your Age": 3 is not a field name or a table'),
    (MINIMAL + '[explicit]\n"Your Age" = { field = "age", type = "int" }',
     'mapping [explicit]."Your Age".type: \'int\' is not allowed; expected "string", "number" or "bool"'),
    (MINIMAL + '[explicit]\n"Your Age" = { type = "number" }',
     'mapping [explicit]."Your Age".field: missing; expected a field'),
    (MINIMAL + '[explicit]\n"A" = "x"\n"B" = "x"', "mapping [explicit].B: field 'x' is already set by column 'A'"),
    (MINIMAL + '[behaviour]\n"V" = { event = "visits", as = "count" }',
     "mapping [behaviour].V.event: 'visits' is not allowed; expected one of visit, page_view, click"),
    (MINIMAL + '[behaviour]\n"V" = { event = "visit" }', 'mapping [behaviour].V.as: missing; expected "count"'),
    (MINIMAL + '[behaviour]\n"V" = { event = "visit", as = "total" }',
     'mapping [behaviour].V.prop: missing; expected the name of the visit prop that carries the value'),
    (MINIMAL + '[behaviour]\n"V" = { event = "visit", as = "count", prop = "n" }',
     'mapping [behaviour].V.prop: not used with as = "count"'),
    (MINIMAL + '[behaviour]\n"V" = { event = "page_view", as = "count" }',
     'mapping [behaviour].V.props: page_view events need url; expected props = { url = "..." }'),
    (MINIMAL + '[behaviour]\n"V" = { event = "visit", as = "count", max = -1 }',
     "mapping [behaviour].V.max: -1 is not a whole number >= 0"),
    (MINIMAL + '[behaviour]\n"V" = { event = "visit", as = "count", colour = 1 }',
     "mapping [behaviour].V.colour: unknown key; expected one of event, as, prop"),
    (MINIMAL + '[behaviour]\n"A" = { event = "visit", as = "total", prop = "duration_s" }\n'
     '"B" = { event = "visit", as = "rate", prop = "duration_s" }',
     "mapping [behaviour].B.prop: visit.duration_s is already set by column 'A'"),
    (MINIMAL + '[drop]\n"Tags" = ""', 'mapping [drop].Tags: \'\' is not a reason; expected a short string'),
    (MINIMAL + '[drop]\n"won" = "leaks"', "mapping [drop].won: the column is also used by the mapping"),
])
def test_invalid_mapping_names_key_and_expected_form(text: str, message: str) -> None:
    with pytest.raises(MappingError) as info:
        load_mapping(text)
    assert str(info.value).startswith(message), str(info.value)


def test_mapping_from_dict() -> None:
    m = load_mapping({"lead": {"id": "id"}, "outcome": {"column": "won", "positive": ["yes", "Y"]}})
    assert m.positive == {"yes", "y"}


# ---------------------------------------------------------------- rows -> events


@pytest.fixture
def small() -> dict:
    mapping = load_mapping((FIXTURES / "history-small.toml").read_text())
    results = list(rows_to_events(read_rows(FIXTURES / "history-small.csv"), mapping))
    return {"results": results, "by_line": {r.line: r for r in results}}


def test_every_row_is_reported(small: dict) -> None:
    assert sorted(small["by_line"]) == list(range(2, 11))  # header on line 1, 9 rows, none skipped


def test_bad_rows_have_line_and_reason(small: dict) -> None:
    bad = {r.line: r.error for r in small["results"] if r.error}
    assert bad == {
        5: "column 'TotalVisits' (visit count): 'many' is not a whole number >= 0",
        6: "column 'Prospect ID' (lead id): missing",
        7: "column 'Do Not Email' (do_not_email): 'Maybe' is neither true (yes) nor false (no)",
        9: "4 values but the header has 11 columns",
        10: "column 'Lead Number' (order): 'x' is not a number",
    }
    assert all(not small["by_line"][line].events for line in bad)
    # bad rows first, in line order; then the good ones
    assert [r.line for r in small["results"]][:5] == [5, 6, 7, 9, 10]


def test_rows_follow_the_order_column_stably(small: dict) -> None:
    good = [r for r in small["results"] if not r.error]
    assert [r.lead_id for r in good] == ["p-a", "p-b", "p-d", "p-c"]  # 1, 2, 2 (line 4 before 8), 3
    ts = [e["ts"] for r in good for e in r.events]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    starts = [r.events[0]["ts"] for r in good]
    assert starts == [1_767_225_600_000 + i * 60_000 for i in range(4)]


def test_row_events(small: dict) -> None:
    rows = small["by_line"]
    c = rows[2].events  # p-c: 2 visits, 90 s, 2.5 pages per visit, won
    assert [e["type"] for e in c] == ["lead_created", "visit", "visit", "deal_won"]
    assert c[0]["props"] == {"fields": {"country": "India", "specialization": "Finance Management",
                                        "do_not_email": False, "age": 31}}
    assert [e["props"] for e in c[1:3]] == [{"duration_s": 45.0, "pages": 3}, {"duration_s": 45.0, "pages": 2}]
    assert [e["ts"] - c[0]["ts"] for e in c] == [0, 1000, 2000, 3000]
    assert [e["event_id"] for e in c] == [f"p-c:2:{k}" for k in range(4)]
    # p-a: missing values ("" and "Select") are left out; zero visits give no visit; lost
    a = rows[3].events
    assert [e["type"] for e in a] == ["lead_created", "deal_lost"]
    assert a[0]["props"]["fields"] == {"do_not_email": True}
    # p-b: empty outcome = still open (no outcome event); 3 visits of 0 s
    b = rows[4].events
    assert [e["type"] for e in b] == ["lead_created", "visit", "visit", "visit"]
    assert [e["props"] for e in b[1:]] == [{"duration_s": 0.0, "pages": 1}] * 3
    # p-d: no visit count but 300 s on the site: one summary visit carries the time
    d = rows[8].events
    assert [(e["type"], e["props"]) for e in d[1:]] == [("visit", {"duration_s": 300.0}), ("deal_won", {})]
    assert d[0]["props"]["fields"]["age"] == 52.5
    assert_contract([e for r in small["results"] for e in r.events])


def test_counts_expand_and_totals_add_up() -> None:
    m = load_mapping(MINIMAL + '[behaviour]\n"n" = { event = "download", as = "count", props = { asset = "a.pdf" } }\n'
                     '"t" = { event = "download", as = "total", prop = "size_mb" }')
    (r,) = rows_to_events([(2, {"id": "x", "won": "0", "n": "3.0", "t": "10"})], m)
    downloads = [e for e in r.events if e["type"] == "download"]
    assert len(downloads) == 3 and all(e["props"]["asset"] == "a.pdf" for e in downloads)
    assert sum(e["props"]["size_mb"] for e in downloads) == pytest.approx(10)
    assert [e["props"]["size_mb"] for e in downloads] == [3.333, 3.333, 3.334]


def test_count_above_max_is_a_bad_row() -> None:
    m = load_mapping(MINIMAL + '[behaviour]\n"n" = { event = "visit", as = "count", max = 5 }')
    (r,) = rows_to_events([(7, {"id": "x", "won": "0", "n": "6"})], m)
    assert (r.line, r.events, r.error) == (7, [], "column 'n' (visit count): '6' is above the mapping's max of 5")


def test_duplicate_lead_id_is_a_bad_row() -> None:
    rows = [(2, {"id": "x", "won": "0"}), (3, {"id": "x", "won": "1"})]
    results = list(rows_to_events(rows, load_mapping(MINIMAL)))
    # no order column: rows come out in file order as they are read (streaming, nothing held)
    assert [(r.line, r.error) for r in results] == [(2, None), (3, "lead id 'x' already on line 2")]


def test_negative_values_restrict_the_outcome() -> None:
    m = load_mapping(MINIMAL + 'negative = ["0"]')
    results = {r.line: r for r in rows_to_events([(2, {"id": "a", "won": "0"}), (3, {"id": "b", "won": "2"})], m)}
    assert results[2].events[-1]["type"] == "deal_lost"
    assert results[3].error == "column 'won' (outcome): '2' is neither won (1) nor lost (0)"


def test_time_order(tmp_path: Path) -> None:
    m = load_mapping(MINIMAL.replace('id = "id"', 'id = "id"\norder = "at"\norder_kind = "time"'))
    path = tmp_path / "h.jsonl"
    path.write_text('{"id": "late", "won": "1", "at": "2026-02-01T00:00:00Z"}\n\n'
                    '{"id": "early", "won": 0, "at": 1767225600000}\n'
                    '[1, 2]\n{"id": "t", "at": "soon"}\nnot json\n')
    results = list(rows_to_events(read_rows(path), m))
    assert [(r.line, r.error) for r in results[:3]] == [
        (4, "expected a JSON object, got list"),
        (5, "column 'at' (order): 'soon' is not an RFC 3339 time or epoch milliseconds"),
        (6, results[2].error)]
    assert results[2].error.startswith("invalid JSON")
    assert [(r.lead_id, r.line, r.events[0]["ts"]) for r in results[3:]] == [
        ("early", 3, 1_767_225_600_000), ("late", 1, 1_769_904_000_000)]
    assert [e["type"] for e in results[3].events] == ["lead_created", "deal_lost"]


def test_read_rows_rejects_unknown_file_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected .csv, .tsv, .jsonl or .ndjson"):
        list(read_rows(tmp_path / "leads.xlsx"))


# ---------------------------------------------------------------- the X Education mapping


def test_xeducation_mapping_converts_the_real_file() -> None:
    mapping = load_mapping(XEDU_MAPPING.read_text())
    rows = list(itertools.islice(read_rows(XEDU_CSV), 200))
    header = set(rows[0][1])
    assert mapping.columns | set(mapping.drop) == header  # every column read or dropped with a reason
    for leaking in ("Tags", "Lead Quality", "Last Activity", "Last Notable Activity", "Asymmetrique Activity Index",
                    "Asymmetrique Profile Index", "Asymmetrique Activity Score", "Asymmetrique Profile Score"):
        assert leaking in mapping.drop
    results = list(rows_to_events(rows, mapping))
    assert [r.error for r in results if r.error] == []
    assert len(results) == 200
    for (line, row), r in zip(sorted(rows, key=lambda lr: int(lr[1]["Lead Number"])), results):
        assert r.line == line  # ascending Lead Number
        types = [e["type"] for e in r.events]
        assert types[0] == "lead_created" and types[-1] == ("deal_won" if row["Converted"] == "1" else "deal_lost")
        visits = [e for e in r.events if e["type"] == "visit"]
        if row["TotalVisits"]:
            assert len(visits) == int(float(row["TotalVisits"]))
        if visits:
            seconds = float(row["Total Time Spent on Website"])
            assert sum(v["props"]["duration_s"] for v in visits) == pytest.approx(seconds)
        assert "Select" not in r.events[0]["props"]["fields"].values()
    assert_contract([e for r in results for e in r.events])


# ---------------------------------------------------------------- the import command's checks (no Kafka)


def test_import_refuses_a_mapping_that_does_not_fit_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from streams.publish import convert_file, run_import
    from streams.settings import Settings

    settings = Settings.from_env({"LEADSTREAM_KAFKA": "127.0.0.1:1"})  # never reached
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('id = "id"', 'id = "id"\nidd = "x"'))
    assert run_import(settings, str(FIXTURES / "history-small.csv"), str(bad)) == 2
    assert f"{bad}: mapping [lead].idd: unknown key" in capsys.readouterr().err
    assert run_import(settings, str(FIXTURES / "history-small.csv"), str(XEDU_MAPPING)) == 2
    err = capsys.readouterr().err
    assert f"mapping {XEDU_MAPPING}: columns not in {FIXTURES / 'history-small.csv'}: " in err
    assert "'Lead Origin'" in err
    results, warnings = convert_file(FIXTURES / "history-small.csv", FIXTURES / "history-small.toml")
    assert len(results) == 9 and warnings == []
    other = tmp_path / "other.toml"
    other.write_text((FIXTURES / "history-small.toml").read_text().replace('"Tags" = "sales notes', '"Tag" = "x'))
    _, warnings = convert_file(FIXTURES / "history-small.csv", other)
    assert warnings == ["column 'Tags' is neither mapped nor in [drop]: ignored"]
