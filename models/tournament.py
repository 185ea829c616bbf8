"""A live model tournament: several learners on the same prequential stream. Pure, no I/O.

Every learner implements :class:`Learner` (``name``, ``predict_proba(x)``, ``learn(x, y)``) on the
feature dicts of :func:`models.learner.vectorize`. :class:`Tournament` scores each labelled
snapshot with *every* learner before any of them learns from it (test-then-train), keeps their
figures (overall, per stage, and over a window of recent snapshots), and names a champion: the
learner with the best windowed ROC AUC, replaced only when another one beats it by a margin (so the
champion does not flap). :class:`StageModels` gives per-stage success probabilities.

Learners (:data:`LEARNER_NAMES`): ``logreg`` (River logistic regression, the original model),
``gam`` (an online logistic regression over one-hot keys and binned numbers), ``batch_hgb`` (scikit-learn
HistGradientBoosting refitted every ``every`` outcomes on a window of recent snapshots: the vendors'
cadence) and ``stack`` (an online logistic regression over the other learners' log-odds). ``gam`` and
``stack`` learn per :func:`form_segment` (how much of the form the lead filled in).
``hoeffding`` (River's Hoeffding adaptive tree), ``forest`` (adaptive random forest) and ``naive_bayes``
(Bernoulli/Gaussian naive Bayes on the sparse dicts) can still be asked for by name; they left the
default tournament because they were the dearest or the weakest (hoeffding: 0.72 ROC AUC on X Education's
last 20%, ~0.6 ms per learned deal, most of the checkpoint; the stack without it: 0.9161 vs 0.9158;
naive Bayes: a stack weight near 0 on both histories, replaced by ``gam`` in the fourth round).

>>> t = Tournament(make_learners(("logreg", "naive_bayes")), window=50, select_every=10, margin=0.0)
>>> for i in range(200):
...     y = i % 2
...     _ = t.test_then_train({"n_download": float(3 * y + i % 3), "stage=new": 1.0}, y, "new")
>>> t.champion in t.learners, t.report()["learners"]["logreg"]["whole"]["n"]
(True, 200)
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from river import linear_model, optim

from models import glm, kernels
from models.events import STAGES
from models.metrics import Prequential

LEARNER_NAMES = ("logreg", "gam", "batch_hgb", "stack")  # the default tournament
KNOWN_LEARNERS = ("logreg", "hoeffding", "forest", "naive_bayes", "gam", "batch_hgb", "stack")
X = dict[str, float]


class Learner(Protocol):
    """What every learner of the tournament implements."""

    name: str

    def predict_proba(self, x: X) -> float:
        """P(won) for one feature dict; 0.5 before it has learned anything."""

    def learn(self, x: X, y: bool) -> None:
        """Learn one labelled example."""


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class RiverLearner:
    """A River classifier (``models.learner.make_model(kind)``) as a :class:`Learner`.

    >>> r = RiverLearner("logreg")
    >>> r.predict_proba({"a": 1.0})
    0.5
    """

    def __init__(self, kind: str, name: str | None = None) -> None:
        from models.learner import make_model  # learner imports this module: import late

        self.name = name or kind
        self.model = make_model(kind)
        self.seen = 0

    def _linear(self) -> Any:
        """The logistic pipeline's parts, to step it without River's pipeline machinery (None for
        another model): the same calls in the same order, the same bits (see LinearParts)."""
        parts = self.__dict__.get("_parts", False)
        if parts is False:
            from models.learner import LinearParts

            parts = self.__dict__["_parts"] = LinearParts.of(self.model)
        return parts

    def predict_proba(self, x: X) -> float:
        if not self.seen:  # untrained River trees say 0, not "don't know"
            return 0.5
        parts = self._linear()
        if parts is not None:
            return parts.predict_proba(x)
        return float(self.model.predict_proba_one(x).get(True, 0.0))

    def learn(self, x: X, y: bool) -> None:
        parts = self._linear()
        if parts is not None:
            parts.learn(x, bool(y))
        else:
            self.model.learn_one(x, bool(y))
        self.seen += 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_parts", None)  # views of the model: found again after loading
        return state


class BatchHGB:
    """scikit-learn HistGradientBoosting, refitted every ``every`` outcomes on the last ``window``.

    Between refits the model is frozen (the vendors' cadence). Columns are fixed at each refit: the
    numeric keys seen in the window (absent = NaN, HGB's missing) and one per categorical field.
    ``defer=True`` leaves a due refit to :meth:`refit` (the worker runs it in a thread);
    otherwise it runs inline in :meth:`learn`.

    >>> b = BatchHGB(every=20, window=100, min_rows=20)
    >>> for i in range(40):
    ...     b.learn({"n": float(i % 2), "s=a": 1.0}, bool(i % 2))
    >>> b.fits, b.predict_proba({"n": 1.0, "s=a": 1.0}) > 0.5 > b.predict_proba({"n": 0.0, "s=a": 1.0})
    (2, True)
    """

    name = "batch_hgb"

    def __init__(self, every: int = 1000, window: int = 5000, min_rows: int = 100, defer: bool = False,
                 max_columns: int = 400, **params: Any) -> None:
        self.every, self.window, self.min_rows, self.defer = every, window, min_rows, defer
        self.max_columns = max_columns
        self.params = {**HGB_PARAMS, **params}
        self.rows: deque[tuple[X, bool]] = deque(maxlen=window)
        self.since_fit = 0
        self.fits = 0
        self.fit_seconds = 0.0
        self.columns: dict[str, int] = {}
        self.model: FlatTrees | None = None
        self.codes: dict[str, dict[str, float]] = {}
        self.template: Any = None

    def predict_proba(self, x: X) -> float:
        if self.model is None:
            return 0.5
        return _sigmoid(_fast_hgb(self).raw(x))

    def __getstate__(self) -> dict[str, Any]:
        """The checkpoint keeps the last fit, not the window of rows (megabytes, and raw inputs): after a
        restart the learner serves its last fit and refits once ``every`` new deals have come in."""
        state = dict(self.__dict__)
        state.pop("fit_rows", None)  # a replacement set on the learner (evaluate's fits made ahead)
        state["rows"] = deque(maxlen=self.window)
        state["since_fit"] = 0
        return state

    def frozen(self) -> FrozenHGB:
        """The fitted model alone, for the serving checkpoint (without the window of rows)."""
        return FrozenHGB(self.model, self.columns, self.codes, self.template)

    def learn(self, x: X, y: bool) -> None:
        self.rows.append((x, bool(y)))
        self.since_fit += 1
        if not self.defer and self.refit_due():
            self.refit()

    def refit_due(self) -> bool:
        return self.since_fit >= self.every and len(self.rows) >= self.min_rows \
            and len({y for _, y in self.rows}) == 2

    def refit(self) -> float:
        """Fit on the window now; returns the seconds it took (also summed in ``fit_seconds``)."""
        return self.install(self.fit_rows(self.take_window(), self.params, self.max_columns))

    def take_window(self) -> list[tuple[X, bool]]:
        """The rows of the next fit, as of now (the refit is no longer due): :meth:`fit_rows` may then
        run in another thread while this learner keeps learning, and :meth:`install` its result later."""
        self.since_fit = 0
        return list(self.rows)

    def install(self, fitted: tuple[Any, ...]) -> float:
        """Serve a :meth:`fit_rows` result from now on; returns the seconds the fit took."""
        model, columns, codes, template, spent = fitted
        # swapped together: predictions never see a half fit
        self.model, self.columns, self.codes, self.template = model, columns, codes, template
        self.fits += 1
        self.fit_seconds += spent
        return spent

    @staticmethod
    def fit_rows(rows: list[tuple[X, bool]], params: dict[str, Any], max_columns: int) -> tuple[Any, ...]:
        """Fit on ``rows``: ``(FlatTrees, columns, codes, template, seconds)``; touches no learner.

        Each categorical field (the one-hot keys ``field=value``) becomes one column holding the
        value's smoothed win rate in the window: ordering categories by win rate is how trees split
        a category best for a binary label, and 30 columns instead of 150 make the fit ~5x faster.
        """
        import time
        from collections import Counter
        from itertools import chain

        import numpy as np
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        started = time.perf_counter()
        prior = sum(y for _, y in rows) / len(rows)
        tallies: dict[str, dict[str, list[int]]] = {}  # field -> value -> [won, seen]
        numeric: dict[str, int] = {}
        # Rows per key counted in C (first-seen order, as a loop over the rows would insert them)
        won = Counter(chain.from_iterable(x for x, y in rows if y))
        for k, seen in Counter(chain.from_iterable(x for x, _ in rows)).items():
            if "=" in k and not k.startswith(_BINARY):
                field_, value = k.split("=", 1)
                tallies.setdefault(field_, {})[value] = [won[k], seen]
            else:
                numeric[k] = seen
        codes = {f: {v: (won + _SMOOTH * prior) / (seen + _SMOOTH) for v, (won, seen) in vals.items()}
                 for f, vals in tallies.items()}
        keep = sorted(numeric, key=lambda k: -numeric[k])[:max_columns]
        columns = {k: j for j, k in enumerate(sorted(keep) + sorted(codes))}  # a stable layout
        template = np.full(len(columns), np.nan)
        template[[j for k, j in columns.items() if k.startswith(_BINARY)]] = 0.0  # an absent bucket is 0
        fill = FastHGB.row_filler(FastHGB.row_lookup(columns, codes), [float(v) for v in template])
        X_ = np.array([fill(x) for x, _ in rows], dtype=float).reshape(len(rows), len(columns))
        y_ = np.array([y for _, y in rows], dtype=int)
        with threadpool_limits(1):  # OpenMP threads only fight over the worker's cores at this size
            model = HistGradientBoostingClassifier(**params).fit(X_, y_)
        return FlatTrees.of(model), columns, codes, template, time.perf_counter() - started

    @staticmethod
    def _row(x: X, columns: dict[str, int], codes: dict[str, dict[str, float]], template: Any) -> Any:
        import numpy as np

        row = template.copy()
        for k, v in x.items():
            if "=" in k and not k.startswith(_BINARY):
                field_, value = k.split("=", 1)
                j = columns.get(field_)
                if j is not None:
                    row[j] = codes[field_].get(value, np.nan)  # a value not in the window: missing
            else:
                j = columns.get(k)
                if j is not None:
                    row[j] = v
        return row


# Small trees (4 leaves) on half the columns at each split (was 15 leaves, all columns): chosen on the
# whole-history figures (docs/model-comparison.md, fourth round). leadstream evaluate, X Education: batch_hgb
# 0.8642 -> 0.8702, served 0.8732 -> 0.8734 (last 20%: 0.9176 -> 0.9190); simulated 40,000 leads: batch_hgb
# 0.7815 -> 0.7948, served 0.7919 -> 0.7971; and a refit costs ~30% less CPU (X Education: 0.81 -> 0.58 s).
HGB_PARAMS: dict[str, Any] = {"max_iter": 100, "learning_rate": 0.1, "max_leaf_nodes": 4, "max_features": 0.5,
                              "random_state": 0, "early_stopping": False}
_BINS = 200  # score bins of each learner's running figures (overall, per stage): a bounded checkpoint
_SMOOTH = 20.0  # pseudo-deals at the window's win rate: a rare category is not taken at face value
_BINARY = ("h=",)  # hashed buckets (models.fields) mix fields: each is its own 0/1 column


class NaiveBayes:
    """Naive Bayes over sparse feature dicts: Bernoulli for one-hot keys, Gaussian for numbers.

    Only the keys present in ``x`` are looked at (River's GaussianNB walks every feature ever seen
    and costs about 1 ms per prediction here); absent one-hot keys carry no evidence.

    >>> nb = NaiveBayes()
    >>> for _ in range(20):
    ...     nb.learn({"src=ad": 1.0, "n": 3.0}, True); nb.learn({"src=web": 1.0, "n": 0.0}, False)
    >>> nb.predict_proba({"src=ad": 1.0, "n": 3.0}) > 0.9 > 0.1 > nb.predict_proba({"src=web": 1.0, "n": 0.0})
    True
    """

    name = "naive_bayes"

    def __init__(self) -> None:
        self.n = [0, 0]
        self.hits: list[dict[str, int]] = [{}, {}]  # one-hot key -> times seen with the class
        self.moments: list[dict[str, list[float]]] = [{}, {}]  # number -> [count, mean, M2] (Welford)

    def predict_proba(self, x: X) -> float:
        n0, n1 = self.n
        if not (n0 and n1):
            return 0.5
        # One pass over x for both classes (the trainer asks on every deal); each class's log sums its
        # terms in key order, as a pass per class would: the same bits.
        log, two_pi = math.log, 2 * math.pi
        logp0, logp1 = log(n0 / (n0 + n1)), log(n1 / (n0 + n1))
        (hits0, hits1), (moments0, moments1) = self.hits, self.moments
        for k, v in x.items():
            if "=" in k:
                logp0 += log((hits0.get(k, 0) + 1) / (n0 + 2))
                logp1 += log((hits1.get(k, 0) + 1) / (n1 + 2))
                continue
            m = moments0.get(k)
            if m is not None and m[0] >= 2:
                var = m[2] / (m[0] - 1) + 1e-2  # floor: a constant feature must not dominate
                logp0 += -0.5 * (log(two_pi * var) + (v - m[1]) ** 2 / var)
            m = moments1.get(k)
            if m is not None and m[0] >= 2:
                var = m[2] / (m[0] - 1) + 1e-2
                logp1 += -0.5 * (log(two_pi * var) + (v - m[1]) ** 2 / var)
        return _sigmoid(logp1 - logp0)

    def learn(self, x: X, y: bool) -> None:
        c = int(y)
        self.n[c] += 1
        for k, v in x.items():
            if "=" in k:
                self.hits[c][k] = self.hits[c].get(k, 0) + 1
            else:
                m = self.moments[c].setdefault(k, [0, 0.0, 0.0])
                m[0] += 1
                delta = v - m[1]
                m[1] += delta / m[0]
                m[2] += delta * (v - m[1])


class BinnedLogistic:
    """Online logistic regression (AdaGrad) over one-hot keys and every number cut into bins: a GAM-like
    member whose effect of each number may take any shape, not only the linear learner's straight line.

    A number ``v`` (already log-scaled by :func:`models.learner.vectorize` for counts) becomes the key
    ``name#int(2 v)`` (beyond 50: ``name#1000 + int(2 log1p(v))``); the ``_linear`` copies are left out
    (the same numbers again). It replaced naive Bayes in the default tournament: the best single
    learner on both histories (whole-history ROC AUC, X Education 0.8765 vs naive Bayes 0.8194, simulated
    40,000 leads 0.7985 vs 0.7387), and cheaper per deal (docs/model-comparison.md, fourth round).

    Each :func:`form_segment` has its own weights (one intercept): one GAM per segment, so blank forms
    and full ones get their own effects (fifth round: the member alone ranks lower on X Education,
    0.8765 -> 0.8702, but the stack higher, 0.8852 -> 0.8865; where the segment never changes, as on the
    simulated history, it is the single GAM it was).

    >>> g = BinnedLogistic()
    >>> g.predict_proba({"n_download": 1.0})
    0.5
    >>> for _ in range(50):
    ...     g.learn({"src=ad": 1.0, "n": 3.0}, True); g.learn({"src=web": 1.0, "n": 0.2}, False)
    >>> g.predict_proba({"src=ad": 1.0, "n": 3.1}) > 0.8 > 0.2 > g.predict_proba({"src=web": 1.0, "n": 0.3})
    True
    """

    name = "gam"

    def __init__(self, lr: float = 0.1, per_unit: float = 2.0) -> None:
        self.lr, self.per_unit = lr, per_unit
        self.weights: dict[str, dict[str, float]] = {}  # form segment -> key -> weight
        self.squares: dict[str, dict[str, float]] = {}  # AdaGrad's sum of squared gradients, the same way
        self.intercept = 0.0
        self.intercept_squares = 0.0
        self.seen = 0

    def keys(self, x: X) -> tuple[str, list[str]]:
        """The form segment of ``x`` and its keys there: its one-hot keys and each number's bin. The
        trainer asks twice for each snapshot (scored, then learned): the keys of the last few ``x`` are
        kept, by identity.

        >>> BinnedLogistic().keys({"src=ad": 1.0, "n": 1.6, "n_linear": 5.0, "fields_known": 8.0})
        ('c', ['src=ad', 'n#3', 'fields_known#16'])
        """
        cache = self.__dict__.setdefault("_keys", {})
        hit = cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if len(cache) >= 32:
            cache.clear()
        out = []
        for k, v in x.items():
            if "=" in k:
                out.append(k)
            elif not k.endswith("_linear"):
                out.append(f"{k}#{_bin(v, self.per_unit)}")
        keys = form_segment(x), out
        cache[id(x)] = (x, keys)  # x kept: its id is not reused while it is here
        return keys

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_keys", None)
        return state

    def _z(self, segment: str, keys: list[str]) -> float:
        get = self.weights.get(segment, {}).get
        return self.intercept + sum(get(k, 0.0) for k in keys)

    def predict_proba(self, x: X) -> float:
        return _sigmoid(self._z(*self.keys(x)))

    def learn(self, x: X, y: bool) -> None:
        segment, keys = self.keys(x)
        g = _sigmoid(self._z(segment, keys)) - float(y)  # the log loss's gradient for every key present (value 1)
        step = self.lr * g
        weights, squares = self.weights.setdefault(segment, {}), self.squares.setdefault(segment, {})
        for k in keys:
            s = squares[k] = squares.get(k, 0.0) + g * g
            weights[k] = weights.get(k, 0.0) - step / math.sqrt(s + 1e-8)
        self.intercept_squares += g * g
        self.intercept -= step / math.sqrt(self.intercept_squares + 1e-8)
        self.seen += 1


SEGMENTS = ("a", "b", "c")  # form segments: see form_segment


def form_segment(x: X) -> str:
    """The lead's form segment by how many explicit fields it filled in (``fields_known``): ``a`` up to 3,
    ``b`` 4 to 6, ``c`` 7 or more (a lead without the count: ``a``). Blank forms convert far less (X
    Education: 8-18% at 2-3 fields, 27-54% at 4-6, 43-68% at 7-9) and the members rank them unequally, so
    ``gam`` learns its effects and the stack its members' weights per segment. A history whose leads all
    fill in as many fields has one segment: the learners are then what they were without segments.

    >>> [form_segment({"fields_known": n}) for n in (2.0, 6.0, 9.0)], form_segment({})
    (['a', 'b', 'c'], 'a')
    """
    known = x.get("fields_known", 0.0)
    return "a" if known <= 3 else ("b" if known <= 6 else "c")


def _bin(v: float, per_unit: float) -> int:
    """The bin of a number for :class:`BinnedLogistic` (learning) and :class:`FastBinned` (serving):
    ``per_unit`` bins per unit up to 50, then by the log beyond."""
    return int(per_unit * v) if v < 50 else 1000 + int(per_unit * math.log1p(v))


@dataclass
class FrozenHGB:
    """A :class:`BatchHGB`'s last fit, predicting only: what scorers load."""

    model: FlatTrees | None
    columns: dict[str, int]
    codes: dict[str, dict[str, float]]
    template: Any
    name: str = "batch_hgb"

    predict_proba = BatchHGB.predict_proba


class FastHGB:
    """A fitted batch learner's prediction as plain Python: the trees compiled to nested ``if`` statements.

    The numpy walk of :class:`FlatTrees` costs ~100-200 µs per row (a dozen array operations per
    level); straight-line code reads only the nodes on each tree's path (~15 µs for 50 trees). The
    row is a list filled from ``x`` through one dict lookup per key (numeric and hashed keys: the
    value; ``field=value`` keys: the value's win rate, as :meth:`BatchHGB._row` does).
    """

    def __init__(self, model: FlatTrees, columns: dict[str, int], codes: dict[str, dict[str, float]],
                 template: Any) -> None:
        self.model = model
        self.base = [float(v) for v in template]  # the row of an x without any known key
        self.lookup = FastHGB.row_lookup(columns, codes)
        self.row = FastHGB.row_filler(self.lookup, self.base)
        self.trees = model.walker()

    @staticmethod
    def row_lookup(columns: dict[str, int], codes: dict[str, dict[str, float]]) -> dict[str, tuple[int, float | None]]:
        """Key of ``x`` -> (its column, the code it stands for; None: the key's value)."""
        lookup: dict[str, tuple[int, float | None]] = {}
        for key, j in columns.items():
            if key in codes:  # a categorical field: each known value has its code
                for value, code in codes[key].items():
                    lookup[f"{key}={value}"] = (j, code)
            else:
                lookup[key] = (j, None)
        return lookup

    @staticmethod
    def row_filler(lookup: dict[str, tuple[int, float | None]], base: list[float]) -> Any:
        """``row(x)``: the list :meth:`BatchHGB._row` would give as an array, by one lookup per key."""
        get = lookup.get

        def row(x: X) -> list[float]:
            out = base.copy()
            for k, v in x.items():
                hit = get(k)
                if hit is not None:
                    out[hit[0]] = v if hit[1] is None else hit[1]
            return out

        return row

    def raw(self, x: X) -> float:
        """The log-odds of ``x`` (the same as ``FlatTrees.raw(BatchHGB._row(x, ...))``)."""
        return self.trees(self.row(x))


def _fast_hgb(learner: Any) -> FastHGB:
    """The :class:`FastHGB` of the learner's current fit: kept on the fit itself (a refit swaps model,
    columns and codes together), so the batch learner and every frozen copy share it; not pickled."""
    fast = learner.model.__dict__.get("_fast")
    if fast is None:
        fast = learner.model.__dict__["_fast"] = FastHGB(learner.model, learner.columns, learner.codes,
                                                         learner.template)
    return fast


def serving_learners(learners: dict[str, Any]) -> dict[str, Any]:
    """The learners as scorers need them: batch learners without their training window."""
    return {n: l.frozen() if isinstance(l, BatchHGB) else l for n, l in learners.items()}


def _sigmoid(z: float) -> float:
    return kernels.IMPL.sigmoid(z)  # z kept within [-700, 700]: no overflow


class FlatTrees:
    """A fitted HistGradientBoosting model as flat arrays, walked for all trees at once with numpy.

    scikit-learn's ``predict_proba`` costs milliseconds for one row (input checks, thread pools);
    the tournament predicts one row at a time, so the trees are walked here: the same splits
    (``x <= threshold`` goes left, NaN follows ``missing_go_to_left``), the same leaf values.
    """

    def __init__(self, baseline: float, feature: Any, threshold: Any, missing_left: Any, left: Any, right: Any,
                 leaf: Any, value: Any, roots: Any, depth: int) -> None:
        self.baseline, self.feature, self.threshold, self.missing_left = baseline, feature, threshold, missing_left
        self.left, self.right, self.leaf, self.value, self.roots, self.depth = left, right, leaf, value, roots, depth

    @classmethod
    def of(cls, model: Any) -> FlatTrees:
        import numpy as np

        nodes = [tree[0].nodes for tree in model._predictors]
        offsets = np.cumsum([0] + [len(n) for n in nodes[:-1]])
        cat = np.concatenate(nodes)
        shift = np.repeat(offsets, [len(n) for n in nodes])
        leaf = cat["is_leaf"].astype(bool)
        idx = np.arange(len(cat))
        # a leaf points at itself, so walking "depth" steps from every root ends on every tree's leaf
        left = np.where(leaf, idx, cat["left"].astype(np.int64) + shift)
        right = np.where(leaf, idx, cat["right"].astype(np.int64) + shift)
        return cls(float(np.ravel(model._baseline_prediction)[0]), cat["feature_idx"].astype(np.int64),
                   cat["num_threshold"], cat["missing_go_to_left"].astype(bool), left, right, leaf, cat["value"],
                   offsets.astype(np.int64), int(cat["depth"].max()) if len(cat) else 0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_compiled", None)
        state.pop("_fast", None)
        return state

    def compiled(self) -> Any:
        """:meth:`raw` as a generated Python function of a list (compiled once per fit and process).

        >>> import numpy as np
        >>> flat = FlatTrees(0.5, *map(np.array, ([0, 0, 0], [1.5, 0, 0], [True, False, False], [1, 1, 2],
        ...                  [2, 1, 2], [False, True, True], [0.0, -1.0, 2.0], [0])), depth=1)
        >>> f = flat.compiled()
        >>> f([1.0]), f([2.0]), f([float("nan")])  # NaN follows missing_go_to_left
        (-0.5, 2.5, -0.5)
        """
        fn = self.__dict__.get("_compiled")
        if fn is None:
            fn = self.__dict__["_compiled"] = _compile_trees(self)
        return fn

    def walker(self) -> Any:
        """``raw(row)`` for a list row, as served: the compiled kernel walking these arrays where it
        is built (:func:`models.kernels.walk_trees`, ~0.5 µs for 50 trees), else :meth:`compiled`'s
        generated code (~7 µs). The same comparisons and the same sum, in the same order: the same bits.

        >>> import numpy as np
        >>> flat = FlatTrees(0.5, *map(np.array, ([0, 0, 0], [1.5, 0, 0], [True, False, False], [1, 1, 2],
        ...                  [2, 1, 2], [False, True, True], [0.0, -1.0, 2.0], [0])), depth=1)
        >>> walk = flat.walker()
        >>> walk([1.0]), walk([2.0]), walk([float("nan")])
        (-0.5, 2.5, -0.5)
        """
        if kernels.IMPL is kernels:
            return self.compiled()
        import numpy as np

        feature, left, right, roots = (np.ascontiguousarray(a, dtype=np.int64)
                                       for a in (self.feature, self.left, self.right, self.roots))
        missing_left, leaf = (np.ascontiguousarray(a, dtype=np.uint8) for a in (self.missing_left, self.leaf))
        threshold, value = (np.ascontiguousarray(a, dtype=np.float64) for a in (self.threshold, self.value))
        return functools.partial(kernels.IMPL.walk_trees, float(self.baseline), feature, threshold, missing_left,
                                 left, right, leaf, value, roots)

    def raw(self, row: Any) -> float:
        """The log-odds for one row (a 1-d float array in the fitted column layout)."""
        import numpy as np

        node = self.roots
        for _ in range(self.depth):
            v = row[self.feature[node]]
            go_left = np.where(np.isnan(v), self.missing_left[node], v <= self.threshold[node])
            node = np.where(go_left, self.left[node], self.right[node])
        return self.baseline + float(self.value[node].sum())


_COMPILED: dict[bytes, Any] = {}  # fit digest -> compiled trees: a reloaded checkpoint is not compiled again


def _literal(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ("1e999" if v > 0 else "-1e999")


def _compile_trees(flat: FlatTrees) -> Any:
    """Generate and compile ``def raw(r)``: each tree as nested ``if`` statements on ``r[feature] <= threshold``
    (``not (r[j] > t)`` where missing values go left: NaN fails every comparison)."""
    import hashlib

    parts = [flat.feature, flat.threshold, flat.missing_left, flat.left, flat.right, flat.leaf, flat.value, flat.roots]
    digest = hashlib.blake2b(repr(flat.baseline).encode() + b"".join(p.tobytes() for p in parts)).digest()
    fn = _COMPILED.get(digest)
    if fn is not None:
        return fn
    if flat.depth > 90:  # beyond the parser's nesting limit: walk the arrays instead
        import numpy as np

        return lambda r: flat.raw(np.asarray(r, dtype=float))
    used = sorted({int(j) for j, leaf in zip(flat.feature, flat.leaf) if not leaf})
    # each used column read once into a local: a comparison is then 4 bytecodes, not 6
    lines = ["def raw(r):", *(f"    c{j} = r[{j}]" for j in used), f"    s = {_literal(flat.baseline)}"]

    def emit(node: int, pad: str) -> None:
        if flat.leaf[node]:
            lines.append(f"{pad}s += {_literal(flat.value[node])}")
            return
        j, t = int(flat.feature[node]), _literal(flat.threshold[node])
        lines.append(f"{pad}if not (c{j} > {t}):" if flat.missing_left[node] else f"{pad}if c{j} <= {t}:")
        emit(int(flat.left[node]), pad + " ")
        lines.append(f"{pad}else:")
        emit(int(flat.right[node]), pad + " ")

    for root in flat.roots:
        emit(int(root), "    ")
    lines.append("    return s")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<batch_hgb trees>", "exec"), namespace)  # our own numbers only
    if len(_COMPILED) >= 16:
        _COMPILED.clear()
    fn = _COMPILED[digest] = namespace["raw"]
    return fn


# The stack starts as the mean of its members' log-odds and learns with AdaGrad(0.1). From zero weights
# with SGD(0.01) it drifted away from a good blend on a long history (simulated 40,000 leads: whole-history
# ROC AUC 0.785, below logreg alone at 0.787, against 0.793 now; X Education 0.8777 -> 0.8778).
# One set of weights per form segment (fifth round, docs/model-comparison.md): on X Education the members
# are not equally good on blank forms and on full ones (served whole 0.8769 -> 0.8794, leadstream evaluate); on a
# history where every lead fills in as many fields (the simulated one) it is the single stack it was.
class Stack:
    """Online logistic regression over the base learners' log-odds (their predictions before learning),
    with one weight per member and :func:`form_segment` (inputs ``<member>|<segment>``) and one intercept.

    >>> s = Stack(["a", "b"])
    >>> for _ in range(200):
    ...     s.learn_from({"a": 0.9, "b": 0.5}, True); s.learn_from({"a": 0.1, "b": 0.5}, False)
    >>> s.predict_from({"a": 0.9, "b": 0.5}) > 0.8
    True
    >>> full = {"fields_known": 8.0}  # another segment: its weights are still the mean of the members
    >>> round(s.predict_from({"a": 0.9, "b": 0.5}, full), 3) == round(_sigmoid(s.model.intercept + _logit(0.9) / 2), 3)
    True
    """

    name = "stack"

    def __init__(self, bases: Sequence[str], lr: float = 0.1, init: dict[str, float] | None = None) -> None:
        self.bases = tuple(bases)
        self.model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(lr), l2=0.0, intercept_lr=0.01)
        if init is None:  # the mean of the members' log-odds
            init = {k: 1 / len(self.bases) for k in self.bases} if self.bases else {}
        # member -> its input, per segment
        self.keys = {s: {k: _stack_input(k, s) for k in self.bases} for s in SEGMENTS}
        for k, w in init.items():
            for s in SEGMENTS:  # River has no per-weight initialiser: set before any learning
                self.model._weights[_stack_input(k, s)] = w

    def _x(self, base_p: dict[str, float], x: X | None) -> X:
        keys = self.keys[form_segment(x or {})]
        return {keys[k]: _logit(base_p[k]) for k in self.bases if k in base_p}

    def predict_from(self, base_p: dict[str, float], x: X | None = None) -> float:
        """P(won) from the members' predictions ``base_p`` for the lead whose model inputs are ``x``."""
        return float(self.model.predict_proba_one(self._x(base_p, x)).get(True, 0.5))

    def learn_from(self, base_p: dict[str, float], y: bool, x: X | None = None) -> None:
        glm.learn_one(self.model, self._x(base_p, x), bool(y))
        self.seen = getattr(self, "seen", 0) + 1  # older checkpoints have no counter


class FastStack:
    """A :class:`Stack` frozen into each segment's member weights, for serving: no inputs dict, no
    River call per prediction.

    The same products summed in the same order as River's dot product (the members' order, from
    0.0; then the intercept), through the same sigmoid: the same bits.

    >>> s = Stack(["a", "b"])
    >>> for i in range(300):
    ...     s.learn_from({"a": 0.9, "b": 0.2 + i % 7 / 10}, i % 3 > 0, {"fields_known": i % 9})
    >>> cases = [({"a": i / 11, "b": 1 - i / 13}, {"fields_known": i % 10}) for i in range(12)] + [({"a": 0.3}, None)]
    >>> [FastStack(s).predict_from(p, x) for p, x in cases] == [s.predict_from(p, x) for p, x in cases]
    True
    """

    def __init__(self, stack: Stack) -> None:
        weights = stack.model.weights  # River's initializer is zeros: a weight never learned is 0.0
        self.weights = {s: tuple((k, float(weights.get(key, 0.0))) for k, key in keys.items())
                        for s, keys in stack.keys.items()}
        self.intercept = stack.model.intercept
        self.link = stack.model.loss.mean_func

    def predict_from(self, base_p: dict[str, float], x: X | None = None) -> float:
        total = kernels.IMPL.stack_total(self.weights[form_segment(x or {})], base_p)
        return float(self.link(total + self.intercept))


def _stack_input(member: str, segment: str) -> str:
    """The stack's input for ``member``'s log-odds in ``segment`` (its weight's name)."""
    return f"{member}|{segment}"


class FastBinned:
    """A :class:`BinnedLogistic` frozen into weights by form segment, feature and bin: no key string built
    per number.

    The same sum in the same order as :meth:`BinnedLogistic.predict_proba` (absent keys add 0.0;
    ``_linear`` copies were never learned, so they find no table): the same bits.

    >>> g = BinnedLogistic()
    >>> for i in range(60):
    ...     x = {"src=ad": 1.0, "n": i % 5 * 0.7, "n_linear": 9.0, "big": 60.0 + i, "fields_known": i % 9}
    ...     g.learn(x, i % 3 == 0)
    >>> xs = [{"src=ad": 1.0, "n": v / 3, "n_linear": 1.0, "big": 55.0 + v, "new": 1.0, "fields_known": v % 10}
    ...       for v in range(12)]
    >>> [FastBinned(g).predict_proba(x) for x in xs] == [g.predict_proba(x) for x in xs]
    True
    """

    def __init__(self, learner: BinnedLogistic) -> None:
        self.intercept, self.per_unit = learner.intercept, learner.per_unit
        self.one_hot: dict[str, dict[str, float]] = {}  # segment -> one-hot key -> weight
        self.bins: dict[str, dict[str, dict[int, float]]] = {}  # segment -> number's name -> its bin -> weight
        for segment, weights in learner.weights.items():
            one_hot, bins = self.one_hot.setdefault(segment, {}), self.bins.setdefault(segment, {})
            for key, w in weights.items():
                if "=" in key:
                    one_hot[key] = w
                else:
                    name, _, b = key.rpartition("#")
                    bins.setdefault(name, {})[int(b)] = w

    def predict_proba(self, x: X) -> float:
        segment = form_segment(x)
        one_hot, bins, per_unit = self.one_hot.get(segment, {}).get, self.bins.get(segment, {}).get, self.per_unit
        total = 0
        for k, v in x.items():
            if "=" in k:
                total += one_hot(k, 0.0)
            elif (table := bins(k)) is not None:
                total += table.get(_bin(v, per_unit), 0.0)
        return _sigmoid(self.intercept + total)


class FastNaiveBayes:
    """A :class:`NaiveBayes` frozen into per-key log-likelihood ratios: one lookup per key of ``x``.

    >>> nb = NaiveBayes()
    >>> for _ in range(20):
    ...     nb.learn({"src=ad": 1.0, "n": 3.0}, True); nb.learn({"src=web": 1.0, "n": 0.5}, False)
    >>> x = {"src=ad": 1.0, "n": 2.0, "src=new": 1.0}
    >>> abs(FastNaiveBayes(nb).predict_proba(x) - nb.predict_proba(x)) < 1e-12
    True
    """

    def __init__(self, nb: NaiveBayes) -> None:
        n0, n1 = nb.n
        self.ready = bool(n0 and n1)
        if not self.ready:
            return
        self.prior = math.log(n1 / (n0 + n1)) - math.log(n0 / (n0 + n1))
        hits0, hits1 = nb.hits
        self.unseen = math.log(1 / (n1 + 2)) - math.log(1 / (n0 + 2))
        self.one_hot = {k: math.log((hits1.get(k, 0) + 1) / (n1 + 2)) - math.log((hits0.get(k, 0) + 1) / (n0 + 2))
                        for k in hits0.keys() | hits1.keys()}
        # Per key (mean, variance, log(2 pi variance)) of class 1, then of class 0: one flat tuple to
        # unpack per key of x (Nones where a class has too few values).
        self.gauss: dict[str, tuple[float | None, ...]] = {
            k: self._normal(nb.moments[1].get(k)) + self._normal(nb.moments[0].get(k))
            for k in nb.moments[0].keys() | nb.moments[1].keys()}

    @staticmethod
    def _normal(m: list[float] | None) -> tuple[float | None, float | None, float | None]:
        if m is None or m[0] < 2:
            return None, None, None
        var = m[2] / (m[0] - 1) + 1e-2  # as NaiveBayes.predict_proba
        return m[1], var, math.log(2 * math.pi * var)

    def predict_proba(self, x: X) -> float:
        if not self.ready:
            return 0.5
        one_hot, gauss, unseen = self.one_hot, self.gauss, self.unseen  # locals: read once per key of x
        z = self.prior
        for k, v in x.items():
            if "=" in k:
                z += one_hot.get(k, unseen)
            else:
                g = gauss.get(k)
                if g is None:
                    continue
                mean1, var1, log1, mean0, var0, log0 = g
                if mean1 is not None:
                    z += -0.5 * (log1 + (v - mean1) ** 2 / var1)
                if mean0 is not None:
                    z -= -0.5 * (log0 + (v - mean0) ** 2 / var0)
        return _sigmoid(z)


def fast_predictors(learners: dict[str, Any], linear: Any = None) -> dict[str, Any]:
    """Name -> ``predict_proba(x)`` for serving: frozen forms where they are cheaper (naive Bayes and
    ``gam`` as lookups, the batch learner's compiled trees, ``linear`` for ``logreg`` when given); stacks
    excluded."""
    out: dict[str, Any] = {}
    for name, learner in learners.items():
        if isinstance(learner, Stack):
            continue
        if isinstance(learner, NaiveBayes):
            out[name] = FastNaiveBayes(learner).predict_proba
        elif isinstance(learner, BinnedLogistic):
            out[name] = FastBinned(learner).predict_proba
        elif name == "logreg" and linear is not None:
            out[name] = linear
        else:
            out[name] = learner.predict_proba
    return out


def learned_stamp(learners: dict[str, Any]) -> tuple[Any, ...]:
    """Changes whenever any learner learns or refits: frozen forms built before it are stale."""
    return tuple(getattr(l, "seen", None) if not isinstance(l, NaiveBayes) else tuple(l.n)
                 for l in learners.values()) + tuple(id(getattr(l, "model", None)) for l in learners.values())


def make_learners(names: Iterable[str] = LEARNER_NAMES, *, batch_every: int = 1000, batch_window: int = 5000,
                  defer_refits: bool = False) -> dict[str, Any]:
    """The tournament's learners by name (``stack``, when asked, goes last and blends the others)."""
    out: dict[str, Any] = {}
    names = list(names)
    for name in names:
        if name in ("logreg", "hoeffding", "forest"):
            out[name] = RiverLearner(name)
        elif name == "naive_bayes":
            out[name] = NaiveBayes()
        elif name == "gam":
            out[name] = BinnedLogistic()
        elif name == "batch_hgb":
            out[name] = BatchHGB(every=batch_every, window=batch_window, defer=defer_refits)
        elif name != "stack":
            raise ValueError(f"learner {name!r}: expected some of {', '.join(KNOWN_LEARNERS)}")
    if "stack" in names:
        out["stack"] = Stack([n for n in out])
    return out


def fast_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Exact ROC AUC (ties count one half) with numpy: :func:`models.metrics.roc_auc`, 50x faster.

    >>> fast_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), fast_auc([0.5, 0.5], [0, 1]), fast_auc([0.2], [1])
    (0.75, 0.5, None)
    """
    import numpy as np

    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = np.unique(np.asarray(scores, dtype=float), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # of each distinct score, ranks from 1
    return float((average_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predict_all(learners: dict[str, Any], x: X) -> dict[str, float]:
    """Every learner's P(won) for ``x`` (a stack from the others' figures)."""
    out = {n: l.predict_proba(x) for n, l in learners.items() if not isinstance(l, Stack)}
    for n, l in learners.items():
        if isinstance(l, Stack):
            out[n] = l.predict_from(out, x)
    return out


def predict_with(learners: dict[str, Any], champion: str, x: X) -> float:
    """The champion's P(won) for ``x``; a stack needs its bases' figures first."""
    learner = learners[champion]
    if isinstance(learner, Stack):
        return predict_all(learners, x)[champion]
    return learner.predict_proba(x)


@dataclass
class Tournament:
    """Learners competing on one prequential stream; the champion is the best on a recent window.

    Parameters
    ----------
    learners
        Name -> learner (:func:`make_learners`); a :class:`Stack` blends the others' predictions.
    window
        Snapshots in the recent window the champion is chosen on.
    select_every
        Snapshots between two champion choices (an exact AUC over the window is not free).
    margin
        ROC AUC a challenger must gain over the champion, on the window, to replace it.
    default
        The champion until the window holds ``min_window`` snapshots of both classes.
    """

    learners: dict[str, Any]
    window: int = 2000
    select_every: int = 100
    margin: float = 0.005
    default: str = "logreg"
    min_window: int = 200
    champion: str = ""
    changes: int = 0  # champion replaced
    refused: int = 0  # a challenger was best on the window, but not by the margin
    seen: int = 0
    whole: dict[str, Prequential] = field(default_factory=dict)
    per_stage: dict[str, dict[str, Prequential]] = field(default_factory=dict)
    recent: dict[str, deque[float]] = field(default_factory=dict)  # learner -> its recent predictions
    recent_labels: deque[int] = field(default_factory=deque)
    window_auc: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.champion:
            self.champion = self.default if self.default in self.learners else next(iter(self.learners))
        self.recent = {n: deque(self.recent.get(n, ()), maxlen=self.window) for n in self.learners}
        self.recent_labels = deque(self.recent_labels, maxlen=self.window)

    def predict_all(self, x: X) -> dict[str, float]:
        """Every learner's P(won) for ``x``."""
        return predict_all(self.learners, x)

    def predict(self, x: X) -> float:
        """The champion's P(won)."""
        return predict_with(self.learners, self.champion, x)

    def test_then_train(self, x: X, y: int, stage: str | None = None) -> dict[str, float]:
        """Score ``x`` with every learner, record the figures, then let every learner learn it.

        Returns the predictions made before learning (the champion's is under its own name).
        """
        return self.test_then_train_many([x], y, [stage])[0]

    def test_then_train_many(self, xs: Sequence[X], y: int, stages: Sequence[str | None],
                             last: tuple[X, dict[str, float]] | None = None) -> list[dict[str, float]]:
        """:meth:`test_then_train` for the snapshots of one deal: all are scored before any is learned
        (they share the label: learning the first would leak it into the second's figure).
        ``last``: ``(x, predictions)`` already made for the last snapshot, used when ``x`` is equal."""
        all_preds = [last[1] if last is not None and i == len(xs) - 1 and last[0] == x else self.predict_all(x)
                     for i, x in enumerate(xs)]
        for preds, stage in zip(all_preds, stages):
            per = self.per_stage.setdefault(stage or "none", {})
            for name, p in preds.items():
                self.whole.setdefault(name, Prequential(bins=_BINS)).update(p, y)
                per.setdefault(name, Prequential(bins=_BINS)).update(p, y)
                self.recent[name].append(p)
            self.recent_labels.append(y)
        for x, preds in zip(xs, all_preds):
            for learner in self.learners.values():
                if isinstance(learner, Stack):
                    learner.learn_from(preds, bool(y), x)
                else:
                    learner.learn(x, bool(y))
        for _ in xs:
            self.seen += 1
            if self.seen % self.select_every == 0:
                self.select()
        return all_preds

    def select(self) -> bool:
        """Choose the champion on the window; True when it changed."""
        labels = list(self.recent_labels)
        if len(labels) < self.min_window or len(set(labels)) < 2:
            return False
        self.window_auc = {n: fast_auc(list(self.recent[n]), labels) for n in self.learners}
        scored = {n: a for n, a in self.window_auc.items() if a is not None}
        best = max(scored, key=lambda n: (scored[n], n == self.champion))
        current = scored.get(self.champion, 0.0)
        if best == self.champion:
            return False
        if scored[best] < current + self.margin:
            self.refused += 1
            return False
        self.champion = best
        self.changes += 1
        return True

    def refits_due(self) -> list[BatchHGB]:
        """Batch learners whose deferred refit is due (the worker runs them in a thread)."""
        return [l for l in self.learners.values() if isinstance(l, BatchHGB) and l.refit_due()]

    def report(self) -> dict[str, Any]:
        """Each learner's figures: whole stream, window, per stage; the champion and its changes."""
        learners = {}
        for name in self.learners:
            learners[name] = {
                "whole": self.whole[name].report() if name in self.whole else {"n": 0},
                "window_roc_auc": None if self.window_auc.get(name) is None else round(self.window_auc[name], 4),
                "per_stage": {s: m[name].report() for s, m in sorted(self.per_stage.items()) if name in m},
            }
            learner = self.learners[name]
            if isinstance(learner, BatchHGB):
                learners[name]["refits"] = {"every": learner.every, "window": learner.window, "fits": learner.fits,
                                            "seconds": round(learner.fit_seconds, 2)}
        return {"champion": self.champion, "changes": self.changes, "refused": self.refused,
                "window": self.window, "margin": self.margin, "learners": learners}


@dataclass
class StageModels:
    """Per-stage success probability: P(won | the lead entered stage s, what it did before).

    One online logistic regression per stage, trained on the stage-entry snapshots of that stage
    (what the lead had done in the previous stages), each with its own prequential figures, so its
    calibration (reliability table, Brier) is reported per stage.

    >>> m = StageModels()
    >>> for i in range(60):
    ...     m.learn({"n_download": float(i % 2)}, "proposal", i % 2)
    >>> p = m.probabilities({"n_download": 1.0})
    >>> sorted(p) == ["proposal"], p["proposal"] > 0.5
    (True, True)
    """

    models: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Prequential] = field(default_factory=dict)

    def learn(self, x: X, stage: str | None, y: int) -> None:
        if stage not in STAGES:
            return
        model = self.models.get(stage)
        if model is None:
            model = self.models[stage] = RiverLearner("logreg", name=f"stage:{stage}")
        self.metrics.setdefault(stage, Prequential()).update(model.predict_proba(x), y)
        model.learn(x, bool(y))

    def probabilities(self, x: X) -> dict[str, float]:
        """P(won) as of each stage the models have learned, in funnel order."""
        return {s: round(self.models[s].predict_proba(x), 4) for s in STAGES if s in self.models}

    def report(self) -> dict[str, Any]:
        return {s: {**self.metrics[s].report(), "reliability": self.metrics[s].reliability()}
                for s in STAGES if s in self.metrics}
