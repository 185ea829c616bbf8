"""The fold: counts, decay in event time, out-of-order safety, explicit fields, funnel state."""

from models.events import Event
from models.features import features, fold, new_state

HOUR = 3_600_000
HL = 3600.0  # one hour half-life


def run(events, state=None):
    state = state or new_state("l1")
    for i, (kind, ts, props) in enumerate(events):
        state = fold(state, Event(f"e{i}", "l1", kind, ts, props), half_life_s=HL)
    return state


def test_fold_does_not_mutate_its_input():
    s0 = new_state("l1")
    s1 = fold(s0, Event("e", "l1", "click", 0, {}), half_life_s=HL)
    assert s0["counts"] == {} and s1["counts"] == {"click": 1}


def test_decay_halves_per_half_life_in_event_time():
    s = run([("click", 0, {}), ("download", 2 * HOUR, {})])
    assert s["decayed"]["click"] == 0.25 and s["decayed"]["download"] == 1.0
    f = features(s, 3 * HOUR, half_life_s=HL)
    assert f["d_click"] == 0.125 and f["d_download"] == 0.5


def test_out_of_order_event_counts_but_does_not_move_recency_or_decay_reference():
    in_order = run([("click", 0, {}), ("click", HOUR, {}), ("click", 2 * HOUR, {})])
    shuffled = run([("click", 2 * HOUR, {}), ("click", 0, {}), ("click", HOUR, {})])
    assert shuffled["counts"] == in_order["counts"] == {"click": 3}
    assert shuffled["last_touch_ts"] == in_order["last_touch_ts"] == 2 * HOUR
    assert shuffled["decay_ref_ts"] == 2 * HOUR
    assert abs(shuffled["decayed"]["click"] - in_order["decayed"]["click"]) < 1e-12


def test_older_field_update_does_not_overwrite_newer_value_and_null_removes():
    s = run([("lead_updated", 2 * HOUR, {"fields": {"country": "DE"}}),
             ("lead_created", HOUR, {"fields": {"country": "FR", "industry": "Software"}}),
             ("lead_updated", 3 * HOUR, {"fields": {"industry": None}})])
    assert s["fields"] == {"country": "DE"}
    assert s["created_ts"] == HOUR


def test_stage_activities_and_outcome():
    s = run([("stage_changed", HOUR, {"stage": "contacted"}),
             ("stage_changed", 3 * HOUR, {"stage": "qualified"}),
             ("stage_changed", 2 * HOUR, {"stage": "engaged"}),  # late: visited, not current
             ("activity_created", HOUR, {"activity_id": "a1", "kind": "call"}),
             ("activity_created", HOUR, {"activity_id": "a2", "kind": "task"}),
             ("activity_completed", 2 * HOUR, {"activity_id": "a1", "kind": "call"}),
             ("activity_overdue", 3 * HOUR, {"activity_id": "a2", "kind": "task"}),
             ("activity_created", 0, {"activity_id": "a2", "kind": "task"})])  # stale: ignored
    f = features(s, 4 * HOUR, half_life_s=HL)
    assert f["stage"] == "qualified" and f["stage_index"] == 3.0 and f["stages_visited"] == 3.0
    assert f["time_in_stage_s"] == 3600.0
    assert (f["activities_open"], f["activities_completed"], f["activities_overdue"]) == (0.0, 1.0, 1.0)
    assert "recency_s" not in f  # CRM bookkeeping is not a touch by the lead


def test_implicit_features():
    s = run([("lead_created", 0, {"fields": {"country": "Germany", "age": 31, "newsletter": True}}),
             ("visit", HOUR, {"session_id": "s1", "duration_s": 120}),
             ("page_view", HOUR, {"url": "/a"}), ("page_view", HOUR, {"url": "/a"}), ("page_view", HOUR, {"url": "/b"}),
             ("email_open", HOUR, {}), ("email_open", HOUR, {}), ("email_replied", 2 * HOUR, {})])
    f = features(s, 3 * HOUR, half_life_s=HL)
    assert f["f_country"] == "germany" and f["f_age"] == 31.0 and f["f_newsletter"] == "true"
    assert f["distinct_pages"] == 2.0 and f["n_page_view"] == 3.0 and f["sessions"] == 1.0
    assert f["visit_duration_s"] == 120.0 and f["email_reply_rate"] == 0.5
    assert f["recency_s"] == 3600.0 and f["created_month"] == "1" and f["created_weekday"] == "4"
