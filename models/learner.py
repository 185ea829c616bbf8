"""The online model: learns from every closed deal, scores every event. River objects, no I/O.

- :func:`vectorize` turns features into numbers (one-hot categories, log-scaled counts), so
  features may come and go between events.
- :class:`StageRates` is the per-stage success probability: for each of the 7 stages, the
  smoothed win rate of the closed leads that passed through it.
- :class:`Trainer` is the single trainer: test-then-train on each labelled snapshot through the
  :class:`~models.tournament.Tournament` of learners, running metrics for the rules and the served
  champion, per-stage models, drift detection; the champion is the best on a recent window.
- :class:`ServingModel` is the checkpoint the scorers load: it predicts (the champion), explains
  (the linear learner) and gives per-stage probabilities.

>>> t = Trainer(min_outcomes=2)
>>> for i in range(40):
...     won = i % 2
...     snap = {"features": {"n_download": float(3 * won), "stage": "proposal" if won else "new"},
...             "rules_score": 0.5, "stage": "proposal" if won else "new"}
...     _ = t.learn([snap], won)
>>> serving = t.serving()
>>> serving.version > 0, serving.ready()
(True, True)
>>> p, reasons = serving.predict({"n_download": 3.0, "stage": "proposal"})
>>> p > 0.5, reasons[0]["feature"] in {"n_download", "stage=proposal", "stage_win_rate"}
(True, True)
"""

from __future__ import annotations

import copy
import heapq
import math
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Any

from river import base, compose, drift, forest, linear_model, naive_bayes, optim, preprocessing, tree

from models import glm, kernels
from models.events import STAGES
from models.features import (COUNT_KEYS, STAGE_INDEX, Features, State, created_parts, explicit_features,
                             explicit_key)
from models.fields import Encoder, FieldPolicy
from models.fused import FusedMembers
from models.metrics import Prequential
from models.tournament import (LEARNER_NAMES, FastStack, Learner, Stack, StageModels, Tournament, fast_predictors,
                               learned_stamp, make_learners, predict_all, serving_learners)

MODEL_KINDS = ("tournament", "logreg", "hoeffding", "forest", "naive_bayes")
# Bumped whenever features or the model pipeline change incompatibly: a checkpoint of another
# format is not loaded (the trainer starts afresh) instead of serving a model fed the wrong inputs.
MODEL_FORMAT = 7  # 3: field policy, bounded (hashed / vocabulary) feature space; 4: the tournament;
# 5: fields_known, the _linear copies of counts, logreg with AdaGrad, the stack starting as the mean of its members;
# 6: the batch learner's smaller trees (HGB_PARAMS), gam instead of naive_bayes in the default tournament;
# 7: the stack's weights and gam's keys per form segment (models.tournament.form_segment)
# Numeric features spanning orders of magnitude: log-scaled so SGD sees comparable ranges.
_LOG_PREFIXES = ("n_", "d_", "age_days", "recency_s", "time_in_stage_s", "visit_duration_s", "distinct_pages",
                 "sessions", "events_total")


def vectorize(f: Features, stage_rates: StageRates | None = None, encoder: Encoder | None = None) -> dict[str, float]:
    """Numbers for the model: categories one-hot (``"stage=proposal": 1``), counts log-scaled.

    Explicit fields go through the ``encoder``'s field policy (:mod:`models.fields`; default: the
    default policy), so the feature space is bounded whatever the input.

    >>> vectorize({"stage": "new", "n_click": 3.0, "f_email": "maria@example.com", "f_city": "berlin"})
    {'stage=new': 1.0, 'n_click': 1.3862943611198906, 'h=211': 1.0}
    """
    return vectorize_labelled(f, stage_rates, encoder)[0]


def vectorize_labelled(f: Features, stage_rates: StageRates | None = None,
                       encoder: Encoder | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`vectorize`, plus the readable name of each hashed key (for this lead's reasons).

    One pass over ``f`` (the hot path of every scored event): numbers go straight to the model's
    scale; strings and explicit fields go through the encoder, as :meth:`Encoder.encode` would.
    """
    encoder = encoder or _DEFAULT_ENCODER
    x: dict[str, float] = {}
    labels: dict[str, str] = {}
    kernels.IMPL.encode_inputs(f, x, labels, _KINDS, _kind, encoder.__dict__.get("_memo"), encoder, _FIELD, _LOG)
    for k, linear in _LINEAR_COPIES:  # beside their log: time on site and visits act more than log-shaped
        v = f.get(k)
        if v is not None:
            x[linear] = float(v)
    if stage_rates is not None and isinstance(f.get("stage"), str):
        x["stage_win_rate"] = stage_rates.rate(f["stage"])
    return x, labels


def model_inputs(state: State, now_ms: int, *, half_life_s: float, fields: FieldPolicy | None,
                 stage_rates: StageRates | None = None,
                 encoder: Encoder | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """``vectorize_labelled(features(state, now_ms, ...), stage_rates, encoder)``, without the features.

    The model's inputs straight from the lead's state (the hot path of a lead the model alone
    scores): the same keys in the same order, the same values to the bit, since the model sums them
    in this order (``tests/test_learner.py`` compares the two on every state of simulated streams).
    The explicit fields' inputs are remembered per lead (by the fields' JSON, as their features are).

    >>> from models.features import features, new_state
    >>> s = new_state("l1") | {"first_ts": 0, "fields": {"Country": "DE"}, "stage": "new", "stage_ts": 0}
    >>> model_inputs(s, 3_600_000, half_life_s=60, fields=None) == vectorize_labelled(
    ...     features(s, 3_600_000, half_life_s=60))
    True
    """
    encoder = encoder or _DEFAULT_ENCODER
    x: dict[str, float] = {}
    labels: dict[str, str] = {}
    created = state["created_ts"] if state["created_ts"] is not None else state["first_ts"]
    if created is not None:
        month, weekday = created_parts(created // 1000)
        encoder.encode_category(x, labels, "created_month", month)
        encoder.encode_category(x, labels, "created_weekday", weekday)
        age = (now_ms - created) / 86_400_000
        x["age_days"] = math.log1p(age) if age > 0.0 else 0.0  # the feature is max(0, age), log-scaled
    block, block_labels, known = _explicit_inputs(state["fields"], fields, encoder)
    x.update(block)
    if block_labels:
        labels.update(block_labels)
    x["fields_known"] = known
    kernels.IMPL.dynamic_features(x, state, now_ms, half_life_s, COUNT_KEYS, STAGE_INDEX, _STAGE_KEYS)
    counts = state["counts"]  # the linear copies (_LINEAR_COPIES, in their order) as the features give them
    x["visit_duration_s_linear"] = float(state["visit_duration_s"])
    if "visit" in counts:
        x["n_visit_linear"] = float(counts["visit"])
    x["events_total_linear"] = float(sum(counts.values()))
    if stage_rates is not None and state["stage"] is not None:
        x["stage_win_rate"] = stage_rates.rate(state["stage"])
    return x, labels


def _explicit_inputs(values: dict[str, Any], policy: FieldPolicy | None,
                     encoder: Encoder) -> tuple[dict[str, float], dict[str, str], float]:
    """The explicit fields' model inputs, their labels and ``fields_known``; remembered by the fields'
    JSON in the encoder (so forgotten when its vocabularies change: :meth:`Encoder.forget_encodings`)."""
    memo = encoder.__dict__.setdefault("_lead_inputs", {})
    key = explicit_key(values)
    if key is not None:
        hit = memo.get((id(policy), key))
        if hit is not None and hit[0] is policy:  # the entry holds the policy: its id is not reused
            return hit[1], hit[2], hit[3]
    out, known = explicit_features(values, policy)
    block: dict[str, float] = {}
    block_labels: dict[str, str] = {}
    kernels.IMPL.encode_inputs(out, block, block_labels, _KINDS, _kind, encoder.__dict__.get("_memo"), encoder,
                               _FIELD, _LOG)
    if key is not None:
        if len(memo) >= LEAD_INPUTS_MEMO:
            memo.clear()
        memo[id(policy), key] = (policy, block, block_labels, known)
    return block, block_labels, known


_DEFAULT_ENCODER = Encoder()
LEAD_INPUTS_MEMO = 8192  # leads whose explicit inputs an encoder remembers (as models.features' own memo)
# Counts and durations also given to the model as they are (standardised, not log-scaled), as
# ``<name>_linear``: X Education whole-history ROC AUC of logreg 0.856 -> 0.867 (AdaGrad), the served
# model 0.8728 -> 0.8776 (docs/model-comparison.md, 2026-12-01).
_LINEAR_COPIES = tuple((k, k + "_linear") for k in ("visit_duration_s", "n_visit", "events_total"))
_STAGE_KEYS = {stage: f"stage={stage}" for stage in STAGES}  # the stage's one-hot input (Encoder.encode_category)
_FIELD, _LOG, _PLAIN = "field", "log", "plain"  # how vectorize treats a feature, by its name
_KINDS: dict[str, str] = {}  # feature name -> its kind, decided once (the encoder bounds the names)


def _kind(name: str) -> str:
    """``_FIELD`` for an explicit field (through the encoder), else whether a number is log-scaled.

    >>> _kind("f_age"), _kind("n_visit"), _kind("stage_index")
    ('field', 'log', 'plain')
    """
    if len(_KINDS) > 100_000:
        _KINDS.clear()
    kind = _KINDS[name] = _FIELD if name.startswith("f_") else _LOG if name.startswith(_LOG_PREFIXES) else _PLAIN
    return kind


def _numeric(x: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in x.items() if "=" not in k}


def _one_hot(x: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in x.items() if "=" in k}


def make_model(kind: str = "logreg") -> base.Classifier:
    """A fresh online classifier of one of :data:`MODEL_KINDS`.

    Only numeric features are standardised: a one-hot key is only ever seen with the value 1, so a
    scaler would see zero variance and map it to 0, hiding every category from the model
    (measured on X Education: ROC AUC 0.769 -> 0.901 on the last 20% with this split). AdaGrad(0.5)
    rather than SGD(0.02): with the ``_linear`` copies of counts, the whole-history figure of the
    served model on X Education 0.8734 -> 0.8776 (docs/model-comparison.md, 2026-12-01).

    >>> m = make_model()
    >>> for _ in range(20):
    ...     m.learn_one({"stage=proposal": 1.0, "n_click": 1.0}, True)
    ...     m.learn_one({"stage=new": 1.0, "n_click": 1.0}, False)
    >>> p = {s: m.predict_proba_one({f"stage={s}": 1.0, "n_click": 1.0})[True] for s in ("proposal", "new")}
    >>> p["proposal"] > 0.5 > p["new"]
    True
    """
    if kind == "logreg":
        scaled = compose.FuncTransformer(_numeric) | preprocessing.StandardScaler()
        return (scaled + compose.FuncTransformer(_one_hot)) | linear_model.LogisticRegression(
            optimizer=optim.AdaGrad(0.5), l2=1e-4, intercept_lr=0.02)
    if kind == "hoeffding":
        # Leaves answer with their class frequencies: River's default naive-Bayes-adaptive leaves cost
        # ~0.5 ms per prediction here and ranked no better (X Education last 20%: 0.718 vs 0.703).
        # A bounded checkpoint: River checks the tree's size only every memory_estimate_period instances.
        # 2 MiB: ~1.7 MB pickled on X Education; at 0.5 MiB the tree stops learning there (AUC 0.49).
        return tree.HoeffdingAdaptiveTreeClassifier(grace_period=50, seed=1, leaf_prediction="mc", max_depth=8,
                                                    max_size=2.0, memory_estimate_period=200)
    if kind == "forest":
        return forest.ARFClassifier(n_models=10, seed=1)
    if kind == "naive_bayes":
        return preprocessing.StandardScaler() | naive_bayes.GaussianNB()
    raise ValueError(f"model kind {kind!r}: expected one of {', '.join(MODEL_KINDS)}")


def explain(model: base.Classifier, x: dict[str, float], top: int = 5,
            labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Largest signed contributions (weight x scaled value, in log-odds) of a linear model; hashed
    keys are shown by the lead's own readable ``labels`` (e.g. ``f_city=berlin``)."""
    return predict_explain(model, x, top, labels)[1]


def _scale(union: base.Transformer, x: dict[str, float]) -> dict[str, float]:
    """``union.transform_one(x)`` for :func:`make_model`'s union (standardised numbers + one-hot keys),
    without River's per-call dict merging: the hot path of every scored event."""
    scaler = _scaler_of(union)
    if scaler is None:
        return union.transform_one(x)
    numeric = {k: v for k, v in x.items() if "=" not in k}
    return {**scaler.transform_one(numeric), **{k: v for k, v in x.items() if "=" in k}}


def _scaler_of(union: Any) -> preprocessing.StandardScaler | None:
    try:
        first = list(union.transformers.values())[0]
        scaler = list(first.steps.values())[-1]
    except (AttributeError, IndexError):
        return None
    return scaler if isinstance(scaler, preprocessing.StandardScaler) else None


def predict_explain(model: base.Classifier, x: dict[str, float], top: int = 5,
                    labels: dict[str, str] | None = None) -> tuple[float, list[dict[str, Any]]]:
    """P(won) and, for the linear pipeline, its largest contributions; the features are scaled once."""
    steps = list(model.steps.values()) if isinstance(model, compose.Pipeline) else []
    if len(steps) != 2 or not isinstance(steps[-1], linear_model.LogisticRegression):
        return model.predict_proba_one(x).get(True, 0.0), []
    scaled = _scale(steps[0], x)
    p = steps[-1].predict_proba_one(scaled).get(True, 0.0)
    weights = steps[-1].weights
    get = weights.get
    contrib = [(abs(c), k, c) for k, v in scaled.items() if (c := get(k, 0.0) * v)]
    ranked = sorted(heapq.nlargest(top, contrib), key=lambda t: (-t[0], t[1]))  # ties: by name
    labels = labels or {}
    return p, [{"feature": labels.get(k, k), "contribution": round(c, 4)} for _, k, c in ranked]


class LinearScorer:
    """:func:`make_model`'s logistic regression frozen into one dict of coefficients, for serving.

    Each key maps to ``(a, b)``, its contribution being ``a * value + b``: for a number the weight
    divided by the scaler's std, and the mean folded into ``b``; for a one-hot key its weight (a key
    with no variance or no weight is left out: it contributes 0). One pass over ``x`` gives the
    probability and every contribution; ``predict_explain`` goes through River's scaler and dot
    product (three dicts per event).

    >>> m = make_model()
    >>> for i in range(30):
    ...     m.learn_one({"stage=proposal": 1.0, "n_click": float(i % 4)}, True)
    ...     m.learn_one({"stage=new": 1.0, "n_click": 0.5}, False)
    >>> x = {"stage=proposal": 1.0, "n_click": 2.0, "unknown": 5.0}
    >>> p, reasons = LinearScorer(m).explain(x)
    >>> abs(p - predict_explain(m, x)[0]) < 1e-12, reasons == predict_explain(m, x)[1]
    (True, True)
    """

    def __init__(self, model: base.Classifier) -> None:
        union, regression = list(model.steps.values())
        scaler = _scaler_of(union)
        if scaler is None or not isinstance(regression, linear_model.LogisticRegression):
            raise TypeError("LinearScorer needs make_model('logreg')'s pipeline")
        variances = scaler.vars
        # key -> (a, b): its contribution is a * value + b (the scaler's mean and std folded in)
        self.coef: dict[str, tuple[float, float]] = {}
        for k, w in regression.weights.items():
            if not w:
                continue
            if "=" in k:
                self.coef[k] = (w, 0.0)
            elif variances.get(k, 0.0):  # no variance: River scales the key to 0
                std = variances[k] ** 0.5
                self.coef[k] = (w / std, -w * scaler.means[k] / std)
        self.intercept = regression.intercept
        self.link = regression.loss.mean_func

    def contributions(self, x: dict[str, float]) -> list[tuple[str, float]]:
        """``(key, weight x scaled value)`` for every key of ``x`` that counts."""
        get = self.coef.get  # a comprehension: no append call per key
        return [(k, c) for k, v in x.items() if (e := get(k)) is not None and (c := e[0] * v + e[1])]

    def predict_proba(self, x: dict[str, float]) -> float:
        return self.link(self.intercept + sum(c for _, c in self.contributions(x)))

    def explain(self, x: dict[str, float], top: int = 5,
                labels: dict[str, str] | None = None) -> tuple[float, list[dict[str, Any]]]:
        """P(won) and the ``top`` contributions, as :func:`predict_explain` gives them."""
        return self.explain_contributions(self.contributions(x), labels, top)

    def explain_contributions(self, contrib: list[tuple[str, float]], labels: dict[str, str] | None = None,
                              top: int = 5, total: float | None = None) -> tuple[float, list[dict[str, Any]]]:
        """:meth:`explain` from the :meth:`contributions` of ``x`` (when a caller walked ``x`` already;
        ``total``: their sum, if the caller added them up in their order)."""
        p = self.link(self.intercept + (sum(map(_value, contrib)) if total is None else total))
        return p, kernels.IMPL.reasons(contrib, labels or {}, top)


_value = itemgetter(1)


@dataclass(frozen=True)
class LinearParts:
    """:func:`make_model`'s logistic pipeline stepped by hand: its scaler and its regression.

    River's pipeline and union cost more than the arithmetic for the trainer's ~45 keys. These are
    the same calls in the same order: the scaler learns the numbers, then the union's output (River's
    ``TransformerUnion`` merges its members last first: the one-hot keys, then the scaled numbers)
    goes to the regression. Same weights, same probabilities, to the bit.

    >>> a, b = make_model(), make_model()
    >>> parts = LinearParts.of(b)
    >>> for i in range(30):
    ...     x = {"stage=proposal" if i % 3 else "stage=new": 1.0, "n_click": float(i % 4), "age": 20.0 + i}
    ...     _ = a.learn_one(x, i % 3 > 0); parts.learn(x, i % 3 > 0)
    >>> x = {"stage=new": 1.0, "n_click": 2.0, "age": 31.0}
    >>> a.predict_proba_one(x)[True] == parts.predict_proba(x), dict(a["LogisticRegression"].weights) == dict(parts.regression.weights)
    (True, True)
    """

    scaler: preprocessing.StandardScaler
    regression: linear_model.LogisticRegression

    @classmethod
    def of(cls, model: Any) -> LinearParts | None:
        """The parts of ``model`` if it is :func:`make_model`'s logistic pipeline, else None."""
        if not _is_linear(model):
            return None
        union, regression = list(model.steps.values())
        return cls(_scaler_of(union), regression)

    def _input(self, x: dict[str, float]) -> dict[str, float]:
        """The union's output: the one-hot keys, then the numbers as ``StandardScaler.transform_one``
        scales them (its expression, and its lookups: ``vars`` and ``means`` are defaultdicts)."""
        out = {k: v for k, v in x.items() if "=" in k}
        means, variances = self.scaler.means, self.scaler.vars
        for k, v in x.items():
            if "=" not in k:
                var = variances[k]
                out[k] = (v - means[k]) / var**0.5 if var else 0.0
        return out

    def predict_proba(self, x: dict[str, float]) -> float:
        return float(self.regression.predict_proba_one(self._input(x)).get(True, 0.0))

    def learn(self, x: dict[str, float], y: bool) -> None:
        self.scaler.learn_one(_numeric(x))
        glm.learn_one(self.regression, self._input(x), y)


def _is_linear(model: Any) -> bool:
    steps = list(model.steps.values()) if isinstance(model, compose.Pipeline) else []
    return len(steps) == 2 and isinstance(steps[-1], linear_model.LogisticRegression) and \
        _scaler_of(steps[0]) is not None


@dataclass
class StageRates:
    """Per-stage success probability, Beta(1, 1)-smoothed, from leads that passed through each stage."""

    won: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    lost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))

    def update(self, stages: list[str], won: bool) -> None:
        for s in set(stages) & set(STAGES):
            (self.won if won else self.lost)[s] += 1

    def rate(self, stage: str) -> float:
        return (self.won.get(stage, 0) + 1) / (self.won.get(stage, 0) + self.lost.get(stage, 0) + 2)

    def report(self) -> dict[str, dict[str, float | int]]:
        return {s: {"win_rate": round(self.rate(s), 4), "won": self.won[s], "lost": self.lost[s]} for s in STAGES}


@dataclass
class ServingModel:
    """What scorers load: the champion, the stage rates and how much it has learned."""

    version: int
    model: base.Classifier
    stage_rates: StageRates
    n_won: int
    n_lost: int
    min_outcomes: int
    encoder: Encoder = field(default_factory=Encoder)
    format: int = MODEL_FORMAT
    learners: dict[str, Learner] = field(default_factory=dict)  # the tournament's, shared with the trainer
    champion: str = ""
    stage_models: StageModels | None = None

    def ready(self) -> bool:
        return min(self.n_won, self.n_lost) >= self.min_outcomes

    def model_weight(self) -> float:
        """0 before ``min_outcomes`` of each class, then rising to 1 at twice that."""
        n = min(self.n_won, self.n_lost)
        return 0.0 if n < self.min_outcomes else min(1.0, n / (2 * self.min_outcomes))

    def predict(self, f: Features) -> tuple[float, list[dict[str, Any]]]:
        """The champion's P(won) and reasons (from the linear learner: trees give none)."""
        known = self.__dict__.get("_all")
        if known is not None and known[0] is f:
            _, preds, x, labels, _ = known
        else:
            (x, labels), preds = vectorize_labelled(f, self.stage_rates, self.encoder), None
        if preds is not None and self.learners:  # evaluate: every learner was asked already
            explain = self.model is not None and known[4]
            return preds[self.champion], predict_explain(self.model, x, labels=labels)[1] if explain else []
        return self.predict_inputs(x, labels)

    def predict_state(self, state: State, now_ms: int, *, half_life_s: float,
                      fields: FieldPolicy | None) -> tuple[float, list[dict[str, Any]]]:
        """:meth:`predict` of ``features(state, now_ms, ...)``, from the state (:func:`model_inputs`)."""
        return self.predict_inputs(*model_inputs(state, now_ms, half_life_s=half_life_s, fields=fields,
                                                 stage_rates=self.stage_rates, encoder=self.encoder))

    def predict_inputs(self, x: dict[str, float], labels: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
        """The champion's P(won) and reasons for the model inputs ``x`` (:func:`vectorize_labelled`)."""
        if not self.learners:
            return predict_explain(self.model, x, labels=labels)
        return self._fast_predict(x, labels)

    def _fast_predict(self, x: dict[str, float], labels: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
        """The champion through the learners' frozen forms (built once per model, rebuilt if a shared
        learner learned since): the linear learner as dicts, naive Bayes as lookups, compiled trees; a
        stack's members through one pass (:class:`~models.fused.FusedMembers`), the stack as weights
        (:class:`~models.tournament.FastStack`)."""
        fast = self.__dict__.get("_fast")
        # A loaded checkpoint's learners are its own and never learn: its frozen forms never go stale.
        stamp = None if fast is not None and self.__dict__.get("_loaded") else learned_stamp(self.learners)
        if fast is None or (stamp is not None and fast[0] != stamp):
            linear = LinearScorer(self.model) if _is_linear(self.model) else None
            predictors = fast_predictors(self.learners, linear.predict_proba if linear is not None else None)
            stacks = {n: FastStack(l) for n, l in self.learners.items() if isinstance(l, Stack)}
            fast = self.__dict__["_fast"] = (stamp, linear, predictors, FusedMembers.of(linear, self.learners), stacks)
        _, linear, predictors, fused, stacks = fast
        champion = self.learners[self.champion]
        stacked = isinstance(champion, Stack)
        # One pass for the fused members; a member serving alone too, where that pass saves the
        # linear learner's walk for the reasons plus its own (logreg alone needs only the one walk).
        if fused is not None and (stacked or (self.champion != "logreg" and self.champion in fused.names)):
            base, reasons = fused.predict(x, labels)
            if not stacked:
                return base[self.champion], reasons
            for name in fused.rest:
                base[name] = predictors[name](x)
            return stacks[self.champion].predict_from(base, x), reasons
        if linear is not None:
            p_linear, reasons = linear.explain(x, labels=labels)
        else:
            p_linear, reasons = None, []
        if isinstance(champion, Stack):
            base = {n: (p_linear if n == "logreg" and p_linear is not None else f(x)) for n, f in predictors.items()}
            return stacks[self.champion].predict_from(base, x), reasons
        if self.champion == "logreg" and p_linear is not None:
            return p_linear, reasons
        return predictors[self.champion](x), reasons

    def score_all(self, f: Features, reasons: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """Every learner's P(won), and the model inputs ``x``. Kept for this features object, so that
        a :meth:`predict` of the same object right after asks no learner again (``evaluate`` asks both;
        it reports no reasons: ``reasons=False`` spares that :meth:`predict` the linear model's pass)."""
        x, labels = vectorize_labelled(f, self.stage_rates, self.encoder)
        preds = predict_all(self.learners, x)
        self.__dict__["_all"] = (f, preds, x, labels, reasons)
        return preds, x

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_all", None)  # never in a checkpoint
        state.pop("_fast", None)  # rebuilt after loading
        state.pop("_loaded", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_loaded"] = True  # see _fast_predict

    def stage_probabilities(self, f: Features) -> dict[str, float]:
        """P(won) as of each funnel stage, from what the lead did before it (see :class:`StageModels`)."""
        return self.stage_models.probabilities(vectorize(f, self.stage_rates, self.encoder)) if self.stage_models else {}


@dataclass
class Trainer:
    """The single learner. ``learn`` is test-then-train on one closed deal's snapshots.

    ``kind="tournament"`` runs every learner of :data:`models.tournament.LEARNER_NAMES` and serves
    the champion (best windowed prequential ROC AUC, with a margin); a single kind runs that learner
    alone. ``defer_refits`` leaves the batch learner's refits to :meth:`refit` (the worker runs it
    in a thread, off the event loop).
    """

    min_outcomes: int = 50
    kind: str = "tournament"
    batch_every: int = 1000
    defer_refits: bool = False
    margin: float = 0.005
    tournament: Tournament = None  # type: ignore[assignment]
    stage_models: StageModels = field(default_factory=StageModels)
    version: int = 0
    n_won: int = 0
    n_lost: int = 0
    stage_rates: StageRates = field(default_factory=StageRates)
    rules_metrics: Prequential = field(default_factory=Prequential)
    champion_metrics: Prequential = field(default_factory=Prequential)  # whatever was served, as it was served
    per_stage: dict[str, dict[str, Prequential]] = field(default_factory=dict)
    drift_detector: drift.ADWIN = field(default_factory=lambda: drift.ADWIN(delta=0.002))
    drifts: int = 0
    last_offset: int = -1  # offset of the last training message applied (guards redelivery)
    encoder: Encoder = field(default_factory=Encoder)  # field policy + learned vocabularies (bounded)
    format: int = MODEL_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {self.kind!r}: expected one of {', '.join(MODEL_KINDS)}")
        if self.tournament is None:
            names = LEARNER_NAMES if self.kind == "tournament" else (self.kind,)
            # The stack serves until the window can choose (it starts as the mean of its members): whole-history
            # served ROC AUC X Education 0.8753 -> 0.8769, simulated 40,000 leads 0.7991 -> 0.7994 against
            # logreg first (docs/model-comparison.md, fourth round).
            self.tournament = Tournament(make_learners(names, batch_every=self.batch_every,
                                                       defer_refits=self.defer_refits),
                                         margin=self.margin, default="stack" if "stack" in names else names[0])

    @property
    def rejected_promotions(self) -> int:
        """Times a challenger led the window but not by the margin, so the champion stayed."""
        return self.tournament.refused

    def learn(self, snapshots: list[dict[str, Any]], won: bool,
              last: tuple[dict[str, float], dict[str, float]] | None = None) -> bool:
        """Score every snapshot of the deal with every learner, then learn them; True when the champion changed.

        Every snapshot is scored before any learner learns any of them (they share the label).
        ``last`` is ``(x, predictions)`` for the last snapshot when the caller already vectorised it
        (with this trainer's stage rates and encoder, as they are now) and scored it.
        """
        y = int(won)
        drifted = False
        champion = self.tournament.champion
        xs = [vectorize(snap["features"], self.stage_rates, self.encoder)
              for snap in (snapshots[:-1] if last is not None else snapshots)]
        if last is not None and snapshots:
            xs.append(last[0])
        stages = [snap.get("stage") or "none" for snap in snapshots]
        for snap, x, stage, preds in zip(snapshots, xs, stages, self.tournament.test_then_train_many(xs, y, stages, last)):
            p_champion = preds[champion]
            self.rules_metrics.update(snap["rules_score"], y)
            self.champion_metrics.update(p_champion, y)
            per = self.per_stage.setdefault(stage, {"rules": Prequential(), "model": Prequential()})
            per["rules"].update(snap["rules_score"], y)
            per["model"].update(p_champion, y)
            self.stage_models.learn(x, snap.get("stage"), y)
            self.drift_detector.update(abs(y - p_champion))
            drifted = drifted or self.drift_detector.drift_detected
        stages = [s["stage"] for s in snapshots if s.get("stage")]
        self.stage_rates.update(stages, won)
        if snapshots:  # one count per deal, from the last features before the outcome
            self.encoder.learn(snapshots[-1]["features"])
        self.n_won += y
        self.n_lost += 1 - y
        self.version += 1  # every learner learned: scorers reload
        if drifted:  # the champion's error drifted: choose again on the window, without the margin
            self.drifts += 1
            margin, self.tournament.margin = self.tournament.margin, 0.0
            self.tournament.select()
            self.tournament.margin = margin
        return self.tournament.champion != champion

    def defer_refits_to_caller(self) -> None:
        """From now on the batch learners' refits wait for :meth:`refit` (also on a loaded checkpoint)."""
        self.defer_refits = True
        for learner in self.tournament.learners.values():
            if hasattr(learner, "defer"):
                learner.defer = True

    def set_batch_every(self, every: int) -> None:
        """Deals between two batch refits (the setting wins over a loaded checkpoint's)."""
        self.batch_every = every
        for learner in self.tournament.learners.values():
            if hasattr(learner, "every"):
                learner.every = every

    def refits_due(self) -> bool:
        return bool(self.tournament.refits_due())

    def refit(self) -> float:
        """Run the due batch refits (blocking: call it in a thread from the worker); seconds spent."""
        return sum(learner.refit() for learner in self.tournament.refits_due())

    def serving(self, copy_state: bool = True) -> ServingModel:
        """The checkpoint: every learner, shared (not copied: the store pickles it at once; the batch
        learner's last fit goes without its training window); stage rates and encoder copied unless
        ``copy_state`` is false (``evaluate``, which takes a new one after every deal)."""
        logreg = self.tournament.learners.get("logreg")
        linear = logreg.model if logreg is not None else None
        keep = copy.deepcopy if copy_state else (lambda obj: obj)
        return ServingModel(self.version, linear, keep(self.stage_rates), self.n_won, self.n_lost,
                            self.min_outcomes, keep(self.encoder),
                            learners=serving_learners(self.tournament.learners), champion=self.tournament.champion,
                            stage_models=self.stage_models)

    def report(self) -> dict[str, Any]:
        tournament = self.tournament.report()
        others = {n: v for n, v in tournament["learners"].items() if n != tournament["champion"]}
        runner_up = max(others, key=lambda n: others[n]["window_roc_auc"] or 0.0) if others else None
        return {
            "version": self.version, "kind": self.kind, "outcomes": {"won": self.n_won, "lost": self.n_lost},
            "rules": self.rules_metrics.report(), "champion": self.champion_metrics.report(),
            "challenger": others[runner_up]["whole"] if runner_up else self.champion_metrics.report(),
            "challenger_name": runner_up, "tournament": tournament,
            "per_stage": {s: {k: m.report() for k, m in v.items()} for s, v in sorted(self.per_stage.items())},
            "reliability": self.champion_metrics.reliability(),
            "stage_rates": self.stage_rates.report(),
            "stage_models": self.stage_models.report(),
            "drifts": self.drifts, "rejected_promotions": self.rejected_promotions,
        }
