"""The pure step: one score per event, hot crossings, snapshots and leakage-free training examples."""

import math
from types import SimpleNamespace

import pytest

from models.events import Event
from models.learner import Trainer
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer, step

RULES = load_rules(DEFAULT_CONFIG.read_text())
DAY = 86_400_000


def play(events, scorer=None, score=True):
    scorer = scorer or Scorer(RULES)
    state, results, stage_snaps = None, [], []
    for i, (kind, ts, props) in enumerate(events):
        r = step(state, Event(f"e{i}", "l1", kind, ts, props), scorer, scored_at_ms=ts, stage_snapshots=stage_snaps,
                 score=score)
        state = r.state
        if r.stage_snapshot:
            stage_snaps.append(r.snapshot)
        results.append(r)
    return results


def test_every_event_gets_a_score_message_of_the_contract():
    results = play([("lead_created", 0, {"fields": {"age": 30}}), ("click", DAY, {})])
    msg = results[-1].score
    assert set(msg) >= {"lead_id", "event_id", "score", "grade", "stage", "source", "model_version", "reasons",
                        "event_ts", "scored_at"}
    assert msg["event_id"] == "e1" and msg["source"] == "rules" and msg["event_ts"] == "1970-01-02T00:00:00.000Z"
    assert 0 <= msg["score"] <= 1 and msg["grade"] in {"A+", "A", "B+", "B", "C", "D"}


HOT_PATH = ([("lead_created", 0, {"fields": {"age": 30}})] + [("download", 0, {})] * 2 + [("form_submit", 0, {})] * 2
            + [("stage_changed", 1, {"stage": "closing"})] + [("click", 2, {})] * 3)  # 265 points


def test_hot_does_not_page_again_while_the_score_wobbles_above_the_rearm_level():
    hot_path = HOT_PATH
    wobble = [("stage_changed", 10, {"stage": "new"}), ("stage_changed", 11, {"stage": "closing"})] * 3
    results = play(hot_path + wobble)
    scores = [r.score["score"] for r in results[len(hot_path):]]
    assert min(scores) < RULES.hot_threshold and min(scores) > RULES.hot_rearm_below  # a real wobble
    assert sum(r.hot is not None for r in results) == 1


def test_hot_is_emitted_once_per_upward_crossing():
    hot_path = HOT_PATH
    results = play(hot_path + [("stage_changed", 200 * DAY, {"stage": "new"}), ("stage_changed", 200 * DAY + 1, {"stage": "closing"}),
                               ("download", 200 * DAY + 2, {}), ("download", 200 * DAY + 3, {}),
                               ("form_submit", 200 * DAY + 4, {}), ("form_submit", 200 * DAY + 5, {})])
    hot_flags = [r.hot is not None for r in results]
    assert hot_flags.count(True) == 2, [(r.score["score"], r.hot is not None) for r in results]
    assert results[hot_flags.index(True)].hot["threshold"] == RULES.hot_threshold


def test_training_example_uses_only_snapshots_taken_before_the_outcome():
    results = play([("lead_created", 0, {"fields": {}}), ("stage_changed", DAY, {"stage": "contacted"}),
                    ("download", 2 * DAY, {}), ("stage_changed", 3 * DAY, {"stage": "proposal"}),
                    ("click", 4 * DAY, {}), ("deal_won", 5 * DAY, {}), ("click", 6 * DAY, {})])
    example = results[5].training
    assert example["won"] is True and example["closed_ts"] == 5 * DAY
    assert [s["stage"] for s in example["snapshots"]] == ["contacted", "proposal", "proposal"]
    assert all(s["ts"] < 5 * DAY for s in example["snapshots"])
    assert all("n_deal_won" not in s["features"] for s in example["snapshots"])
    assert results[6].snapshot is None and results[6].training is None  # after close: nothing to learn from


def test_an_unscored_step_gives_the_snapshots_and_training_example_of_a_scored_one():
    events = [("lead_created", 0, {"fields": {"age": 30}}), ("stage_changed", DAY, {"stage": "contacted"}),
              ("download", 2 * DAY, {}), ("click", 2 * DAY + 5, {}), ("stage_changed", 3 * DAY, {"stage": "proposal"}),
              ("download", 2 * DAY + 9, {}), ("stage_changed", 4 * DAY, {"stage": "proposal"}),
              ("form_submit", 4 * DAY + 1, {}), ("deal_won", 5 * DAY, {}), ("click", 6 * DAY, {})]
    scored, unscored = play(events), play(events, score=False)
    assert [r.snapshot for r in unscored] == [r.snapshot for r in scored]
    assert sum(r.snapshot is not None for r in unscored) == 2  # the repeated stage is no entry
    assert unscored[8].training == scored[8].training and unscored[8].training is not None
    assert all(r.score is None and r.hot is None and "score" not in r.state for r in unscored)
    drop = ("score", "grade", "source", "reasons", "model_version", "scored_at", "history", "hot", "score_as_of",
            "close_score", "close_grade")
    assert {k: v for k, v in scored[-1].state.items() if k not in drop} == unscored[-1].state  # the same fold


def test_second_outcome_is_not_a_second_label():
    results = play([("click", 0, {}), ("deal_lost", DAY, {}), ("deal_won", 2 * DAY, {})])
    assert results[1].training is not None and results[2].training is None


def test_delete_gives_tombstone_and_late_events_do_not_resurrect_the_lead():
    r = play([("click", 0, {}), ("lead_deleted", DAY, {})])[-1]
    assert r.state is None and r.score is None and r.deleted_ts == DAY
    late = step(None, Event("e9", "l1", "download", DAY - 1, {}), Scorer(RULES), scored_at_ms=0, deleted_ts=DAY)
    assert late.state is None and late.score is None and late.deleted_ts == DAY
    newer = step(None, Event("e10", "l1", "download", DAY + 1, {}), Scorer(RULES), scored_at_ms=0, deleted_ts=DAY)
    assert newer.state["counts"] == {"download": 1} and newer.score is not None


def test_source_moves_from_rules_to_blend_to_model():
    trainer = Trainer(min_outcomes=5)
    scorer = Scorer(RULES, trainer.serving())
    sources = []
    for i in range(30):
        won = i % 2 == 0
        trainer.learn([{"features": {"n_download": 2.0 if won else 0.0}, "rules_score": 0.5, "stage": None}], won)
        scorer.model = trainer.serving()
        sources.append(play([("download", 0, {})], scorer)[-1].score["source"])
    assert sources[0] == "rules" and "blend" in sources and sources[-1] == "model"
    assert sources.index("blend") < sources.index("model")


def test_huge_explicit_numbers_give_a_finite_score_and_reasons():
    """Numbers of 1e308 in a lead's fields used to overflow the model's sums: a NaN score (stored as
    null, which failed every later read of the lead) or an OverflowError. Taken as 1e15 now."""
    trainer = Trainer(min_outcomes=5)
    for i in range(60):
        f = {"f_age": 20.0 + i % 40, "n_visit": float(i % 5), "stage": "new"} | {f"f_n{j}": float((i + j) % 5) for j in range(60)}
        trainer.learn([{"features": f, "rules_score": 0.5, "stage": "new"}], i % 3 == 0)
    fields = {f"n{j}": 1.7e308 for j in range(60)} | {"age": -1.7e308}
    r = step(None, Event("e1", "l1", "lead_created", 0, {"fields": fields}), Scorer(RULES, trainer.serving()),
             scored_at_ms=0)
    assert r.score["source"] == "model" and 0.0 <= r.score["score"] <= 1.0
    assert all(math.isfinite(reason["contribution"]) for reason in r.score["reasons"])


def test_a_score_that_is_not_a_probability_is_an_error_not_a_state():
    model = SimpleNamespace(model_weight=lambda: 1.0, predict_state=lambda *a, **kw: (float("nan"), []), version=3)
    with pytest.raises(ValueError, match="the model score nan is not a probability"):
        step(None, Event("e1", "l1", "visit", 0, {}), Scorer(RULES, model), scored_at_ms=0)


def test_the_model_alone_scores_a_state_as_it_scores_the_states_features():
    """Scored by the model alone, a lead's features are not built (its inputs come off the state):
    the same score and reasons to the bit, for the tournament's champion (a stack with trees) and for
    each of its learners forced as champion."""
    import copy

    from models.features import features
    from tests.test_learner import _lead_states

    trainer, states = Trainer(min_outcomes=5, batch_every=50), []
    for kind, item in _lead_states(seed=12, leads=150):
        if kind == "training":
            trainer.learn(item["snapshots"], item["won"])
        else:
            states.append(copy.deepcopy(item))
    serving = trainer.serving()
    assert serving.model_weight() == 1.0 and serving.champion in serving.learners
    for champion in [serving.champion] + [n for n in serving.learners if n != serving.champion]:
        model = copy.copy(serving)
        model.__dict__.pop("_fast", None)
        model.champion = champion
        scorer = Scorer(RULES, model)
        for state in states[::7]:
            at = state["last_ts"] + 3_600_000
            expected = scorer.score(features(state, at, half_life_s=RULES.half_life_s, fields=RULES.fields))
            got, f = scorer.score_state(state, at)
            assert f is None and got.source == "model"
            assert (float.hex(got.score), got.reasons) == (float.hex(expected.score), expected.reasons), champion


def test_the_score_history_keeps_the_last_scores_as_tuples_whatever_the_stored_form():
    """The last MAX_HISTORY scores, newest last, each a tuple (a worker keeps thousands of states in
    memory: a tuple of numbers and strings leaves the garbage collector's care, a list never does),
    also after a state loaded from JSON (arrays: lists); the same JSON as lists would give."""
    import orjson

    from models.scoring import MAX_HISTORY

    first = play([("lead_created", 0, {"fields": {"age": 30}})])[-1].state
    loaded = orjson.loads(orjson.dumps(first | {"history": [[i, 0.5, "C", "event"] for i in range(12)]}))
    state = step(loaded, Event("e9", "l1", "click", DAY, {}), Scorer(RULES), scored_at_ms=99).state
    history = state["history"]
    assert len(history) == MAX_HISTORY and all(type(h) is tuple for h in history)
    assert [h[0] for h in history] == list(range(12 - MAX_HISTORY + 1, 12)) + [99]
    assert orjson.loads(orjson.dumps(history))[:-1] == [[i, 0.5, "C", "event"] for i in range(3, 12)]
    fresh = play([("lead_created", 0, {"fields": {}})])[-1]
    assert fresh.state["history"] == ((0, round(fresh.score["score"], 4), fresh.score["grade"], "event"),)


def test_a_scored_state_and_a_loaded_one_leave_the_garbage_collectors_care():
    """A worker keeps thousands of states in memory: every array of a state is a tuple, so that once
    collected young, a state's parts leave the collector's care (CPython untracks a tuple or a dict
    of numbers and strings; a list stays tracked). What stays: the state dict and its reasons (dicts,
    as the score message has them)."""
    import gc

    import orjson

    from models.features import load_state

    events = ([("lead_created", 0, {"fields": {"age": 30, "country": "DE"}}), ("visit", 1, {"session_id": "s1"}),
               ("page_view", 2, {"url": "/pricing"}), ("stage_changed", 3, {"stage": "contacted"}),
               ("activity_created", 4, {"activity_id": "a1", "kind": "call"})] + [("click", 5, {})] * 12)
    state = None
    for i, (kind, ts, props) in enumerate(events):  # folded in place, as the worker does
        state = step(state, Event(f"e{i}", "l1", kind, ts, props), Scorer(RULES), scored_at_ms=ts, copy=False).state
    loaded = load_state(orjson.dumps(state))
    assert orjson.dumps(loaded) == orjson.dumps(state)
    for _ in range(3):  # a collection untracks a tuple once its members are: nested ones take a few
        gc.collect()
    assert [k for k, v in state.items() if gc.is_tracked(v)] == ["reasons"]
    assert [k for k, v in loaded.items() if gc.is_tracked(v)] == ["reasons"]
    parsed = orjson.loads(orjson.dumps(state))  # as lists: each walked by every collection
    assert {"pages", "history", "activities"} <= {k for k, v in parsed.items() if gc.is_tracked(v)}
