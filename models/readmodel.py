"""What one lead contributes to the read models (leaderboards, funnel, owners, success curve).

Pure. Every read model is a sum over leads of :func:`contributions`: counters (added up) and
sorted-set memberships (one score per set). The stream applies, in the same atomic write as the
lead's state, the difference between the lead's contributions before and after the write
(:func:`diff`); ``leadstream rebuild-views`` recomputes the sums from the lead states. Because
both use this one function, the incremental views equal the rebuilt ones by construction, as
long as every write applies its difference (tested on random streams).

Nothing here depends on the current time, so views stay true between writes; what does depend
on it (stalled leads, days in stage) is read off sorted sets keyed by a timestamp.

>>> from models.features import new_state
>>> lead = new_state("l1") | {"stage": "proposal", "stage_ts": 5, "stages_visited": ["new", "proposal"],
...                          "score": 0.91, "grade": "A+", "hot": True, "score_as_of": 10, "fields": {"owner": "Ana"}}
>>> counters, sets = contributions(lead, rescore_every_ms=100)
>>> counters["open"], counters["open:proposal"], counters["o:Ana:hot"], counters["adv:new"]
(1, 1, 1, 1)
>>> sets["lb"], sets["lb:proposal"], sets["lbo:Ana"], sets["st:proposal"], sets["due"]
(0.91, 0.91, 0.91, 5, 110)
>>> counters2, sets2 = contributions(lead | {"score": 0.5, "hot": False}, rescore_every_ms=100)
>>> changes = diff((counters, sets), (counters2, sets2))
>>> changes.counters["o:Ana:hot"], changes.set_adds["lb"], sorted(changes.set_removes)
(-1, 0.5, ['hot'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.events import STAGES
from models.features import State

DAY_MS = 86_400_000
OWNER_FIELD = "owner"
Contribution = tuple[dict[str, int], dict[str, float]]
EMPTY: Contribution = ({}, {})


def owner_of(state: State) -> str | None:
    """The sales manager who owns the lead (``fields.owner`` of ``lead_created``/``lead_updated``)."""
    owner = state["fields"].get(OWNER_FIELD)
    return str(owner)[:100] if owner not in (None, "") else None


def decile(score: float) -> int:
    """0 (score below 0.1) .. 9 (0.9 and above).

    >>> decile(0.0), decile(0.55), decile(1.0)
    (0, 5, 9)
    """
    return min(9, max(0, int(score * 10)))


def contributions(state: State | None, *, rescore_every_ms: int) -> Contribution:
    """Counters and sorted-set scores this lead adds to the read models (none when deleted)."""
    if state is None:
        return EMPTY
    counters: dict[str, int] = {"leads": 1}
    sets: dict[str, float] = {}
    visited = [STAGES.index(s) for s in state["stages_visited"] if s in STAGES]
    top = max(visited, default=-1)
    for i in visited:
        counters[f"reached:{STAGES[i]}"] = 1
        if i < top:  # skipping stages still counts as moving on
            counters[f"adv:{STAGES[i]}"] = 1
    _add(counters, "opens", state["counts"].get("email_open", 0))
    _add(counters, "replies", state["counts"].get("email_replied", 0))
    owner = owner_of(state)
    outcome = state.get("outcome")
    if outcome:
        _closed(state, outcome, owner, counters, sets)
    elif "score" in state:
        _open(state, owner, counters, sets, rescore_every_ms)
    return counters, sets


def score_contributions(state: State | None, *, rescore_every_ms: int) -> Contribution:
    """The part of :func:`contributions` that depends on the lead's score (grade, hot, the
    leaderboards, the next decay): all a rescore can change.

    :func:`models.scoring.rescore` changes only the score fields of an open lead, so the
    :func:`diff` of this part before and after it equals the diff of the whole contributions, at a
    fraction of the cost (a rescoring pass computes it for every open lead). Empty when the lead is
    deleted, closed or not scored yet.

    >>> from models.features import new_state
    >>> lead = new_state("l1") | {"stage": "proposal", "score": 0.91, "grade": "A+", "hot": True,
    ...                          "score_as_of": 10, "fields": {"owner": "Ana"}}
    >>> counters, sets = score_contributions(lead, rescore_every_ms=100)
    >>> sorted(counters), sorted(sets)
    (['grade:A+', 'o:Ana:hot', 'sg:proposal:A+'], ['due', 'hot', 'lb', 'lb:proposal', 'lbo:Ana'])
    """
    if state is None or state.get("outcome") or "score" not in state:
        return EMPTY
    counters: dict[str, int] = {}
    sets: dict[str, float] = {}
    _scored(state, state["stage"] or "none", owner_of(state), counters, sets, rescore_every_ms)
    return counters, sets


def _open(state: State, owner: str | None, counters: dict[str, int], sets: dict[str, float],
          rescore_every_ms: int) -> None:
    stage = state["stage"] or "none"
    overdue = sum(1 for a in state["activities"].values() if a[0] == "overdue")
    counters.update({"open": 1, f"open:{stage}": 1})
    _add(counters, "overdue", overdue)
    if state["stage"] is not None:
        sets[f"st:{stage}"] = state["stage_ts"]
    if owner is not None:
        counters[f"o:{owner}:open"] = 1
        _add(counters, f"o:{owner}:overdue", overdue)
        if state["stage"] is not None:
            sets[f"sto:{owner}"] = state["stage_ts"]
    _scored(state, stage, owner, counters, sets, rescore_every_ms)


def _scored(state: State, stage: str, owner: str | None, counters: dict[str, int], sets: dict[str, float],
            rescore_every_ms: int) -> None:
    """An open lead's score-dependent contributions (see :func:`score_contributions`)."""
    score, grade, hot = float(state["score"]), state["grade"], bool(state.get("hot"))
    counters[f"grade:{grade}"] = 1
    counters[f"sg:{stage}:{grade}"] = 1
    sets["lb"] = sets[f"lb:{stage}"] = score
    if hot:
        sets["hot"] = score
    as_of = state.get("score_as_of", state.get("scored_at"))
    if as_of is not None:  # decay is due a cadence after the time the score is as of (an old import: now)
        sets["due"] = as_of + rescore_every_ms
    if owner is not None:
        _add(counters, f"o:{owner}:hot", int(hot))
        sets[f"lbo:{owner}"] = score


def _closed(state: State, outcome: str, owner: str | None, counters: dict[str, int], sets: dict[str, float]) -> None:
    counters[f"closed:{outcome}"] = 1
    if owner is not None:
        counters[f"o:{owner}:{outcome}"] = 1
    if state.get("close_grade") is not None:  # what the lead was graded just before its outcome
        counters[f"cg:{state['close_grade']}:{outcome}"] = 1
        counters[f"cd:{decile(state['close_score'])}:{outcome}"] = 1
    start = state["created_ts"] if state["created_ts"] is not None else state["first_ts"]
    if start is not None and state.get("closed_ts") is not None:
        sets["dtc"] = round(max(0, state["closed_ts"] - start) / DAY_MS, 3)


def _add(counters: dict[str, int], name: str, n: int) -> None:
    if n:
        counters[name] = counters.get(name, 0) + n


@dataclass
class ViewChanges:
    """What a write changes in the read models: counter deltas, set members added (or re-scored) and removed."""

    counters: dict[str, int] = field(default_factory=dict)
    set_adds: dict[str, float] = field(default_factory=dict)
    set_removes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.counters or self.set_adds or self.set_removes)


def diff(before: Contribution, after: Contribution) -> ViewChanges:
    """The changes that turn the views holding ``before`` into views holding ``after``."""
    (c0, s0), (c1, s1) = before, after
    changes = ViewChanges()
    for name in c0.keys() | c1.keys():
        delta = c1.get(name, 0) - c0.get(name, 0)
        if delta:
            changes.counters[name] = delta
    changes.set_adds = {name: score for name, score in s1.items() if s0.get(name) != score}
    changes.set_removes = sorted(s0.keys() - s1.keys())
    return changes
