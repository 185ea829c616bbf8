"""Funnel diagnostics from lead states."""

from models.features import new_state
from models.funnel import DAY_MS, funnel_report


def lead(stages, stage_ts_days, outcome=None, **counts):
    s = new_state("x") | {"stages_visited": stages, "stage": stages[-1] if stages else None,
                          "stage_ts": stage_ts_days * DAY_MS, "outcome": outcome, "created_ts": 0,
                          "closed_ts": 10 * DAY_MS if outcome else None, "grade": "B"}
    s["counts"] = counts
    return s


def test_stalls_conversion_bottleneck_and_rates():
    leads = [lead(["new", "contacted", "engaged"], 0, "won", email_open=4, email_replied=2),
             lead(["new", "contacted"], 29),   # open, moved 1 day ago
             lead(["new", "contacted"], 1),    # open, stalled 29 days
             lead(["new"], 0, "lost", email_open=4),
             lead(["new"], 25)] + [lead(["new", "qualified"], 0, "lost") for _ in range(5)]
    report = funnel_report(leads, now_ms=30 * DAY_MS, stall_days=14)
    new, contacted = report["stages"]["new"], report["stages"]["contacted"]
    assert (new["reached"], new["open"], new["stalled"]) == (10, 1, 0)
    assert new["conversion_to_next"] == 0.8  # 8 of 10 moved on (skipping stages counts)
    assert (contacted["reached"], contacted["open"], contacted["stalled"]) == (3, 2, 1)
    assert contacted["median_days_in_stage"] == 15.0 and contacted["grades"] == {"B": 2}
    assert report["closed"] == {"won": 1, "lost": 6} and report["win_rate"] == round(1 / 7, 3)
    assert report["email_reply_rate"] == 0.25 and report["median_days_to_close"] == 10.0
    assert report["stages"]["closing"]["conversion_to_next"] is None
    # stages reached by 5+ leads: new (0.8) and qualified (0.0, nobody moved on)
    assert report["bottleneck"] == "qualified"
