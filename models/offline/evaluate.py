"""Offline evaluation: replay a history through the stream's own code, test-then-train.

:func:`evaluate_events` is pure. It keeps per-lead state and stage-entry snapshots exactly as
the stream keeps them in Redis, runs :func:`models.scoring.step` on every
event in arrival order with a :class:`~models.scoring.Scorer`, and hands every training example
to one :class:`~models.learner.Trainer`, whose serving model the scorer picks up right after each
learned deal (the stream's scorers pick up checkpoints the same way, a poll interval later).

For every closed deal it records, *before* the trainer learns from that deal, three
probabilities for the deal's last snapshot (the features as of the last event before the
outcome): ``rules`` (the point rules), ``model`` (the online model being served, whatever it has
learned so far: 0.5 before the first deal) and ``served`` (what the stream would send: the rules
until ``min_outcomes`` deals of each class, then the blend, then the model). Metrics are computed
over the whole history and over its last 20% of closed deals (by arrival order of the outcome).

The replay splits in two halves: the events stepped with the rules alone (decoding, dedupe,
:func:`models.scoring.step`; no model takes part) give the deals' training examples, which the
trainer then scores and learns in arrival order. With ``processes`` > 1 (Linux; the command's
default on 2 CPUs or more) the first half runs in child processes, and the batch learner's refits
are made ahead in another from the same examples, each used only if fitted on this trainer's window,
byte for byte: the same figures as one process, from more than one core. The replay is forked before
this module imports the learners (it needs none), and it builds no score messages (nothing reads them).

:func:`streams.offline.run_evaluate` is the ``leadstream evaluate FILE --mapping MAPPING [--json]``
command, which reads the files and prints the report; nothing here does.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from models.events import Event, RejectedEvent, parse_event, topic_kind_of
from models.fields import Encoder
from models.metrics import mean_log_loss
from models.rules import Rules
from models.scoring import MAX_STAGE_SNAPSHOTS, Scorer, step

log = logging.getLogger(__name__)
# The learners (River, SciPy, ~2.5 s of imports) are imported where they are used: with processes > 1
# the replay, which needs none of them, is forked first and runs while this process imports them.
if TYPE_CHECKING:
    from models.learner import Trainer

SCORERS = ("rules", "model", "served")
HOLDOUT = 0.2  # the last fifth of the closed deals, by arrival order
LIFT_FRACTION = 0.1
# leadstream evaluate's batch refits: 0 = inline, when due. A lag (streams.offline.run_evaluate(refit_lag=n))
# fits beside the replay, as the worker does, but costs accuracy where the last deals matter: X Education
# with n = 200, batch_hgb 0.9126 -> 0.9057 and served 0.9161 -> 0.9131 on the last 20%, for no wall time on
# a busy machine.
REFIT_LAG = 0


# ---------------------------------------------------------------- metrics


def holdout_start(n: int, fraction: float = HOLDOUT) -> int:
    """Index of the first deal of the last ``fraction`` of ``n`` deals: ``floor(n * (1 - fraction))``.

    The last part has ``ceil(n * fraction)`` deals (for 9,237 deals: 7,389 then the last 1,848).

    >>> holdout_start(10), holdout_start(9237), holdout_start(0)
    (8, 7389, 0)
    """
    return math.floor(round(n * (1 - fraction), 9))


def top_fraction_lift(scores: Sequence[float], labels: Sequence[int], fraction: float = LIFT_FRACTION) -> float | None:
    """Win rate among the top ``fraction`` of deals by score, divided by the overall win rate.

    The top part has ``ceil(n * fraction)`` deals. Ties at the cut are shared: a group of equal
    scores that straddles it counts with its mean win rate (the expectation over a random order
    of the tied deals), so the figure does not depend on input order. ``None`` without a win.

    >>> top_fraction_lift([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], [1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    3.3333
    >>> top_fraction_lift([0.5] * 10, [1, 0, 1, 0, 0, 0, 0, 0, 0, 1])  # all tied: no better than chance
    1.0
    """
    n = len(scores)
    wins = sum(labels)
    if n == 0 or wins == 0:
        return None
    k = max(1, math.ceil(round(n * fraction, 9)))
    ranked = sorted(zip(scores, labels), key=itemgetter(0), reverse=True)  # stable: ties keep their order
    taken, top_wins, i = 0, 0.0, 0
    while taken < k:
        j = i
        while j < n and ranked[j][0] == ranked[i][0]:
            j += 1
        group = [y for _, y in ranked[i:j]]
        share = min(len(group), k - taken)
        top_wins += share * sum(group) / len(group)
        taken += share
        i = j
    return round((top_wins / k) / (wins / n), 4)


def score_metrics(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float | int | None]:
    """ROC AUC (exact), mean log loss, Brier score and top-decile lift of probabilities ``scores``.

    >>> score_metrics([0.9, 0.8, 0.3, 0.6, 0.2], [1, 1, 0, 0, 0])
    {'n': 5, 'won': 2, 'win_rate': 0.4, 'roc_auc': 1.0, 'log_loss': 0.3649, 'brier': 0.108, 'top_decile_lift': 2.5}
    """
    from models.tournament import fast_auc

    n = len(scores)
    auc = fast_auc(scores, labels) if n else None  # exactly roc_auc's figure (sums of half-integers), in numpy
    lift = top_fraction_lift(scores, labels)
    return {
        "n": n,
        "won": int(sum(labels)),
        "win_rate": round(sum(labels) / n, 4) if n else None,
        "roc_auc": None if auc is None else round(auc, 4),
        "log_loss": round(mean_log_loss(scores, labels), 4) if n else None,
        "brier": round(sum([(p - y) ** 2 for p, y in zip(scores, labels)]) / n, 4) if n else None,
        "top_decile_lift": lift,
    }


# ---------------------------------------------------------------- the replay


@dataclass(frozen=True)
class Prediction:
    """One closed deal as it was scored just before its outcome was learned."""

    index: int  # arrival order among the closed deals, from 0
    lead_id: str
    won: bool
    rules: float
    model: float
    served: float
    source: str  # what the stream would have sent: "rules", "blend" or "model"
    model_version: int
    learners: dict[str, float] = field(default_factory=dict)  # every tournament learner's P(won), before learning


@dataclass
class EvaluationResult:
    """The predictions for every closed deal, in arrival order, and counts of what was replayed."""

    predictions: list[Prediction]
    events: int = 0
    leads: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    closed_without_snapshot: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # only with keep_examples
    model_kind: str = "tournament"
    min_outcomes: int = 50
    batch_every: int = 1000

    def part(self, which: str) -> list[Prediction]:
        """``"whole"`` or ``"last_20pct"`` (the last :data:`HOLDOUT` of the deals by arrival)."""
        if which == "whole":
            return self.predictions
        if which == "last_20pct":
            return self.predictions[holdout_start(len(self.predictions)):]
        raise ValueError(f"part {which!r}: expected 'whole' or 'last_20pct'")

    def metrics(self, which: str = "whole") -> dict[str, dict[str, float | int | None]]:
        """Metrics of each of :data:`SCORERS`, then of each tournament learner, on one part."""
        preds = self.part(which)
        labels = [int(p.won) for p in preds]
        out = {name: score_metrics([getattr(p, name) for p in preds], labels) for name in SCORERS}
        for name in (preds[0].learners if preds else {}):
            out[name] = score_metrics([p.learners[name] for p in preds], labels)
        return out

    def freshness(self, metrics: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """The served model against the batch learner retrained every ``batch_every`` deals (ROC AUC)."""
        out: dict[str, Any] = {"batch_every": self.batch_every}
        for part, m in metrics.items():
            served, batch = m["served"]["roc_auc"], m.get("batch_hgb", {}).get("roc_auc")
            out[part] = {"served": served, "batch_hgb": batch,
                         "gain": None if served is None or batch is None else round(served - batch, 4)}
        return out

    def report(self) -> dict[str, Any]:
        """Everything as one JSON-able dict."""
        n = len(self.predictions)
        start = holdout_start(n)
        won = sum(p.won for p in self.predictions)
        metrics = {"whole": self.metrics("whole"), "last_20pct": self.metrics("last_20pct")}
        return {
            "model_kind": self.model_kind,
            "min_outcomes": self.min_outcomes,
            "events": self.events,
            "leads": self.leads,
            "duplicates": self.duplicates,
            "rejected": dict(sorted(self.rejected.items())),
            "deals": {"n": n, "won": won, "lost": n - won,
                      "closed_without_snapshot": self.closed_without_snapshot},
            "last_20pct": {"first_deal_index": start, "n": n - start},
            "metrics": metrics,
            "freshness": self.freshness(metrics),
            "served_sources": {
                part: dict(sorted(Counter(p.source for p in self.part(part)).items()))
                for part in ("whole", "last_20pct")
            },
            "trainer": self.trainer,
        }


def _as_event(raw: Event | Mapping[str, Any]) -> Event:
    """An :class:`Event` as is; a contract dict decoded by the stream's own :func:`parse_event`."""
    if isinstance(raw, Event):
        return raw
    lead_id = raw.get("lead_id")
    key = lead_id.encode() if isinstance(lead_id, str) else None
    return parse_event(key, orjson.dumps(raw), topic_kind=topic_kind_of(str(raw.get("type"))))


class _LaggedRefits:
    """The batch learners' refits in one background thread, each served ``lag`` deals after it was due.

    scikit-learn's fit releases the GIL for most of its work, so it runs beside the replay; the
    install point is a deal count, so the figures are the same on any machine."""

    def __init__(self, lag: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.lag = lag
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="refit")
        self.pending: list[tuple[int, Any, Any]] = []  # (install after this many deals, learner, future)

    def after_deal(self, trainer: Trainer, learned: int) -> None:
        while self.pending and self.pending[0][0] <= learned:
            _, learner, job = self.pending.pop(0)
            learner.install(job.result())
        for learner in trainer.tournament.refits_due():
            job = self.pool.submit(type(learner).fit_rows, learner.take_window(), dict(learner.params),
                                   learner.max_columns)
            self.pending.append((learned + self.lag, learner, job))

    def finish(self) -> None:
        """Fits still running at the end are waited for and installed (counted in the report)."""
        for _, learner, job in self.pending:
            learner.install(job.result())
        self.pending.clear()
        self.pool.shutdown()


def evaluate_events(events: Iterable[Event | Mapping[str, Any]], rules: Rules, *, min_outcomes: int = 50,
                    model_kind: str = "tournament", keep_examples: bool = False,
                    batch_every: int = 1000, refit_lag: int = 0, processes: int = 1,
                    returned: dict[str, Any] | None = None) -> EvaluationResult:
    """Replay ``events`` (in arrival order) through the stream's step, scorer and trainer.

    Parameters
    ----------
    events
        :class:`~models.events.Event` objects, or contract dicts (as made by
        :mod:`models.offline.history` or :mod:`models.offline.simulate`), which are decoded and validated by
        :func:`models.events.parse_event` like the stream's input; rejected ones are counted by
        reason in ``rejected``. An event id seen before for the same lead is skipped (counted in
        ``duplicates``), as the stream's dedupe does.
    rules
        The point rules (``load_rules``), also the source of the decay half-life.
    min_outcomes
        Closed deals of each class before the model takes part in the served score.
    model_kind
        One of :data:`models.learner.MODEL_KINDS` (``tournament``: every learner, the champion served).
    batch_every
        Deals between two refits of the batch learner (``batch_hgb``, the vendors' cadence).
    refit_lag
        0: each refit runs inline, when it is due. ``n`` > 0: as in the worker, off the hot path: the
        fit runs in a thread on the window as of when it was due, while the replay goes on, and serves
        from ``n`` deals later (a fixed count, not "when done": the figures do not depend on timing).
    processes
        1: everything in this process. ``n`` > 1 (with ``refit_lag`` 0): ``n - 1`` child processes
        replay the events, each stepping the events of its own leads (a lead's state and snapshots are
        its own, so the split changes nothing; the first one iterates ``events`` and hands the others
        theirs), another one makes the batch learner's refits ahead from the same training examples,
        and this process merges the examples back into arrival order and runs the trainer. A fit made
        ahead is used only if the window of rows it was fitted on is this trainer's, byte for byte
        (else it is fitted here): the figures are those of ``processes=1``. On Linux (``fork``);
        elsewhere everything runs in this process.
    returned
        With ``processes`` > 1: a dict that iterating ``events`` fills in (e.g. counts of rows read),
        copied back from the child process once the replay is done.
    keep_examples
        Also keep every training example (``{"snapshots": [...], "won": bool, ...}`` as the stream
        sends it to the trainer) in ``examples``, in arrival order: for offline model studies
        that replay the same examples through other learners.

    Returns
    -------
    EvaluationResult
        One :class:`Prediction` per closed deal that had a snapshot, recorded before learning.

    Examples
    --------
    Two leads that download and win, two that only visit and lose: the rules rank them perfectly,
    the untrained model cannot (its first prediction is 0.5).

    >>> from models.rules import DEFAULT_CONFIG, load_rules
    >>> rules = load_rules(DEFAULT_CONFIG.read_text())
    >>> events = []
    >>> for i, won in enumerate([True, False, True, False]):
    ...     t = i * 10_000
    ...     events += [Event(f"e{i}a", f"l{i}", "download" if won else "visit", t, {}),
    ...                Event(f"e{i}b", f"l{i}", "deal_won" if won else "deal_lost", t + 1000, {})]
    >>> result = evaluate_events(events, rules, min_outcomes=1)
    >>> [(p.index, p.won, round(p.rules, 3), p.source) for p in result.predictions]
    [(0, True, 0.083, 'rules'), (1, False, 0.035, 'rules'), (2, True, 0.083, 'blend'), (3, False, 0.035, 'blend')]
    >>> result.predictions[0].model, result.predictions[1].model_version  # nothing learned, then one deal
    (0.5, 1)
    >>> result.metrics()["rules"]["roc_auc"], result.report()["deals"]["n"]
    (1.0, 4)
    """
    if processes > 1 and refit_lag == 0 and _can_fork():
        return _evaluate_in_processes(events, rules, shards=processes - 1, min_outcomes=min_outcomes,
                                      model_kind=model_kind, keep_examples=keep_examples, batch_every=batch_every,
                                      returned=returned)
    replay = _Replay(rules)
    return _learn(replay.trainings(events), replay, rules, min_outcomes=min_outcomes, model_kind=model_kind,
                  keep_examples=keep_examples, batch_every=batch_every, refit_lag=refit_lag)


_RULES_EXACT = "_rules_score"  # a key the replay adds to a training example and _learn takes out


class _Replay:
    """The model-free half of :func:`evaluate_events`: events decoded, deduplicated and stepped as the
    stream steps them (rules only); yields each deal's training example and counts the rest."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.events = 0
        self.leads = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.closed_without_snapshot = 0

    def counts(self) -> dict[str, Any]:
        return {"events": self.events, "leads": self.leads, "duplicates": self.duplicates,
                "rejected": self.rejected, "closed_without_snapshot": self.closed_without_snapshot}

    def trainings(self, events: Iterable[Event | Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        # No per-event score feeds a feature, snapshot or figure here (only the score message and the
        # hot flag, which evaluate does not report): events are folded unscored (features and rules only
        # at stage entries and closes) and the model scores each deal once, at its close. Same
        # features, same figures, far less work.
        stepper = Scorer(self.rules)
        states: dict[str, dict[str, Any]] = {}
        stage_snaps: dict[str, list[dict[str, Any]]] = {}
        deleted: dict[str, int] = {}  # when a lead was deleted: older events must not bring it back
        seen: set[tuple[str, str]] = set()
        leads: set[str] = set()
        for raw in events:
            try:
                event = _as_event(raw)
            except RejectedEvent as exc:
                self.rejected[str(exc)] += 1
                continue
            if (event.lead_id, event.event_id) in seen:
                self.duplicates += 1
                continue
            seen.add((event.lead_id, event.event_id))
            leads.add(event.lead_id)
            self.leads = len(leads)
            self.events += 1
            lead = event.lead_id
            before = states.get(lead)
            closing = event.type in ("deal_won", "deal_lost")
            first_close = closing and (before is None or before.get("outcome") is None)
            r = step(before, event, stepper, scored_at_ms=event.ts_ms, stage_snapshots=stage_snaps.get(lead),
                     deleted_ts=deleted.get(lead), copy=False, score=False)
            if r.state is None:  # deleted: the stream drops the state and both kinds of snapshot, keeps deleted_ts
                if r.deleted_ts is not None:
                    deleted[lead] = r.deleted_ts
                states.pop(lead, None)
                stage_snaps.pop(lead, None)
            else:
                states[lead] = r.state
                if r.stage_snapshot:
                    kept = stage_snaps.setdefault(lead, [])
                    kept.append(r.snapshot)
                    del kept[:-MAX_STAGE_SNAPSHOTS]
                if closing:  # the stream deletes the stage snapshots at close
                    stage_snaps.pop(lead, None)
            if first_close and r.training is None and r.state is not None:  # an outcome with nothing before it
                self.closed_without_snapshot += 1
            if r.training is not None:
                # The rules' exact score of the deal's last snapshot (the report's "rules" column), here
                # rather than on the trainer, whose process finishes last; _learn pops it.
                exact = r.last_rules_score
                if exact is None:
                    exact = self.rules.score(r.training["snapshots"][-1]["features"], max_reasons=0).score
                r.training[_RULES_EXACT] = exact
                yield r.training


def _learn(trainings: Iterable[dict[str, Any]], replay: _Replay | Callable[[], dict[str, Any]], rules: Rules, *,
           min_outcomes: int, model_kind: str, keep_examples: bool, batch_every: int, refit_lag: int = 0,
           prefits: _Prefits | None = None) -> EvaluationResult:
    """The model half of :func:`evaluate_events`: each deal scored by every learner, then learned.

    ``replay`` gives the replay's counts once ``trainings`` is exhausted (a :class:`_Replay`, or a
    function returning its :meth:`_Replay.counts`)."""
    from models.learner import Trainer

    trainer = Trainer(min_outcomes=min_outcomes, kind=model_kind, batch_every=batch_every,
                      encoder=Encoder(rules.fields), defer_refits=refit_lag > 0)
    if prefits is not None:
        prefits.attach(trainer)
    refits = _LaggedRefits(refit_lag) if refit_lag > 0 else None
    scorer = Scorer(rules, trainer.serving(copy_state=False))
    result = EvaluationResult([], model_kind=model_kind, min_outcomes=min_outcomes, batch_every=batch_every)
    for training in trainings:
        features = training["snapshots"][-1]["features"]  # the last snapshot before the outcome
        rules_score = training.pop(_RULES_EXACT, None)
        assert scorer.model is not None
        learners, x = scorer.model.score_all(features, reasons=False)  # every learner, before learning the deal
        served = scorer.score(features)  # the champion's figure is not computed again
        p_model = learners[scorer.model.champion]
        result.predictions.append(Prediction(
            len(result.predictions), training["lead_id"], bool(training["won"]),
            scorer.rules_score(features, served) if rules_score is None else rules_score,
            p_model, served.score, served.source, served.model_version, learners))
        trainer.learn(training["snapshots"], training["won"], last=(x, learners))
        if keep_examples:
            result.examples.append(training)
        if refits is not None:
            refits.after_deal(trainer, len(result.predictions))
        scorer.model = trainer.serving(copy_state=False)  # a new one after every deal: no copies needed
    if refits is not None:
        refits.finish()
    counts = replay.counts() if isinstance(replay, _Replay) else replay()
    result.events, result.leads, result.duplicates = counts["events"], counts["leads"], counts["duplicates"]
    result.rejected = Counter(counts["rejected"])
    result.closed_without_snapshot = counts["closed_without_snapshot"]
    report = trainer.report()
    result.trainer = {k: report[k] for k in ("version", "kind", "outcomes", "drifts", "rejected_promotions",
                                             "tournament", "stage_models")}
    result.trainer["prequential_snapshots"] = {k: report[k] for k in ("rules", "champion", "challenger")}
    return result


# ---------------------------------------------------------------- in processes

_BATCH = 128  # training examples per message between processes
_READER_SHARE = 0.75  # the replay process that reads the events takes this many leads for another's one


# Garbage collection for a batch job that builds millions of long-lived objects (the leads' states, the
# learners' windows): with Python's default (700, 10, 10) each full collection walks all of them, 4.3 s
# of the 40,000-lead replay's ~35 s of CPU (9 full collections); with this, and the objects alive at the
# start (modules, classes) frozen out of every collection, 1.4 s (2). Cycles are still collected.
_GC_THRESHOLDS = (10_000, 10, 100)


def batch_gc() -> tuple[int, int, int]:
    """Tune this process's garbage collection for the replay (see :data:`_GC_THRESHOLDS`); returns the
    thresholds it had (the objects frozen stay frozen: they live as long as the process anyway).

    >>> import gc
    >>> before = batch_gc()
    >>> gc.get_threshold() == _GC_THRESHOLDS
    True
    >>> gc.set_threshold(*before); gc.unfreeze()
    """
    import gc

    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    return before


def _can_fork() -> bool:
    """Linux only: macOS has fork, but not safe with the system's numerical libraries loaded."""
    return sys.platform.startswith("linux")


class _WindowKeys:
    """Digests of the batch learner's windows: of everything a fit depends on, the rows (keys in order,
    exact float bits), the parameters and the column cap. Each row is hashed once, when it first comes
    in a window (a row is in ``window / every`` windows: 5 by default); a window's digest is that of
    its rows' digests. ``marshal`` version 2 writes values only (no shared references).

    >>> keys = _WindowKeys()
    >>> rows = [({"a": 1.0}, True), ({"a": 2.0, "b": 0.5}, False)]
    >>> first = keys.key(rows, {"p": 1}, 10)
    >>> first == _WindowKeys().key([({"a": 1.0}, True), ({"a": 2.0, "b": 0.5}, False)], {"p": 1}, 10)
    True
    >>> first != keys.key(rows[1:], {"p": 1}, 10) and first != keys.key(rows, {"p": 2}, 10)
    True
    """

    def __init__(self) -> None:
        self.known: dict[int, tuple[bytes, dict[str, float], bool]] = {}  # id(x) -> its digest, x, y

    def key(self, rows: list[tuple[dict[str, float], bool]], params: dict[str, Any], max_columns: int) -> bytes:
        import hashlib
        import marshal

        known, seen, digests = self.known, {}, []
        for x, y in rows:
            hit = known.get(id(x))
            if hit is None or hit[1] is not x or hit[2] != y:  # the reference kept: an id is never reused meanwhile
                hit = (hashlib.blake2b(marshal.dumps((x, y), 2), digest_size=16).digest(), x, y)
            seen[id(x)] = hit
            digests.append(hit[0])
        self.known = seen  # only the rows of this window: the next shares most of them
        rest = marshal.dumps((sorted(params.items()), max_columns), 2)
        return hashlib.blake2b(b"".join(digests) + rest).digest()


class _Prefits:
    """The batch learner's fits computed ahead in another process (:func:`_prefit_main`), in order.

    Attached to the replaying trainer's batch learner as its ``fit_rows``: a due refit takes the next
    fit from the other process and keeps it only if it was fitted on the same window (same digest);
    otherwise, and from then on, it fits here. Waiting for a fit costs no more than fitting it here."""

    def __init__(self, queue: Any, process: Any) -> None:
        self.queue, self.process = queue, process
        self.window_keys = _WindowKeys()
        self.used = 0
        self.refused = 0

    def attach(self, trainer: Trainer) -> None:
        from models.tournament import BatchHGB

        for learner in trainer.tournament.learners.values():
            if isinstance(learner, BatchHGB):
                learner.fit_rows = self.fit_rows

    def _next(self) -> Any:
        import queue as queue_

        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue_.Empty:
                if not self.process.is_alive() and self.queue.empty():
                    return None

    def fit_rows(self, rows: list[tuple[dict[str, float], bool]], params: dict[str, Any],
                 max_columns: int) -> tuple[Any, ...]:
        from models.tournament import BatchHGB

        if self.queue is not None:
            item = self._next()
            if item is not None and item[0] == self.window_keys.key(rows, params, max_columns):
                self.used += 1
                fitted, code = item[1], item[2]
                if code is not None:  # the trees as compiled there: the same source, so the same function
                    import marshal
                    import types

                    fitted[0].__dict__["_compiled"] = types.FunctionType(marshal.loads(code),
                                                                         {"__builtins__": __builtins__})
                return fitted
            self.refused += 1
            self.queue = None  # out of step: every later fit is made here
            log.warning("no batch fit made ahead for this window; fitting here from now on")
        return BatchHGB.fit_rows(rows, params, max_columns)


def _prefit_main(inboxes: list[Any], outbox: Any, trainer_args: dict[str, Any]) -> None:
    """The batch learner's refits, ahead of the trainer: the same examples, vectorised as
    :meth:`Trainer.learn` does (the encoder and stage rates learn from the examples alone, not from
    any model), into a batch learner configured as the trainer's; each fit goes out as it is made."""
    import marshal

    from models.learner import Trainer, vectorize
    from models.tournament import BatchHGB

    batch_gc()  # a child process of its own
    trainer = Trainer(**trainer_args)
    learners = [l for l in trainer.tournament.learners.values() if isinstance(l, BatchHGB)]
    window_keys = _WindowKeys()

    def fit_and_send(rows: list[tuple[dict[str, float], bool]], params: dict[str, Any],
                     max_columns: int) -> tuple[Any, ...]:
        fitted = BatchHGB.fit_rows(rows, params, max_columns)
        fn = fitted[0].compiled()
        code = marshal.dumps(fn.__code__) if fn.__code__.co_name == "raw" and not fn.__code__.co_freevars else None
        outbox.put((window_keys.key(rows, params, max_columns), fitted, code))
        return fitted

    for learner in learners:
        learner.fit_rows = fit_and_send
    for training in _merged(inboxes):
        snapshots, won = training["snapshots"], training["won"]
        y = bool(int(won))
        xs = [vectorize(snap["features"], trainer.stage_rates, trainer.encoder) for snap in snapshots]
        for x in xs:
            for learner in learners:
                learner.learn(x, y)
        trainer.stage_rates.update([s["stage"] for s in snapshots if s.get("stage")], won)
        if snapshots:
            trainer.encoder.learn(snapshots[-1]["features"])
    outbox.put(None)


def _send(boxes: list[Any], batch: list[Any]) -> None:
    """One batch to every box, pickled once."""
    import pickle

    blob = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    for box in boxes:
        box.put(blob)


def _replay_main(inbox: Any, rules: Rules, outboxes: list[Any], end_box: Any | None = None,
                 shard_boxes: Sequence[Any] = (), returned: dict[str, Any] | None = None,
                 plan: Any | None = None) -> None:
    """One replay process: its leads' events stepped in arrival order, each training example out with
    the arrival number of the event that closed the deal, in batches (to every outbox); then ``None``
    and ``("end", counts)`` (or ``("error", text)``) to the first outbox.

    ``plan``: a queue that says, before the first batch goes out, whether the outboxes after the first
    are read (the batch fits' process): the parent knows only once it has imported the learners, which
    it does while this process already replays.

    ``inbox`` is either a queue of ``(arrival number, event)`` batches, or (the first process) the
    events themselves: then each event whose lead belongs to another process (by a hash of the lead
    id: all of a lead's events go to one process, in order) is sent on to ``shard_boxes``, and
    ``("end", returned)`` goes to ``end_box`` once the events are read."""
    import pickle
    import traceback

    import bisect

    batch_gc()  # a child process of its own: its settings end with it
    replay = _Replay(rules)
    current = -1
    n = len(shard_boxes) + 1
    pending: list[list[tuple[int, Any]]] = [[] for _ in range(n)]
    # Leads per process, of 1000: the first also reads and converts the history, so it takes fewer
    weights = [_READER_SHARE] + [1.0] * (n - 1)
    bounds = [round(1000 * sum(weights[:k + 1]) / sum(weights)) for k in range(n)]

    def received() -> Iterator[Any]:
        nonlocal current
        while (blob := inbox.get()) is not None:
            for current, raw in pickle.loads(blob):  # noqa: B007 - read with each training example
                yield raw

    def read() -> Iterator[Any]:
        nonlocal current
        for seq, raw in enumerate(inbox):
            if n > 1:
                lead = raw.lead_id if isinstance(raw, Event) else raw.get("lead_id") if isinstance(raw, Mapping) \
                    else None
                k = bisect.bisect_right(bounds, hash(lead if isinstance(lead, str) else repr(lead)) % 1000)
                if k:
                    pending[k].append((seq, raw))
                    if len(pending[k]) >= 8 * _BATCH:
                        _send([shard_boxes[k - 1]], pending[k])
                        pending[k] = []
                    continue
            current = seq
            yield raw
        for box, batch in zip(shard_boxes, pending[1:]):
            _send([box], batch)
            box.put(None)
        end_box.put(("end", returned))

    def read_outboxes() -> list[Any]:
        nonlocal outboxes, plan
        if plan is not None:
            outboxes = outboxes if plan.get() else outboxes[:1]
            plan = None
        return outboxes

    try:
        batch: list[tuple[int, dict[str, Any]]] = []
        for training in replay.trainings(read() if end_box is not None else received()):
            batch.append((current, training))  # trainings() yields right after the closing event
            if len(batch) >= _BATCH:
                _send(read_outboxes(), batch)
                batch = []
        _send(read_outboxes(), batch)
        for box in outboxes:
            box.put(None)
        outboxes[0].put(("end", replay.counts()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        for box in [*outboxes, *shard_boxes]:
            box.put(None)
        outboxes[0].put(("error", traceback.format_exc()))
        if end_box is not None:
            end_box.put(("error", traceback.format_exc()))


def _merged(boxes: list[Any]) -> Iterator[dict[str, Any]]:
    """The shards' training examples in arrival order (each shard's come in order): a k-way merge."""
    import heapq
    import pickle

    def one(box: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        while (blob := box.get()) is not None:
            yield from pickle.loads(blob)

    for _, training in heapq.merge(*(one(box) for box in boxes), key=lambda st: st[0]):
        yield training


def _has_batch_learner(trainer_args: dict[str, Any]) -> bool:
    """Whether a :class:`~models.learner.Trainer` made with ``trainer_args`` has a batch learner to fit ahead.

    >>> _has_batch_learner({"kind": "tournament"}), _has_batch_learner({"kind": "logreg"})
    (True, False)
    """
    from models.learner import Trainer
    from models.tournament import BatchHGB

    return any(isinstance(l, BatchHGB) for l in Trainer(**trainer_args).tournament.learners.values())


def _evaluate_in_processes(events: Iterable[Event | Mapping[str, Any]], rules: Rules, *, shards: int,
                           min_outcomes: int, model_kind: str, keep_examples: bool, batch_every: int,
                           returned: dict[str, Any] | None) -> EvaluationResult:
    """:func:`evaluate_events` with the replay and the batch fits in child processes (see ``processes``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    end_box = ctx.Queue()
    shard_boxes = [ctx.Queue() for _ in range(shards - 1)]  # events for the replay processes after the first
    to_trainer = [ctx.Queue() for _ in range(shards)]  # each replay process's examples, for this process
    to_prefit = [ctx.Queue() for _ in range(shards)]  # and for the batch fits, if there are any (plan)
    plan = ctx.Queue()
    fits_box = ctx.Queue()
    # The replay first: it needs no learner, so it runs while this process imports them (~2.5 s)
    children = [ctx.Process(target=_replay_main, daemon=True,
                            args=(events, rules, [to_trainer[0], to_prefit[0]], end_box, shard_boxes, returned, plan))]
    children += [ctx.Process(target=_replay_main, daemon=True,
                             args=(shard_boxes[k - 1], rules, [to_trainer[k], to_prefit[k]], None, (), None, plan))
                 for k in range(1, shards)]
    for child in children:
        child.start()

    def counts() -> dict[str, Any]:
        total: dict[str, Any] = {"events": 0, "leads": 0, "duplicates": 0, "rejected": Counter(),
                                 "closed_without_snapshot": 0}
        for box in [end_box, *to_trainer]:
            end = box.get()
            if end[0] == "error":
                raise RuntimeError(f"leadstream evaluate: the replay failed:\n{end[1]}")
            if box is end_box:
                if returned is not None and end[1] is not None:
                    returned.update(end[1])
                continue
            for k, v in end[1].items():
                total[k] += v
        return total

    done = False
    try:
        trainer_args = {"min_outcomes": min_outcomes, "kind": model_kind, "batch_every": batch_every,
                        "encoder": Encoder(rules.fields)}
        with_prefits = _has_batch_learner(trainer_args)  # imports the learners, while the replay runs
        for _ in range(shards):  # each replay process waits for this before its first batch goes out
            plan.put(with_prefits)
        prefits = None
        if with_prefits:
            children.append(ctx.Process(target=_prefit_main, args=(to_prefit, fits_box, trainer_args), daemon=True))
            prefits = _Prefits(fits_box, children[-1])
            children[-1].start()
        result = _learn(_merged(to_trainer), counts, rules, min_outcomes=min_outcomes, model_kind=model_kind,
                        keep_examples=keep_examples, batch_every=batch_every, prefits=prefits)
        done = True
        return result
    finally:
        for child in children:
            if done:  # every child has handed everything over: it exits once its queues are flushed
                child.join(timeout=5)
            if child.is_alive():
                child.terminate()


# ---------------------------------------------------------------- the command


def _fmt(value: float | int | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable form of :meth:`EvaluationResult.report` (plus the run's header fields)."""
    deals = report["deals"]
    lines = []
    if "file" in report:
        lines.append(f"leadstream evaluate {report['file']} --mapping {report['mapping']}")
        rows = report["rows"]
        lines.append(f"rows: {rows['read']} read, {rows['bad']} bad; events: {report['events']} replayed"
                     f" ({report['duplicates']} duplicates, {sum(report['rejected'].values())} rejected);"
                     f" leads: {report['leads']}")
    rate = deals["won"] / deals["n"] if deals["n"] else 0.0
    lines.append(f"closed deals: {deals['n']} ({deals['won']} won, {rate:.1%}); model {report['model_kind']},"
                 f" served once {report['min_outcomes']} deals of each class are known")
    lines.append("")
    head = f"{'':8}" + "".join(f"| {title:<37}" for title in (
        f"whole history ({report['metrics']['whole']['rules']['n']} deals)",
        f"last 20% ({report['metrics']['last_20pct']['rules']['n']} deals)"))
    lines.append(head)
    lines.append(f"{'scorer':8}" + f"| {'ROC AUC':>8} {'log loss':>9} {'Brier':>7} {'lift@10%':>9}  " * 2)
    for name in SCORERS:
        cells = ""
        for part in ("whole", "last_20pct"):
            m = report["metrics"][part][name]
            cells += (f"| {_fmt(m['roc_auc']):>8} {_fmt(m['log_loss']):>9} {_fmt(m['brier']):>7}"
                      f" {_fmt(m['top_decile_lift'], 2):>9}  ")
        lines.append(f"{name:8}{cells}")
    lines.append("")
    lines.append("rules: the point rules; model: the online model as served at that moment (0.5 before it has"
                 " learned anything); served: what the stream sent (rules, then blend, then model).")
    sources = ", ".join(f"{k} {v}" for k, v in report["served_sources"]["whole"].items())
    lines.append(f"served sources over the whole history: {sources}")
    if "elapsed_s" in report:
        lines.append(f"elapsed: {report['elapsed_s']:.1f} s")
    return "\n".join(lines)
