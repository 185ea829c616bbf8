"""The stack's members read in one pass over the model inputs, for serving. Pure, no I/O.

Serving the stack asks each member for its prediction: the linear learner (its contributions are the
lead's reasons too), ``gam`` and the batch learner's trees. Each of them walks the ~45 keys of ``x``
with its own dict lookup per key. :class:`FusedMembers` merges their tables into one per form segment,
so one walk with one lookup per key (:func:`models.kernels.fused_pass`) gives all three: the same sums
in the same order, so the same bits as each member alone (a test checks it on every learner the
tournament trains).
"""

from __future__ import annotations

from typing import Any

from models import kernels
from models.tournament import (SEGMENTS, BatchHGB, BinnedLogistic, FastBinned, FrozenHGB, Stack, X, _fast_hgb, _sigmoid,
                               form_segment)

REASONS = 5  # the reasons a score carries (LinearScorer.explain's top)
# One entry per key: which members know it (models.kernels' flags), the linear learner's (a, b) (its
# contribution is a * value + b), gam's weight for a one-hot key or its table of bins for a number, the
# batch learner's column and category code (None: the value itself).
Entry = tuple[int, float, float, float, dict[int, float] | None, int, float | None]


class FusedMembers:
    """``logreg``, ``gam`` and ``batch_hgb`` predictions, and the linear learner's reasons, in one pass.

    ``linear`` is the :class:`~models.learner.LinearScorer` of ``logreg`` (required); ``gam`` and
    ``hgb`` are the learners (either may be None: that member is then not fused). An unfitted batch
    learner predicts 0.5, as :meth:`~models.tournament.BatchHGB.predict_proba`.

    >>> from models.learner import LinearScorer, make_model
    >>> from models.tournament import BinnedLogistic
    >>> m, g = make_model(), BinnedLogistic()
    >>> for i in range(40):
    ...     x = {"src=ad" if i % 3 else "src=web": 1.0, "n_click": float(i % 4), "fields_known": float(i % 9)}
    ...     _ = m.learn_one(x, i % 3 > 0); g.learn(x, i % 3 > 0)
    >>> linear = LinearScorer(m)
    >>> x = {"src=ad": 1.0, "n_click": 2.0, "fields_known": 5.0, "new": 3.0}
    >>> preds, reasons = FusedMembers(linear, g, None).predict(x)
    >>> (preds["logreg"], reasons) == linear.explain(x), preds["gam"] == g.predict_proba(x)
    (True, True)
    """

    def __init__(self, linear: Any, gam: Any | None, hgb: Any | None) -> None:
        self.linear = linear
        self.gam = FastBinned(gam) if gam is not None else None
        self.per_unit = gam.per_unit if gam is not None else 1.0
        fitted = hgb is not None and hgb.model is not None
        self.trees = _fast_hgb(hgb) if fitted else None
        self.names = ("logreg",) + (("gam",) if gam is not None else ()) + (("batch_hgb",) if hgb is not None else ())
        self.tables = {segment: self._table(segment) for segment in SEGMENTS}
        self.rest: tuple[str, ...] = ()  # the stack's other members (asked one by one)

    @classmethod
    def of(cls, linear: Any | None, learners: dict[str, Any]) -> FusedMembers | None:
        """The fused members of a tournament with a stack (None: no stack, or no linear learner)."""
        if linear is None or not any(isinstance(l, Stack) for l in learners.values()):
            return None
        gam, hgb = learners.get("gam"), learners.get("batch_hgb")
        fused = cls(linear, gam if isinstance(gam, BinnedLogistic) else None,
                    hgb if isinstance(hgb, (BatchHGB, FrozenHGB)) else None)
        fused.rest = tuple(n for n, l in learners.items() if n not in fused.names and not isinstance(l, Stack))
        return fused

    def _table(self, segment: str) -> dict[str, Entry]:
        entries: dict[str, list[Any]] = {}

        def entry(key: str) -> list[Any]:
            return entries.setdefault(key, [0, 0.0, 0.0, 0.0, None, -1, None])

        for key, (a, b) in self.linear.coef.items():
            e = entry(key)
            e[0] |= kernels.LINEAR
            e[1:3] = a, b
        if self.gam is not None:
            for key, w in self.gam.one_hot.get(segment, {}).items():
                e = entry(key)
                e[0] |= kernels.WEIGHT
                e[3] = w
            for key, table in self.gam.bins.get(segment, {}).items():
                e = entry(key)
                e[0] |= kernels.BINS
                e[4] = table
        if self.trees is not None:
            for key, (column, code) in self.trees.lookup.items():
                e = entry(key)
                e[0] |= kernels.COLUMN
                e[5:7] = column, code
        return {key: tuple(e) for key, e in entries.items()}  # type: ignore[misc]

    def predict(self, x: X, labels: dict[str, str] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Each fused member's P(won), and the linear learner's reasons for ``x``."""
        contrib: list[tuple[str, float]] = []
        row = self.trees.base.copy() if self.trees is not None else None
        # Only the reasons' top contributions are kept (the sum is of them all): the same reasons.
        linear_total, gam_total = kernels.IMPL.fused_pass(self.tables[form_segment(x)], x, self.per_unit, contrib, row,
                                                          REASONS)
        p_linear, reasons = self.linear.explain_contributions(contrib, labels, REASONS, total=linear_total)
        preds = {"logreg": p_linear}
        if self.gam is not None:
            preds["gam"] = _sigmoid(self.gam.intercept + gam_total)
        if "batch_hgb" in self.names:
            preds["batch_hgb"] = _sigmoid(self.trees.trees(row)) if self.trees is not None else 0.5
        return preds, reasons
