"""Offline evaluation (models/offline/evaluate.py, streams/offline.py): figures whose right answer is known, the command's output."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import orjson
import pytest

from models.offline.evaluate import (EvaluationResult, evaluate_events, holdout_start, score_metrics,
                                     top_fraction_lift)
from models.events import Event
from models.offline.history import load_mapping, rows_to_events
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer
from streams.offline import read_rows, run_evaluate

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL_CSV = FIXTURES / "evaluate_small.csv"
SMALL_MAPPING = FIXTURES / "evaluate_small.toml"
XEDU_CSV = ROOT.parent / "shared" / "data" / "xeducation-leads.csv"
XEDU_MAPPING = ROOT / "deploy" / "mappings" / "xeducation.toml"
RULES = load_rules(DEFAULT_CONFIG.read_text())
DAY = 86_400_000

# evaluate_small.csv: lead rNN has rank NN by rules points (downloads, visits, industry); see its mapping.
SMALL = {  # rank: (won, downloads, visits)
    1: (1, 2, 9), 2: (0, 2, 8), 3: (1, 2, 5), 4: (1, 2, 2), 5: (0, 1, 9), 6: (1, 1, 7), 7: (1, 1, 4),
    8: (0, 1, 2), 9: (1, 1, 0), 10: (1, 0, 9), 11: (0, 0, 8), 12: (0, 0, 7), 13: (1, 0, 6), 14: (0, 0, 5),
    15: (0, 0, 4), 16: (0, 0, 3), 17: (0, 0, 2), 18: (0, 0, 1), 19: (0, 0, 0), 20: (0, 0, 0),
}
SMALL_LAST = ["r02", "r06", "r13", "r20"]  # the four highest Lead Numbers, in arrival order


def small_events() -> list[dict]:
    mapping = load_mapping(SMALL_MAPPING.read_text())
    return [e for r in rows_to_events(read_rows(SMALL_CSV), mapping) for e in r.events]


def small_points(rank: int) -> float:
    _, downloads, visits = SMALL[rank]
    return min(50.0 * downloads, 100.0) + min(4.0 * visits, 40.0) - (20.0 if rank == 20 else 0.0)


def lead(i: int, won: bool, behaviour: list[tuple[str, dict]], t0: int, fields: dict | None = None) -> list[Event]:
    """One lead's events a second apart, then its outcome."""
    events = [Event(f"l{i}-0", f"l{i}", "lead_created", t0, {"fields": fields or {}})]
    events += [Event(f"l{i}-{k + 1}", f"l{i}", kind, t0 + (k + 1) * 1000, props)
               for k, (kind, props) in enumerate(behaviour)]
    return events + [Event(f"l{i}-out", f"l{i}", "deal_won" if won else "deal_lost", t0 + 60_000, {})]


# ---------------------------------------------------------------- metrics


def test_lift_and_holdout_by_hand() -> None:
    # 20 deals, 8 won; the top 10% is the 2 best: one won -> 0.5 / 0.4 = 1.25
    scores = [1.0 - i / 20 for i in range(20)]
    labels = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert top_fraction_lift(scores, labels) == 1.25
    assert top_fraction_lift(scores, [1] + [0] * 19) == 10.0
    assert top_fraction_lift(scores, [0] * 20) is None
    # a tie across the cut counts with its mean win rate: top 2 = {0.9} + half of the {0.5, 0.5} pair (one won)
    assert top_fraction_lift([0.9, 0.5, 0.5] + [0.1] * 17, [1, 1, 0] + [0] * 16 + [1]) == \
        round(((1 + 0.5) / 2) / (3 / 20), 4)
    assert [holdout_start(n) for n in (1, 4, 5, 20, 21, 9237)] == [0, 3, 4, 16, 16, 7389]


def test_score_metrics_by_hand() -> None:
    m = score_metrics([0.8, 0.4, 0.6, 0.2], [1, 1, 0, 0])
    assert m["roc_auc"] == 0.75 and m["n"] == 4 and m["won"] == 2 and m["win_rate"] == 0.5
    assert m["brier"] == round((0.2**2 + 0.6**2 + 0.6**2 + 0.2**2) / 4, 4)
    assert m["log_loss"] == round(-(math.log(0.8) + math.log(0.4) + math.log(0.4) + math.log(0.8)) / 4, 4)
    assert m["top_decile_lift"] == 2.0  # top 1 of 4 is won; base rate 0.5
    assert score_metrics([], [])["roc_auc"] is None
    assert score_metrics([0.3, 0.7], [0, 0])["roc_auc"] is None  # one class only


# ---------------------------------------------------------------- the replay


def test_rules_that_rank_perfectly_have_auc_one() -> None:
    events = []
    for i in range(10):
        won = i % 3 == 0
        behaviour = [("download", {})] * 2 if won else [("visit", {})]
        events += lead(i, won, behaviour, i * DAY)
    result = evaluate_events(events, RULES, min_outcomes=2)
    assert [p.lead_id for p in result.predictions] == [f"l{i}" for i in range(10)]
    m = result.metrics("whole")
    assert m["rules"]["roc_auc"] == 1.0 and m["rules"]["n"] == 10 and m["rules"]["won"] == 4
    assert m["rules"]["top_decile_lift"] == round(1 / 0.4, 4)


def test_label_independent_scores_are_near_half() -> None:
    rng = random.Random(0)
    events = []
    for i in range(400):
        behaviour = [("visit", {})] * rng.randint(0, 6) + [("download", {})] * rng.randint(0, 2)
        fields = {"industry": rng.choice(["software", "student", "retail"])}
        events += lead(i, rng.random() < 0.4, behaviour, i * 120_000, fields)
    m = evaluate_events(events, RULES, min_outcomes=20).metrics("whole")
    for name in ("rules", "model", "served"):
        assert abs(m[name]["roc_auc"] - 0.5) < 0.08, (name, m[name])
        assert 0.6 < m[name]["top_decile_lift"] < 1.4, (name, m[name])


def test_prediction_is_made_before_learning_from_the_last_snapshot() -> None:
    events = lead(0, True, [("download", {}), ("stage_changed", {"stage": "proposal"}), ("click", {})], 0)
    events += lead(1, False, [("visit", {})], DAY)
    result = evaluate_events(events, RULES, min_outcomes=1, keep_examples=True)
    first, second = result.predictions
    assert [len(e["snapshots"]) for e in result.examples] == [2, 1]  # stage entry + last; last only
    assert [e["won"] for e in result.examples] == [True, False]
    assert first.model == 0.5 and first.model_version == 0 and first.source == "rules"  # nothing learned yet
    assert first.served == first.rules
    # the rules score of the features after the click, not of the state after deal_won
    state_features = {"d_download": 1.0, "d_click": 1.0, "stage": "proposal", "recency_s": 0.0}
    assert first.rules == pytest.approx(RULES.score(state_features).score, abs=1e-4)
    assert second.model_version == 1 and second.model != 0.5  # learned from the first deal
    assert result.trainer["outcomes"] == {"won": 1, "lost": 1}


def test_duplicates_deletes_rejects_and_outcomes_without_history() -> None:
    events = lead(0, True, [("download", {})], 0)
    events = events[:2] + [events[1]] + events[2:]  # the download redelivered
    events += [Event("l1-0", "l1", "click", DAY, {}), Event("l1-del", "l1", "lead_deleted", DAY + 1, {}),
               Event("l1-late", "l1", "download", DAY - 5, {}),  # late, from before the deletion: ignored
               Event("l1-out", "l1", "deal_lost", DAY + 2, {})]  # the click went with the deletion
    events += [Event("l2-out", "l2", "deal_won", DAY, {}), Event("l2-again", "l2", "deal_lost", DAY + 5, {})]
    raw = [{"event_id": "x", "lead_id": "l3", "type": "download", "ts": "yesterday", "props": {}},
           {"event_id": "y", "lead_id": "l3", "type": "download", "ts": "2026-01-01T00:00:00Z", "props": {}},
           {"event_id": "z", "lead_id": "l3", "type": "deal_lost", "ts": "2026-01-01T00:00:01Z", "props": {}}]
    result = evaluate_events([*events, *raw], RULES, min_outcomes=1)
    assert result.duplicates == 1
    assert list(result.rejected.values()) == [1] and "at ts: 'yesterday'" in next(iter(result.rejected))
    assert [p.lead_id for p in result.predictions] == ["l0", "l3"]  # l1 was deleted, l2 had nothing before
    assert result.closed_without_snapshot == 2  # l1 and l2 (l2's second outcome is not a second label)
    assert result.leads == 4 and result.events == len(events) - 1 + 2  # all but the duplicate and the reject


def test_small_fixture_figures_by_hand() -> None:
    result = evaluate_events(small_events(), RULES, min_outcomes=3)
    assert len(result.predictions) == 20 and sum(p.won for p in result.predictions) == 8
    by_lead = {p.lead_id: p for p in result.predictions}
    for rank in SMALL:
        expected = 1 / (1 + math.exp(-(small_points(rank) - RULES.midpoint) / RULES.width))
        assert by_lead[f"r{rank:02d}"].rules == pytest.approx(expected, abs=1e-4)
    rules = result.metrics("whole")["rules"]
    # won ranks 1,3,4,6,7,9,10,13 have 12,11,11,10,10,9,9,7 of the 12 lost ranks below them
    assert rules["roc_auc"] == round(79 / 96, 4)
    assert rules["top_decile_lift"] == 1.25  # top 2 by score: r01 won, r02 lost; base rate 0.4
    assert rules["brier"] == round(sum((by_lead[f"r{r:02d}"].rules - w) ** 2 for r, (w, _, _) in SMALL.items()) / 20, 4)
    last = result.part("last_20pct")
    assert [p.lead_id for p in last] == SMALL_LAST and [p.index for p in last] == [16, 17, 18, 19]
    last_rules = result.metrics("last_20pct")["rules"]
    # won r06, r13 against lost r02, r20: each beats r20 only -> 2/4; the top 1 (r02) is lost -> lift 0
    assert (last_rules["n"], last_rules["won"], last_rules["roc_auc"], last_rules["top_decile_lift"]) == \
        (4, 2, 0.5, 0.0)


# ---------------------------------------------------------------- the command


def test_run_evaluate_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_evaluate(SMALL_CSV, SMALL_MAPPING, DEFAULT_CONFIG, as_json=True, min_outcomes=3)
    out, err = capsys.readouterr()
    assert code == 0
    doc = orjson.loads(out)  # exactly one JSON object
    assert out.strip().startswith("{") and out.strip().endswith("}") and isinstance(doc, dict)
    assert {"file", "mapping", "scoring_config", "rows", "model_kind", "min_outcomes", "events", "leads", "deals",
            "last_20pct", "metrics", "served_sources", "trainer", "elapsed_s"} <= set(doc)
    assert doc["rows"] == {"read": 21, "bad": 1}
    assert doc["deals"] == {"n": 20, "won": 8, "lost": 12, "closed_without_snapshot": 0}
    assert doc["last_20pct"] == {"first_deal_index": 16, "n": 4}
    assert set(doc["metrics"]) == {"whole", "last_20pct"}
    for part in doc["metrics"].values():  # the stream's three scorers, then one entry per tournament learner
        assert set(part) == {"rules", "model", "served", "logreg", "gam", "batch_hgb", "stack"}
        for m in part.values():
            assert set(m) == {"n", "won", "win_rate", "roc_auc", "log_loss", "brier", "top_decile_lift"}
    assert doc["metrics"]["whole"]["rules"]["roc_auc"] == round(79 / 96, 4)
    champion = doc["trainer"]["tournament"]["champion"]
    assert doc["metrics"]["whole"]["model"] == doc["metrics"]["whole"][champion]  # no champion change on 20 deals
    fresh = doc["freshness"]
    assert fresh["batch_every"] == 1000 and set(fresh) == {"batch_every", "whole", "last_20pct"}
    for part in ("whole", "last_20pct"):
        served, batch = doc["metrics"][part]["served"]["roc_auc"], doc["metrics"][part]["batch_hgb"]["roc_auc"]
        assert fresh[part] == {"served": served, "batch_hgb": batch, "gain": round(served - batch, 4)}
    assert sum(doc["served_sources"]["whole"].values()) == 20 and doc["served_sources"]["whole"]["rules"] >= 3
    # the bad row is reported with its line, never dropped silently
    assert f"{SMALL_CSV}:9: bad row (lead r-bad): column 'Downloads' (download count): 'many' is not a whole" in err


def test_run_evaluate_table_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_evaluate(SMALL_CSV, SMALL_MAPPING, DEFAULT_CONFIG, min_outcomes=3) == 0
    out = capsys.readouterr().out
    assert "closed deals: 20 (8 won, 40.0%)" in out and "last 20% (4 deals)" in out
    assert [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["|"]] == \
        ["scorer", "rules", "model", "served"]
    assert run_evaluate(SMALL_CSV, tmp_path / "absent.toml", DEFAULT_CONFIG) == 2
    assert "absent.toml" in capsys.readouterr().err
    assert run_evaluate(SMALL_CSV, XEDU_MAPPING, DEFAULT_CONFIG, as_json=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and "columns not in" in err


def test_cli_evaluate_calls_run_evaluate(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.cli import main

    monkeypatch.setenv("LEADSTREAM_MODEL_MIN_OUTCOMES", "3")
    assert main(["evaluate", str(SMALL_CSV), "--mapping", str(SMALL_MAPPING), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["min_outcomes"] == 3 and doc["deals"]["n"] == 20


# ---------------------------------------------------------------- real data


def test_online_model_learns_on_real_xeducation_rows() -> None:
    # The first 1,500 rows of the file (its newest leads), replayed in Lead Number order. Measured:
    # model AUC on the last 20% (300 deals) 0.901, rules 0.459.
    mapping = load_mapping(XEDU_MAPPING.read_text())
    rows = list(itertools.islice(read_rows(XEDU_CSV), 1500))
    events = [e for r in rows_to_events(rows, mapping) for e in r.events]
    result: EvaluationResult = evaluate_events(events, RULES)
    last = result.metrics("last_20pct")
    assert last["model"]["n"] == 300
    assert last["model"]["roc_auc"] > 0.85, last
    assert last["model"]["roc_auc"] > last["rules"]["roc_auc"] + 0.1, last


def test_scorer_used_is_the_streams() -> None:
    # evaluate builds on models.scoring.Scorer/step: a served score equals Scorer.score on the same features
    events = lead(0, True, [("download", {})], 0) + lead(1, False, [("visit", {})], DAY)
    result = evaluate_events(events, RULES, min_outcomes=1)
    p = result.predictions[0]
    assert p.served == Scorer(RULES).score({"d_download": 1.0, "recency_s": 0.0}).score == p.rules


def test_lagged_refits_run_off_the_replay_and_serve_a_fixed_count_of_deals_later() -> None:
    """refit_lag: the fit runs in a thread, and serves from a deal count, so two runs give the same figures;
    until the first refit is due the batch learner's figures are those of inline refits."""
    from models.offline.simulate import simulate

    rules = load_rules(DEFAULT_CONFIG.read_text())
    events = simulate(120, seed=3)
    inline = evaluate_events(events, rules, min_outcomes=5, batch_every=120)
    lagged = [evaluate_events(events, rules, min_outcomes=5, batch_every=120, refit_lag=15) for _ in range(2)]
    hgb = [[p.learners["batch_hgb"] for p in r.predictions] for r in (inline, *lagged)]
    assert hgb[1] == hgb[2]  # deterministic
    fits = [r.trainer["tournament"]["learners"]["batch_hgb"]["refits"]["fits"] for r in (inline, lagged[0])]
    assert fits[0] >= 2 and abs(fits[0] - fits[1]) <= 1  # lagged: due is checked after a deal, not a snapshot
    first = next(i for i, p in enumerate(hgb[0]) if p != 0.5)  # the first deal the first fit scored inline
    assert hgb[1][:first] == hgb[0][:first] and hgb[1][first:first + 15] == [0.5] * 15  # 15 deals later
    assert hgb[1][first + 15] != 0.5


def test_processes_give_the_figures_of_one_process(capfd: pytest.CaptureFixture[str]) -> None:
    """processes=2, 3: the replay in one child or split by lead over two, the batch fits made ahead in another; the
    merged examples, every prediction and the report are those of the single process, and every fit
    made ahead was used (none refused for another window)."""
    from models.offline.simulate import simulate

    rules = load_rules(DEFAULT_CONFIG.read_text())
    events = simulate(150, seed=5)
    events.append({"event_id": "bad", "lead_id": "x", "type": "visit", "ts": "yesterday", "props": {}})
    one = evaluate_events(events, rules, min_outcomes=5, batch_every=100, keep_examples=True)
    strip = lambda r: orjson.loads(orjson.dumps({**r, "trainer": {**r["trainer"], "tournament": {
        **r["trainer"]["tournament"], "learners": {n: {k: v for k, v in l.items() if k != "refits"}
                                                   for n, l in r["trainer"]["tournament"]["learners"].items()}}}}))
    for processes in (2, 3):  # the replay in one child, or split by lead over two
        more = evaluate_events(iter(events), rules, min_outcomes=5, batch_every=100, keep_examples=True,
                               processes=processes)
        assert more.trainer["tournament"]["learners"]["batch_hgb"]["refits"]["fits"] >= 3
        assert more.predictions == one.predictions and more.examples == one.examples
        assert strip(more.report()) == strip(one.report()) and sum(more.rejected.values()) == 1
        assert "fitting here" not in capfd.readouterr().err


def test_processes_report_a_failing_replay() -> None:
    from models.offline.simulate import simulate

    events = simulate(30, seed=1)

    def failing():
        yield from events[:200]
        raise ValueError("boom in the events")

    with pytest.raises(RuntimeError, match="boom in the events"):
        evaluate_events(failing(), RULES, min_outcomes=5, processes=3)
