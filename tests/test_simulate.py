"""The simulated traffic (models/offline/simulate.py): deterministic, contract-valid, with a hidden pattern."""

from __future__ import annotations

from collections import Counter, defaultdict

import orjson
import pytest

from models.events import EVENT_TYPES, STAGES, parse_event, topic_kind_of
from models.offline.simulate import ARRIVAL_DAYS, START_MS, merge_events, simulate, simulate_population, timed

DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def population() -> list:
    return simulate_population(2000, seed=11)


def test_same_seed_same_events_other_seed_other_events() -> None:
    a, b, c = simulate(40, seed=3), simulate(40, seed=3), simulate(40, seed=4)
    assert orjson.dumps(a) == orjson.dumps(b)
    assert a != c
    assert {e["event_id"] for e in a}.isdisjoint(e["event_id"] for e in c)
    assert len({e["event_id"] for e in a}) == len(a)  # ids unique


def test_sorted_by_ts_and_start_ms_respected() -> None:
    events = simulate(60, seed=5, start_ms=1_000_000_000_000)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert ts[0] >= 1_000_000_000_000
    created = [e["ts"] for e in events if e["type"] == "lead_created"]
    assert len(created) == 60 and max(created) < 1_000_000_000_000 + ARRIVAL_DAYS * DAY_MS


def test_every_event_meets_the_contract(population: list) -> None:
    events = merge_events(population[:300])
    for e in events:
        assert set(e) == {"event_id", "lead_id", "type", "ts", "props"}
        parse_event(e["lead_id"].encode(), orjson.dumps(e), topic_kind=topic_kind_of(e["type"]))
    assert set(Counter(e["type"] for e in events)) == set(EVENT_TYPES)  # every type appears


def test_each_lead_tells_a_consistent_story(population: list) -> None:
    for lead in population:
        events = lead.events
        types = [e["type"] for e in events]
        assert types[0] == "lead_created" and types.count("lead_created") == 1
        assert all(e["lead_id"] == lead.lead_id for e in events)
        ts = [e["ts"] for e in events]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
        stages = [e["props"]["stage"] for e in events if e["type"] == "stage_changed"]
        assert stages == list(STAGES[:len(stages)])  # in funnel order, no skips, from "new"
        outcomes = [t for t in types if t in ("deal_won", "deal_lost")]
        assert outcomes == ([] if lead.outcome is None else [f"deal_{lead.outcome}"])
        if lead.outcome is not None:  # nothing but a deletion after the outcome
            assert set(types[types.index(outcomes[0]) + 1:]) <= {"lead_deleted"}
        if lead.outcome == "won":  # winners sign from negotiation or closing
            assert stages[-1] in ("negotiation", "closing")
        assert lead.downloaded == ("download" in types)
        assert lead.reached_proposal <= ("proposal" in stages)
        states: dict[str, list[str]] = defaultdict(list)
        for e in events:
            if e["type"].startswith("activity_"):
                states[e["props"]["activity_id"]].append(e["type"])
        for history in states.values():
            assert history[0] == "activity_created" and history.count("activity_created") == 1


def test_population_mix(population: list) -> None:
    outcomes = Counter(lead.outcome for lead in population)
    assert 0.05 < outcomes[None] / len(population) < 0.25  # some stay open
    won_rate = outcomes["won"] / (outcomes["won"] + outcomes["lost"])
    assert 0.15 < won_rate < 0.5
    arrivals = [lead.arrival_ms for lead in population]
    assert arrivals == sorted(arrivals) and arrivals[0] >= START_MS
    assert all(0 < lead.p_win < 1 for lead in population)


def test_hidden_pattern_download_and_proposal_win_far_more(population: list) -> None:
    def win_rate(leads: list) -> float:
        closed = [lead for lead in leads if lead.outcome]
        return sum(lead.outcome == "won" for lead in closed) / len(closed)

    hot = [lead for lead in population if lead.downloaded and lead.reached_proposal]
    rest = [lead for lead in population if not (lead.downloaded and lead.reached_proposal)]
    assert len(hot) > 100
    assert win_rate(hot) > 0.7 and win_rate(rest) < 0.35
    assert win_rate(hot) > 2.5 * win_rate(rest)
    # fit matters too: within the rest, the better-fitting half wins more often
    rest.sort(key=lambda lead: lead.fit)
    assert win_rate(rest[len(rest) // 2:]) > 1.3 * win_rate(rest[:len(rest) // 2])


def test_timed_gives_simulated_seconds() -> None:
    events = simulate(5, seed=2)
    pairs = list(timed(events))
    assert pairs[0][0] == 0.0 and [e for _, e in pairs] == events
    assert pairs[-1][0] == (events[-1]["ts"] - events[0]["ts"]) / 1000


def test_negative_leads_rejected() -> None:
    with pytest.raises(ValueError, match="leads=-1"):
        simulate(-1, seed=1)


def test_the_last_stage_hints_at_the_outcome_without_giving_it_away() -> None:
    last_stage = defaultdict(Counter)
    for lead in simulate_population(3000, seed=1):
        if lead.outcome:
            stages = [e["props"]["stage"] for e in lead.events if e["type"] == "stage_changed"]
            last_stage[stages[-1]][lead.outcome] += 1
    assert last_stage["closing"]["lost"] > 0 and last_stage["negotiation"]["won"] > 0
    assert last_stage["closing"]["won"] > 5 * last_stage["closing"]["lost"]
