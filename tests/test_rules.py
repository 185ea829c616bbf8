"""Point rules: the shipped config, every contribution kind, and clear config errors."""

import pytest

from models.rules import DEFAULT_CONFIG, ConfigError, load_rules

RULES = load_rules(DEFAULT_CONFIG.read_text())


def test_points_per_kind_with_caps_ranges_and_negatives():
    f = {"d_download": 5.0, "d_click": 1.0, "stage": "negotiation", "f_age": 30.0, "f_job_title": "intern",
         "f_company_size": 5000.0, "recency_s": 40 * 86400.0, "activities_overdue": 10.0}
    assert RULES.points(f) == {"download": 100.0, "click": 5.0, "stage=negotiation": 40.0, "age in 25..45": 50.0,
                               "job_title=intern": -15.0, "company_size in 1001..": 10.0, "recency": -25.0,
                               "activities_overdue": -20.0}


def test_score_is_monotonic_in_points_and_reasons_are_largest_signed():
    low = RULES.score({"d_click": 1.0})
    high = RULES.score({"d_click": 1.0, "d_download": 2.0, "stage": "closing", "f_age": 30.0})
    assert 0 < low.score < high.score < 1
    assert [r["feature"] for r in high.reasons][:3] == ["download", "age in 25..45", "stage=closing"]
    assert high.reasons[0]["contribution"] == pytest.approx(100 / RULES.width, abs=1e-4)
    assert len(RULES.score({f"d_{t}": 9.0 for t in RULES.behaviour}).reasons) == 5


def test_unknown_string_values_score_nothing():
    assert RULES.points({"f_industry": "unknown", "f_age": "thirty"}) == {}


@pytest.mark.parametrize("edit,message", [
    (("threshold = 0.80", "threshold = 2"), "[hot].threshold = 2.0: expected a number in (0, 1]"),
    (("half_life_days = 14.0", "half_life_days = 'two weeks'"), "[decay.half_life_days] = 'two weeks': expected a number > 0"),
    (("download = { points = 50, cap = 100 }", "download = 50"), "[behaviour].download = 50: expected { points = N, cap = N }"),
    (("overdue = { points = -5, cap = -20 }", "overdue = { points = -5, cap = 20 }"), "must have the sign of points"),
    (("\"25..45\" = 50", "\"x..45\" = 50"), "expected a range 'min..max'"),
    (("closing = 50", "won = 50"), "[stage].won: expected one of new, contacted"),
    (("\"B\" = 0.50", "\"B\" = 0.70"), "strictly decreasing"),
    (("[squash]", "[squash"), "not valid TOML"),
])
def test_bad_config_names_the_key_and_expected_form(edit, message):
    text = DEFAULT_CONFIG.read_text()
    assert edit[0] in text
    with pytest.raises(ConfigError) as exc:
        load_rules(text.replace(edit[0], edit[1], 1))
    assert message in str(exc.value)


def test_any_feature_can_be_scored_by_name_and_example_configs_load():
    from pathlib import Path

    assert RULES.points({"distinct_pages": 7.0, "email_reply_rate": 0.1}) == {"distinct_pages in 5..": 15.0}
    xedu = load_rules((Path(__file__).parent.parent / "deploy/mappings/xeducation-scoring.toml").read_text())
    assert xedu.points({"visit_duration_s": 900.0, "f_lead_origin": "lead add form", "f_do_not_email": "true"}) == {
        "visit_duration_s in 600..": 60.0, "lead_origin=lead add form": 80.0, "do_not_email=true": -40.0}
