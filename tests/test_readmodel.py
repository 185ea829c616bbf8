"""Read-model contributions: a rescore's view changes computed from the score part alone are exact."""

import copy
import random
from collections import Counter

from models.events import STAGES, Event
from models.learner import Trainer
from models.offline.simulate import simulate
from models.readmodel import contributions, diff, score_contributions
from models.rules import DEFAULT_CONFIG, load_rules
from models.scoring import Scorer, rescore, step

RULES = load_rules(DEFAULT_CONFIG.read_text())
DAY = 86_400_000
EVERY = DAY


def simulated_states(n_leads: int, seed: int) -> list[dict]:
    """Lead states as the step leaves them: open and closed, with and without owners and stages."""
    rng = random.Random(seed)
    states: dict[str, dict] = {}
    for e in simulate(n_leads, seed=seed):
        props = dict(e["props"])
        if e["type"] in ("lead_created", "lead_updated"):  # some leads have an owner, some not
            props["fields"] = {**props.get("fields", {}), "owner": rng.choice(["Ana", "Bo", None, ""])}
        event = Event(e["event_id"], e["lead_id"], e["type"], e["ts"], props)
        r = step(states.get(e["lead_id"]), event, Scorer(RULES), scored_at_ms=e["ts"])
        if r.state is None:
            states.pop(e["lead_id"], None)
        else:
            states[e["lead_id"]] = r.state
    return list(states.values())


def a_model() -> Scorer:
    trainer = Trainer(min_outcomes=1)
    for won in (True, False, True, False):
        trainer.learn([{"features": {"n_download": 2.0 * won}, "rules_score": 0.5, "stage": "proposal"}], won)
    return Scorer(RULES, trainer.serving())


def with_the_other_score(state: dict) -> dict:
    """The lead as if its last score had been the opposite one: the rescore then crosses the hot
    threshold and the grades the other way."""
    if state.get("outcome") or "score" not in state:
        return state
    high = state["score"] < 0.5
    return state | {"score": 0.99 if high else 0.01, "grade": "A+" if high else "D", "hot": high}


def test_a_rescores_view_changes_from_the_score_part_equal_those_of_the_whole_contributions():
    states = simulated_states(150, seed=3)
    states += [with_the_other_score(s) for s in states]
    assert any(s.get("outcome") for s in states) and any(not s.get("outcome") for s in states)
    moved: Counter[str] = Counter()
    for scorer, trigger, later in ((Scorer(RULES), "decay", 40 * DAY), (a_model(), "model", DAY)):
        for state in states:
            if state.get("outcome") or "score" not in state:
                assert score_contributions(state, rescore_every_ms=EVERY) == ({}, {})
                continue
            state = copy.deepcopy(state)
            whole = contributions(state, rescore_every_ms=EVERY)
            part = score_contributions(state, rescore_every_ms=EVERY)
            rescore(state, scorer, now_ms=state["last_ts"] + later, trigger=trigger)
            expected = diff(whole, contributions(state, rescore_every_ms=EVERY))
            got = diff(part, score_contributions(state, rescore_every_ms=EVERY))
            assert (got.counters, got.set_adds, got.set_removes) == \
                (expected.counters, expected.set_adds, expected.set_removes)
            moved.update(name.split(":")[0] for name in [*expected.counters, *expected.set_adds,
                                                         *expected.set_removes])
    # The comparison covered every kind of change a rescore makes (not only empty ones).
    assert {"grade", "sg", "o", "lb", "lbo", "hot", "due"} <= set(moved), moved


def test_the_score_part_is_included_in_the_whole_contributions():
    for state in simulated_states(40, seed=5):
        counters, sets = contributions(state, rescore_every_ms=EVERY)
        part_counters, part_sets = score_contributions(state, rescore_every_ms=EVERY)
        assert part_counters.items() <= counters.items() and part_sets.items() <= sets.items()
        if not state.get("outcome") and "score" in state:
            assert part_sets["lb"] == sets["lb"] and f"lb:{state['stage'] or 'none'}" in part_sets
            assert state["stage"] in STAGES or state["stage"] is None
