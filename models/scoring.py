"""One event in, everything it changes out: the pure step the stream and ``evaluate`` both run.

:func:`step` is ``(state, event) -> StepResult``: the new state, the score message, a hot
message on an upward crossing of the threshold, the snapshot to keep, and - when the event
closes the deal - the labelled training example built only from snapshots taken before it.

>>> from models.events import Event
>>> from models.rules import DEFAULT_CONFIG, load_rules
>>> scorer = Scorer(load_rules(DEFAULT_CONFIG.read_text()))
>>> r = step(None, Event("e1", "l1", "download", 0, {}), scorer, scored_at_ms=5)
>>> r.score["source"], r.score["grade"], r.score["reasons"][0]["feature"]
('rules', 'D', 'download')
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from models.events import Event
from models.features import Features, State, features, fold, new_state
from models.fields import public
from models.learner import ServingModel
from models.rules import Rules

MAX_STAGE_SNAPSHOTS = 12  # bounded per lead: one per stage entry, the oldest dropped first


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Scored:
    score: float
    grade: str
    source: str
    model_version: int
    reasons: list[dict[str, Any]]
    rules_score: float


@dataclass
class Scorer:
    """Rules, plus the learned model once it has seen enough outcomes of both classes."""

    rules: Rules
    model: ServingModel | None = None

    def score(self, f: Features) -> Scored:
        ruled = self.rules.score(f)
        weight = self.model.model_weight() if self.model is not None else 0.0
        if weight == 0.0:
            return Scored(ruled.score, ruled.grade, "rules", self.model.version if self.model else 0,
                          ruled.reasons, ruled.score)
        p, model_reasons = self.model.predict(f)
        score = weight * p + (1 - weight) * ruled.score
        if weight == 1.0:
            source, reasons = "model", model_reasons
        else:
            merged: dict[str, float] = {}
            for r, w in [(r, 1 - weight) for r in ruled.reasons] + [(r, weight) for r in model_reasons]:
                merged[r["feature"]] = merged.get(r["feature"], 0.0) + w * r["contribution"]
            ranked = sorted(merged.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:5]
            source, reasons = "blend", [{"feature": k, "contribution": round(v, 4)} for k, v in ranked]
        return Scored(score, self.rules.grades.grade(score), source, self.model.version, reasons, ruled.score)


@dataclass
class StepResult:
    state: State | None  # None: the lead is deleted
    score: dict[str, Any] | None  # None: emit a tombstone
    deleted_ts: int | None = None  # set when the lead is (still) deleted: events up to then are ignored
    hot: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None  # the latest one, kept as "last before close"
    stage_snapshot: bool = False  # also append it to the lead's stage-entry snapshots
    training: dict[str, Any] | None = None


def step(state: State | None, event: Event, scorer: Scorer, *, scored_at_ms: int,
         stage_snapshots: list[dict[str, Any]] | None = None, last_snapshot: dict[str, Any] | None = None,
         deleted_ts: int | None = None) -> StepResult:
    """Apply ``event`` to ``state`` and score the lead.

    ``stage_snapshots`` and ``last_snapshot`` are only needed for ``deal_won``/``deal_lost``:
    the training example is built from them, i.e. from features scored *before* the outcome.
    ``deleted_ts`` is when the lead was deleted, if it was: a late event from before that time
    must not bring the lead back, so it gets a tombstone too. A newer event starts a new lead.
    """
    if event.type == "lead_deleted" or (deleted_ts is not None and event.ts_ms <= deleted_ts):
        return StepResult(None, None, deleted_ts=max(event.ts_ms, deleted_ts or event.ts_ms))
    before = state if state is not None else new_state(event.lead_id)
    after = fold(before, event, half_life_s=scorer.rules.half_life_s)
    # Private fields (see models/fields.py) never become features: not in snapshots, not learned.
    f = public(features(after, after["last_ts"], half_life_s=scorer.rules.half_life_s), scorer.rules.fields)
    scored = scorer.score(f)
    was_hot = before.get("hot", False)
    # Hysteresis: a hot lead stays hot until it falls below the re-arm level, so a score wobbling
    # around the threshold does not page the sales team again and again.
    hot_now = scored.score >= (scorer.rules.hot_rearm_below if was_hot else scorer.rules.hot_threshold)
    result = StepResult(after, _score_message(event, after, scored, scored_at_ms))
    if hot_now and not was_hot:
        result.hot = {**result.score, "threshold": scorer.rules.hot_threshold}
    after["hot"] = hot_now
    after["score"], after["grade"], after["source"] = round(scored.score, 6), scored.grade, scored.source
    after["reasons"] = scored.reasons
    if event.type in ("deal_won", "deal_lost"):
        if before.get("outcome") is None:  # only the first close of a deal is a label
            snaps = list(stage_snapshots or []) + ([last_snapshot] if last_snapshot else [])
            if snaps:
                result.training = {"lead_id": event.lead_id, "event_id": event.event_id,
                                   "won": event.type == "deal_won", "closed_ts": event.ts_ms, "snapshots": snaps}
        return result  # nothing after the outcome is ever a training snapshot
    if after.get("outcome") is None:
        result.snapshot = {"ts": event.ts_ms, "stage": f.get("stage"), "features": f,
                           "rules_score": round(scored.rules_score, 6)}
        result.stage_snapshot = event.type == "stage_changed" and after["stage"] != before.get("stage")
    return result


def _score_message(event: Event, state: State, scored: Scored, scored_at_ms: int) -> dict[str, Any]:
    return {
        "lead_id": event.lead_id,
        "event_id": event.event_id,
        "event_type": event.type,
        "score": round(scored.score, 6),
        "grade": scored.grade,
        "stage": state.get("stage"),
        "source": scored.source,
        "model_version": scored.model_version,
        "reasons": scored.reasons,
        "event_ts": rfc3339(event.ts_ms),
        "scored_at": rfc3339(scored_at_ms),
    }
