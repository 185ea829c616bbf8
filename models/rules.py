"""Point rules: the transparent score (cold start and baseline for the learning model).

The config is TOML (see ``models/scoring.toml``). :func:`load_rules` validates it and fails with
a message naming the key and the expected form. Scores are ``sigmoid((points - midpoint) / width)``;
a reason's ``contribution`` is its points divided by ``width``, i.e. its share of the log-odds,
the same unit the model's reasons use.

>>> rules = load_rules(DEFAULT_CONFIG.read_text())
>>> result = rules.score({"d_download": 2.0, "stage": "proposal", "f_industry": "software", "f_age": 30.0})
>>> result.points, round(result.score, 3), result.grade
(205.0, 0.668, 'B+')
>>> [r["feature"] for r in result.reasons]
['download', 'age in 25..45', 'stage=proposal', 'industry=software']
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from models import kernels
from models.events import STAGES
from models.features import Features
from models.fields import FieldPolicy, PolicyError, parse_policy
from models.grading import Grades

DEFAULT_CONFIG = Path(__file__).with_name("scoring.toml")
_UNSEEN = object()  # a value the memo of value rules has not seen yet (None: seen, no points)
# Values the memo keys: exactly str and float (an int or a bool equal to a float must not share its entry:
# a range matches floats only).
_MEMO_TYPES = frozenset({str, float})


class ConfigError(ValueError):
    """The scoring config has a key of the wrong form."""


class RuleScore(NamedTuple):  # a tuple: built on every event, ~3x cheaper than a frozen dataclass
    points: float
    score: float
    grade: str
    reasons: list[dict[str, Any]]


@dataclass(frozen=True)
class Capped:
    points: float
    cap: float

    def apply(self, count: float) -> float:
        raw = self.points * count
        return min(raw, self.cap) if self.points >= 0 else max(raw, self.cap)


@dataclass(frozen=True)
class ValueRule:
    """One explicit-field rule: an exact (lowercased) string, a numeric range, or ``*``."""

    key: str
    points: float
    low: float | None = None
    high: float | None = None

    def matches(self, value: float | str) -> bool:
        if self.key == "*":
            return True
        if self.low is not None or self.high is not None:
            if not isinstance(value, float):
                return False
            return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        return isinstance(value, str) and value == self.key


@dataclass(frozen=True)
class Rules:
    half_life_s: float
    midpoint: float
    width: float
    grades: Grades
    hot_threshold: float
    hot_rearm_below: float
    behaviour: dict[str, Capped]
    recency: list[tuple[float, float]]  # (seconds, points)
    stage: dict[str, float]
    activities: dict[str, Capped]
    explicit: dict[str, list[ValueRule]] = field(default_factory=dict)
    by_feature: dict[str, list[ValueRule]] = field(default_factory=dict)  # [features.NAME]: any feature
    fields: FieldPolicy = field(default_factory=FieldPolicy)  # [fields]: what the model may learn from

    def points(self, f: Features) -> dict[str, float]:
        """Every non-zero contribution in points, keyed by a readable reason name."""
        out: dict[str, float] = {}
        get = f.get
        for key, event_type, points, cap in self._behaviour:
            count = get(key)
            if count.__class__ is float and count > 0:  # Capped.apply, inline: a call less per rule
                raw = points * count
                out[event_type] = (raw if raw <= cap else cap) if points >= 0 else (raw if raw >= cap else cap)
        recency = get("recency_s")
        if isinstance(recency, float):
            matching = [p for seconds, p in self.recency if recency > seconds]
            if matching:
                out["recency"] = min(matching)
        stage = get("stage")
        if isinstance(stage, str):
            stage_points = self.stage.get(stage)
            if stage_points:
                out[f"stage={stage}"] = stage_points
        for key, status, points, cap in self._activities:
            n = get(key)
            if n.__class__ is float and n > 0:
                raw = points * n
                out[status] = (raw if raw <= cap else cap) if points >= 0 else (raw if raw >= cap else cap)
        memo = self._value_memo
        for key, name, value_rules in self._value_tables:
            value = get(key)
            if value is not None:
                hit = memo.get((name, value), _UNSEEN) if value.__class__ in _MEMO_TYPES else _UNSEEN
                if hit is _UNSEEN:
                    hit = self._value_points(name, value_rules, value)
                if hit is not None:
                    out[hit[0]] = hit[1]
        return out if 0.0 not in out.values() else {k: v for k, v in out.items() if v}

    @cached_property
    def _behaviour(self) -> list[tuple[str, str, float, float]]:
        return [("d_" + event_type, event_type, rule.points, rule.cap) for event_type, rule in self.behaviour.items()]

    @cached_property
    def _activities(self) -> list[tuple[str, str, float, float]]:
        return [("activities_" + status, "activities_" + status, rule.points, rule.cap)
                for status, rule in self.activities.items()]

    @cached_property
    def _value_tables(self) -> list[tuple[str, str, list[ValueRule]]]:
        return [(prefix + name, name, rules)
                for prefix, table in (("f_", self.explicit), ("", self.by_feature)) for name, rules in table.items()]

    @cached_property
    def _value_memo(self) -> dict[tuple[str, str], tuple[str, float] | None]:
        return {}  # (field, value) -> its reason and points: a lead's values come back with each of its events

    def _value_points(self, name: str, value_rules: list[ValueRule], value: float | str) -> tuple[str, float] | None:
        """The reason and points of the first rule ``value`` matches (None: none, or zero points)."""
        memo_key = (name, value) if value.__class__ in _MEMO_TYPES else None
        hit = None
        for rule in value_rules:  # the first matching rule wins
            if rule.matches(value):
                if rule.points:
                    hit = (f"{name}={value}" if rule.key == value else f"{name} in {rule.key}", rule.points)
                break
        if memo_key is not None:
            if len(self._value_memo) > 100_000:
                self._value_memo.clear()
            self._value_memo[memo_key] = hit
        return hit

    def score(self, f: Features, max_reasons: int = 5) -> RuleScore:
        contributions = self.points(f)
        total = float(sum(contributions.values()))
        score = 1.0 / (1.0 + math.exp(-(total - self.midpoint) / self.width))
        if not max_reasons:
            return RuleScore(total, score, self.grades.grade(score), [])
        # The largest first, ties by name (names are unique), as the model's reasons are ranked.
        ranked = kernels.IMPL.largest(list(contributions.items()), max_reasons)
        width = self.width
        round_digits = kernels.IMPL.round_digits  # round(), faster where compiled
        reasons = [{"feature": k, "contribution": round_digits(v / width, 4), "points": v} for k, v in ranked]
        return RuleScore(total, score, self.grades.grade(score), reasons)


def _number(cfg: dict[str, Any], path: str, *, positive: bool = False) -> float:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"scoring config [{path}]: missing; expected a number")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or (positive and node <= 0):
        raise ConfigError(f"scoring config [{path}] = {node!r}: expected a number{' > 0' if positive else ''}")
    return float(node)


def _capped(section: str, name: str, raw: Any) -> Capped:
    if not isinstance(raw, dict) or set(raw) != {"points", "cap"}:
        raise ConfigError(f"scoring config [{section}].{name} = {raw!r}: expected {{ points = N, cap = N }}")
    points = _number(raw, "points")
    cap = _number(raw, "cap")
    if points * cap < 0:
        raise ConfigError(f"scoring config [{section}].{name}: cap {cap} must have the sign of points {points}")
    return Capped(points, cap)


def _value_rule(table: str, key: str, points: Any) -> ValueRule:
    if isinstance(points, bool) or not isinstance(points, (int, float)):
        raise ConfigError(f"scoring config [{table}].{key!r} = {points!r}: expected a number of points")
    if ".." in key:
        low, _, high = key.partition("..")
        try:
            return ValueRule(key, float(points), float(low) if low else None, float(high) if high else None)
        except ValueError:
            raise ConfigError(f"scoring config [{table}].{key!r}: expected a range 'min..max'") from None
    return ValueRule(key.strip().lower(), float(points))


def load_rules(text: str) -> Rules:
    """Parse and validate a scoring config (TOML text)."""
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scoring config is not valid TOML: {exc}") from None
    behaviour = {k: _capped("behaviour", k, v) for k, v in cfg.get("behaviour", {}).items()}
    activities = {k: _capped("activities", k, v) for k, v in cfg.get("activities", {}).items()}
    for status in activities:
        if status not in ("open", "completed", "overdue"):
            raise ConfigError(f"scoring config [activities].{status}: expected one of open, completed, overdue")
    stage = {}
    for name in cfg.get("stage", {}):
        if name not in STAGES:
            raise ConfigError(f"scoring config [stage].{name}: expected one of {', '.join(STAGES)}")
        stage[name] = _number(cfg, f"stage.{name}")
    recency = []
    for rule in cfg.get("recency", {}).get("rules", []):
        recency.append((_number(rule, "days", positive=True) * 86400, _number(rule, "points")))
    explicit = {
        name: [_value_rule(f"explicit.{name}", key, pts) for key, pts in values.items()]
        for name, values in cfg.get("explicit", {}).items()
    }
    by_feature = {
        name: [_value_rule(f"features.{name}", key, pts) for key, pts in values.items()]
        for name, values in cfg.get("features", {}).items()
    }
    try:
        policy = parse_policy(cfg.get("fields", {}))
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    for name in explicit:
        if policy.is_private(name):
            raise ConfigError(f"scoring config [explicit.{name}]: field {name!r} is private (never a feature, see "
                              f"[fields]); remove these points or declare the field in [fields.declared]")
    grades_cfg = cfg.get("grades")
    if not isinstance(grades_cfg, dict):
        raise ConfigError("scoring config [grades]: missing; expected a table like \"A+\" = 0.9, A = 0.8, ...")
    hot = _number(cfg, "hot.threshold")
    if not 0 < hot <= 1:
        raise ConfigError(f"scoring config [hot].threshold = {hot}: expected a number in (0, 1]")
    rearm = _number(cfg, "hot.rearm_below")
    if not 0 <= rearm <= hot:
        raise ConfigError(f"scoring config [hot].rearm_below = {rearm}: expected a number in [0, threshold]")
    return Rules(
        half_life_s=_number(cfg, "decay.half_life_days", positive=True) * 86400,
        midpoint=_number(cfg, "squash.midpoint"),
        width=_number(cfg, "squash.width", positive=True),
        grades=Grades.from_config(grades_cfg),
        hot_threshold=hot, hot_rearm_below=rearm,
        behaviour=behaviour, recency=recency, stage=stage, activities=activities, explicit=explicit,
        by_feature=by_feature, fields=policy,
    )
