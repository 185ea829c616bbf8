"""One event in, everything it changes out: the pure step the stream and ``evaluate`` both run.

:func:`step` is ``(state, event) -> StepResult``: the new state, the score message, a hot
message on an upward crossing of the threshold, the snapshot to keep, and - when the event
closes the deal - the labelled training example built only from snapshots taken before it.
:func:`rescore` is the same scoring without an event: time decay or a new model (``trigger``).

>>> from models.events import Event
>>> from models.rules import DEFAULT_CONFIG, load_rules
>>> scorer = Scorer(load_rules(DEFAULT_CONFIG.read_text()))
>>> r = step(None, Event("e1", "l1", "download", 0, {}), scorer, scored_at_ms=5)
>>> r.score["source"], r.score["grade"], r.score["reasons"][0]["feature"], r.score["trigger"]
('rules', 'D', 'download', 'event')
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from models import kernels
from models.events import Event
from models.features import Features, State, features, fold, new_state
from models.rules import Rules

if TYPE_CHECKING:  # the rules-only step needs no learner: importing River and SciPy costs ~2.5 s (evaluate's replay)
    from models.learner import ServingModel

MAX_STAGE_SNAPSHOTS = 12  # bounded per lead: one per stage entry, the oldest dropped first
MAX_HISTORY = 10  # the last scores kept in the state, for the lead page: (ts_ms, score, grade, trigger)
TRIGGERS = ("event", "decay", "model")
CLOSING_TYPES = frozenset({"deal_won", "deal_lost"})


@lru_cache(maxsize=256)  # a batch scores many events at one time: the same string each time
def _rfc3339_cached(ms: int) -> str:
    return rfc3339(ms)


def rfc3339(ms: int) -> str:
    """UTC timestamp with milliseconds (``time.strftime`` is ~3x cheaper than ``datetime.isoformat``).

    >>> rfc3339(1767225600123)
    '2026-01-01T00:00:00.123Z'
    """
    seconds, millis = divmod(int(ms), 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@lru_cache(maxsize=4096)  # a batch's events mostly fall in a few seconds
def _second(seconds: int) -> str:
    return kernels.IMPL.utc_second(seconds)


class Scored(NamedTuple):  # a tuple: built on every event, ~3x cheaper than a frozen dataclass
    score: float
    grade: str
    source: str
    model_version: int
    reasons: list[dict[str, Any]]
    rules_score: float | None  # None when the model alone was served: see :meth:`Scorer.rules_score`


@dataclass
class Scorer:
    """Rules, plus the learned model once it has seen enough outcomes of both classes."""

    rules: Rules
    model: ServingModel | None = None

    def score(self, f: Features) -> Scored:
        """The lead's score; ValueError if it is not a probability (a NaN stored in the state would
        fail every later read of the lead: the event is dead-lettered instead, the lead left as it was)."""
        return _probability(self._score(f))

    def score_state(self, state: State, at_ms: int) -> tuple[Scored, Features | None]:
        """:meth:`score` of the lead's features at ``at_ms``, and those features; None instead of them
        where the model alone scores (it reads its inputs off the state: the features are not built)."""
        if self.model is not None and self.model.model_weight() == 1.0:
            scored = self._model_alone(*self.model.predict_state(state, at_ms, half_life_s=self.rules.half_life_s,
                                                                 fields=self.rules.fields))
            return _probability(scored), None
        f = features(state, at_ms, half_life_s=self.rules.half_life_s, fields=self.rules.fields)
        return self.score(f), f

    def _score(self, f: Features) -> Scored:
        weight = self.model.model_weight() if self.model is not None else 0.0
        if weight == 1.0:  # the model alone: the rules are only computed where a snapshot needs them
            return self._model_alone(*self.model.predict(f))
        ruled = self.rules.score(f)
        if weight == 0.0:
            return Scored(ruled.score, ruled.grade, "rules", self.model.version if self.model else 0,
                          ruled.reasons, ruled.score)
        p, model_reasons = self.model.predict(f)
        score = weight * p + (1 - weight) * ruled.score
        merged: dict[str, float] = {}
        for r, w in [(r, 1 - weight) for r in ruled.reasons] + [(r, weight) for r in model_reasons]:
            merged[r["feature"]] = merged.get(r["feature"], 0.0) + w * r["contribution"]
        ranked = kernels.IMPL.largest(list(merged.items()), 5)  # the largest first, ties by name
        reasons = [{"feature": k, "contribution": kernels.IMPL.round_digits(v, 4)} for k, v in ranked]
        return Scored(score, self.rules.grades.grade(score), "blend", self.model.version, reasons, ruled.score)

    def _model_alone(self, p: float, reasons: list[dict[str, Any]]) -> Scored:
        assert self.model is not None
        return Scored(p, self.rules.grades.grade(p), "model", self.model.version, reasons, None)

    def rules_score(self, f: Features, scored: Scored) -> float:
        """The point rules' score of ``f`` (training snapshots keep it beside the model's, as a baseline)."""
        return scored.rules_score if scored.rules_score is not None else self.rules.score(f, max_reasons=0).score

    @property
    def version(self) -> int:
        return self.model.version if self.model is not None else 0


def _probability(scored: Scored) -> Scored:
    if not 0.0 <= scored.score <= 1.0:  # NaN too
        raise ValueError(f"the {scored.source} score {scored.score!r} is not a probability")
    return scored


@dataclass
class StepResult:
    state: State | None  # None: the lead is deleted
    score: dict[str, Any] | None  # None: emit a tombstone
    deleted_ts: int | None = None  # set when the lead is (still) deleted: events up to then are ignored
    hot: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None  # set on a stage entry: append it to the lead's stage snapshots
    training: dict[str, Any] | None = None
    # The rules' exact score of the training example's last snapshot (rounded in it), when this step
    # took that snapshot (None: the last one is a stored stage snapshot): evaluate's "rules" figure.
    last_rules_score: float | None = None

    @property
    def stage_snapshot(self) -> bool:
        return self.snapshot is not None


def step(state: State | None, event: Event, scorer: Scorer, *, scored_at_ms: int,
         stage_snapshots: list[dict[str, Any]] | None = None, deleted_ts: int | None = None,
         copy: bool = True, score: bool = True) -> StepResult:
    """Apply ``event`` to ``state`` and score the lead.

    ``stage_snapshots`` are only needed for ``deal_won``/``deal_lost``: the training example is
    built from them and from the lead's features just before the outcome, i.e. from features
    scored *before* the outcome. ``deleted_ts`` is when the lead was deleted, if it was: a late
    event from before that time must not bring the lead back, so it gets a tombstone too. A newer
    event starts a new lead. ``copy=False`` folds into ``state`` in place (the stream copies a
    lead's state once per batch, not once per event). ``score=False`` (``evaluate``'s replay, which
    reads only the training examples): the event is folded, not scored; the result has no score and
    no hot message, the state keeps no score. The snapshots and training examples are those of a
    scored step (features never read a score).
    """
    if event.type == "lead_deleted" or (deleted_ts is not None and event.ts_ms <= deleted_ts):
        return StepResult(None, None, deleted_ts=max(event.ts_ms, deleted_ts or event.ts_ms))
    half_life_s = scorer.rules.half_life_s
    closing = event.type in CLOSING_TYPES
    first_close = closing and state is not None and state.get("outcome") is None
    # The last snapshot before the outcome: the features as of the lead's last event before it.
    last, last_rules_score = _snapshot(state, state["last_ts"], scorer.rules) \
        if first_close and state["last_ts"] is not None else (None, None)
    state_score = (state["score"], state["grade"]) if first_close and "score" in state else None
    was_hot = bool(state and state.get("hot"))
    stage_before = state.get("stage") if state else None
    after = fold(state if state is not None else new_state(event.lead_id), event, half_life_s=half_life_s, copy=copy)
    # Private fields (see models/fields.py) never become features: not in snapshots, not learned.
    # Unscored, the features and rules of most events are skipped: about half of a rules-only step;
    # scored by the model alone, the features are built only for a snapshot.
    scored, f = scorer.score_state(after, after["last_ts"]) if score else (None, None)
    if scored is None:
        result = StepResult(after, None)
    else:
        result = StepResult(after, _score_message(event.lead_id, event.event_id, event.type, event.ts_ms, after,
                                                  scored, scored_at_ms, "event"))
        result.hot = _apply_score(after, scored, scorer.rules, was_hot, result.score, scored_at_ms, "event")
        after["score_as_of"] = after["last_ts"]  # the features' time: decay is due from there
    if closing:
        if first_close and state_score is not None and scored is not None:  # the success curve: the grade before
            after["close_score"], after["close_grade"] = state_score
        snaps = list(stage_snapshots or []) + ([last] if last else [])
        if first_close and snaps:  # only the first close of a deal is a label
            result.training = {"lead_id": event.lead_id, "event_id": event.event_id,
                               "won": event.type == "deal_won", "closed_ts": event.ts_ms, "snapshots": snaps}
            result.last_rules_score = last_rules_score  # None when the last snapshot is a stored one
        return result  # nothing after the outcome is ever a training snapshot
    if after.get("outcome") is None and event.type == "stage_changed" and after["stage"] != stage_before:
        if f is None:
            f = features(after, after["last_ts"], half_life_s=half_life_s, fields=scorer.rules.fields)
        rules_score = scorer.rules.score(f, max_reasons=0).score if scored is None else scorer.rules_score(f, scored)
        result.snapshot = {"ts": event.ts_ms, "stage": f.get("stage"), "features": f,
                           "rules_score": round(rules_score, 6)}
    return result


def rescore(state: State, scorer: Scorer, *, now_ms: int, trigger: str) -> StepResult:
    """Score ``state`` again without an event (in place): time decay up to ``now_ms``, or a new model.

    The features are taken at ``max(now_ms, last event time)``; nothing is folded, so counts and
    the training snapshots do not change.

    >>> from models.events import Event
    >>> from models.rules import DEFAULT_CONFIG, load_rules
    >>> scorer = Scorer(load_rules(DEFAULT_CONFIG.read_text()))
    >>> r = step(None, Event("e1", "l1", "download", 0, {}), scorer, scored_at_ms=0)
    >>> later = rescore(r.state, scorer, now_ms=30 * 86_400_000, trigger="decay")
    >>> later.score["score"] < r.score["score"], later.score["trigger"], later.score["event_id"]
    (True, 'decay', None)
    """
    was_hot = bool(state.get("hot"))
    at = max(now_ms, state["last_ts"] or now_ms)
    scored, _ = scorer.score_state(state, at)
    message = _score_message(state["lead_id"], None, None, at, state, scored, now_ms, trigger)
    result = StepResult(state, message)
    result.hot = _apply_score(state, scored, scorer.rules, was_hot, message, now_ms, trigger)
    state["score_as_of"] = at
    return result


def _snapshot(state: State, at_ms: int, rules: Rules) -> tuple[dict[str, Any], float]:
    """The snapshot of the lead's features at ``at_ms`` (its rules score rounded), and that score exact."""
    f = features(state, at_ms, half_life_s=rules.half_life_s, fields=rules.fields)
    exact = rules.score(f, max_reasons=0).score
    return {"ts": at_ms, "stage": f.get("stage"), "features": f, "rules_score": round(exact, 6)}, exact


def _apply_score(state: State, scored: Scored, rules: Rules, was_hot: bool, message: dict[str, Any],
                 scored_at_ms: int, trigger: str) -> dict[str, Any] | None:
    """Store the score in the state; return the hot message on an upward crossing of the threshold."""
    # Hysteresis: a hot lead stays hot until it falls below the re-arm level, so a score wobbling
    # around the threshold does not page the sales team again and again.
    hot_now = scored.score >= (rules.hot_rearm_below if was_hot else rules.hot_threshold)
    state["hot"] = hot_now
    state["score"], state["grade"], state["source"] = message["score"], scored.grade, scored.source
    # The rules' reasons also carry their points (the message shows them; the state has no room for
    # them); the model's and the blend's are new dicts of the two keys kept, shared with the message.
    state["reasons"] = tuple(scored.reasons) if scored.source != "rules" else tuple([
        {"feature": r["feature"], "contribution": r["contribution"]} for r in scored.reasons])
    state["model_version"] = scored.model_version
    state["scored_at"] = scored_at_ms
    # Tuples, as every array of the state (models.features.load_state says why).
    kept = state.get("history", ())
    kept = kept[max(0, len(kept) + 1 - MAX_HISTORY):]
    if kept and kept[-1].__class__ is not tuple:  # a state built of JSON lists (by hand, in tests)
        kept = tuple(map(tuple, kept))
    state["history"] = (*kept, (scored_at_ms, kernels.IMPL.round_digits(message["score"], 4), scored.grade, trigger))
    return {**message, "threshold": rules.hot_threshold} if hot_now and not was_hot else None


def _score_message(lead_id: str, event_id: str | None, event_type: str | None, event_ts: int, state: State,
                   scored: Scored, scored_at_ms: int, trigger: str) -> dict[str, Any]:
    """The score message (the contract's ``leads.scores`` value).

    >>> from models.rules import DEFAULT_CONFIG, load_rules
    >>> scored = Scorer(load_rules(DEFAULT_CONFIG.read_text())).score({})
    >>> sorted(_score_message("l1", "e1", "visit", 0, {}, scored, 0, "event"))[:4]
    ['event_id', 'event_ts', 'event_type', 'grade']
    """
    return {
        "lead_id": lead_id,
        "event_id": event_id,
        "event_type": event_type,
        "score": kernels.IMPL.round_digits(scored.score, 6),
        "grade": scored.grade,
        "stage": state.get("stage"),
        "source": scored.source,
        "model_version": scored.model_version,
        "reasons": scored.reasons,
        "event_ts": rfc3339(event_ts),
        "scored_at": _rfc3339_cached(scored_at_ms),
        "trigger": trigger,
    }
