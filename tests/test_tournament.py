"""The tournament: shared checks every learner passes, champion choice with a margin, the batch
learner's cadence and its tree walk, per-stage models, and the streaming import."""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from models.learner import Trainer, vectorize
from models.metrics import roc_auc
from models.offline.history import load_mapping, rows_to_events
from models.tournament import KNOWN_LEARNERS, LEARNER_NAMES, BatchHGB, FlatTrees, StageModels, Tournament, make_learners
from streams.offline import read_rows, spill_run


def population(n, seed=1):
    """A learnable pattern (downloads and stage proposal win), with features that come and go."""
    rng = random.Random(seed)
    for _ in range(n):
        dl = rng.random() < 0.4
        prop = rng.random() < 0.4
        won = rng.random() < (0.85 if dl and prop else 0.15)
        f = {"n_download": float(dl * rng.randint(1, 4)), "stage": "proposal" if prop else "contacted"}
        if rng.random() < 0.5:
            f["f_country"] = rng.choice(["de", "fr", "in"])
        yield vectorize(f), won


# ---------------------------------------------------------------- shared checks, every learner


@pytest.mark.parametrize("name", [n for n in KNOWN_LEARNERS if n != "forest"])  # forest: slow, tested in test_learner
def test_every_learner_passes_the_shared_checks(name: str) -> None:
    learners = make_learners(LEARNER_NAMES if name == "stack" else (name,), batch_every=100, batch_window=500)
    t = Tournament(learners, window=300, select_every=50)
    x0 = vectorize({"n_download": 2.0, "stage": "proposal"})
    assert t.predict_all(x0)[name] == 0.5  # knows nothing yet: says "don't know"
    preds, labels = [], []
    for x, won in population(800):
        before = t.predict_all(x)[name]
        preds.append(t.test_then_train(x, won, "proposal")[name])
        assert preds[-1] == before  # the figure is taken before learning
        labels.append(int(won))
    assert all(0.0 <= p <= 1.0 for p in preds)
    assert t.predict_all({"never_seen": 1.0})[name] >= 0.0  # unseen and missing features are fine
    late = roc_auc(preds[400:], labels[400:])
    assert late > 0.6, (name, late)  # chance is 0.5, the best possible ranking of this population 0.743
    clone = pickle.loads(pickle.dumps(t))  # the checkpoint keeps every learner
    assert clone.predict_all(x0)[name] == t.predict_all(x0)[name]
    assert t.predict_all(x0) == t.predict_all(x0)  # predicting changes nothing


def test_gam_learns_an_effect_of_any_shape_where_the_linear_learner_cannot() -> None:
    """A number that wins only in a middle band (e.g. time on site: neither a glance nor an idle tab):
    the binned learner ranks it, a straight line in the number cannot."""
    rng = random.Random(5)
    learners = make_learners(("logreg", "gam"))
    preds: dict[str, list[float]] = {"logreg": [], "gam": []}
    labels = []
    for _ in range(3000):
        v = rng.uniform(0.0, 6.0)
        won = rng.random() < (0.8 if 2.0 <= v < 4.0 else 0.2)
        x = {"visit_duration_s": v, "visit_duration_s_linear": v, "stage=new": 1.0}
        for name, learner in learners.items():
            preds[name].append(learner.predict_proba(x))
            learner.learn(x, won)
        labels.append(int(won))
    late = {name: roc_auc(p[1000:], labels[1000:]) for name, p in preds.items()}
    assert late["gam"] > 0.75 > 0.6 > late["logreg"], late  # the best possible: 0.80


# ---------------------------------------------------------------- champion choice


class Fixed:
    """A learner whose figure is the label with probability ``skill`` (for choosing champions)."""

    def __init__(self, name: str, skill: float, seed: int) -> None:
        self.name, self.skill, self.rng, self.next_y = name, skill, random.Random(seed), 0

    def predict_proba(self, x):
        good = self.rng.random() < self.skill
        return 0.8 if (x["y"] == 1) == good else 0.2

    def learn(self, x, y):
        pass


def play(t: Tournament, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        y = int(rng.random() < 0.4)
        t.test_then_train({"y": y}, y)


def test_the_best_learner_on_the_window_becomes_champion() -> None:
    t = Tournament({"logreg": Fixed("logreg", 0.6, 1), "better": Fixed("better", 0.9, 2)},
                   window=400, select_every=100, margin=0.01)
    assert t.champion == "logreg"  # the default until the window is full enough
    play(t, 150)
    assert t.champion == "logreg"
    play(t, 300)
    assert t.champion == "better" and t.changes == 1
    assert t.report()["learners"]["better"]["window_roc_auc"] > t.report()["learners"]["logreg"]["window_roc_auc"]


def test_the_stack_serves_until_the_window_can_choose() -> None:
    """The trainer's first champion is the stack (the mean of its members at first), not one member:
    better whole-history figures on both histories (docs/model-comparison.md, fourth round)."""
    assert Trainer().tournament.champion == "stack"
    assert Trainer(kind="logreg").tournament.champion == "logreg"  # a single learner serves itself
    trainer = Trainer(min_outcomes=5, batch_every=200)
    for x, won in population(150):  # fewer than the window's 200 snapshots: nothing chosen yet
        trainer.learn([{"features": {"n_download": x.get("n_download", 0.0)}, "rules_score": 0.5}], won)
    assert trainer.tournament.champion == "stack" and trainer.serving().champion == "stack"


def test_the_margin_keeps_the_champion_from_flapping() -> None:
    t = Tournament({"logreg": Fixed("logreg", 0.80, 1), "twin": Fixed("twin", 0.80, 2)},
                   window=1000, select_every=50, margin=0.1)
    play(t, 3000)
    assert t.champion == "logreg" and t.changes == 0  # level learners never swap
    assert t.refused > 0  # the twin led the window at times and was refused
    no_margin = Tournament({"logreg": Fixed("logreg", 0.80, 1), "twin": Fixed("twin", 0.80, 2)},
                           window=1000, select_every=50, margin=0.0)
    play(no_margin, 3000)
    assert no_margin.changes > 0  # without a margin the same race swaps champions


# ---------------------------------------------------------------- the batch learner


def test_batch_learner_refits_every_n_outcomes_and_is_frozen_between() -> None:
    b = BatchHGB(every=50, window=120, min_rows=20)
    x = {"n": 1.0, "s=a": 1.0}
    data = list(population(230))
    for i, (xi, won) in enumerate(data[:149]):
        b.learn(xi, won)
        assert b.fits == (i + 1) // 50
    frozen = b.predict_proba(x)
    b.learn(*data[149])  # the 150th outcome: third refit
    assert b.fits == 3 and len(b.rows) == 120  # bounded window
    refit = b.predict_proba(x)
    for xi, won in data[150:199]:
        b.learn(xi, won)
        assert b.predict_proba(x) == refit  # frozen until the next refit
    assert frozen is not None


def test_batch_learner_grows_small_trees_unless_told_otherwise() -> None:
    """4 leaves a tree on half the columns (HGB_PARAMS): better on both histories than 15 leaves, and cheaper
    (docs/model-comparison.md, fourth round); a parameter given to the learner wins."""
    rng = random.Random(3)
    rows = [({f"n{j}": rng.random() for j in range(8)}, rng.random() < 0.5) for _ in range(400)]
    for params, most in (({}, 4), ({"max_leaf_nodes": 15, "max_features": 1.0}, 15)):
        b = BatchHGB(every=400, window=400, min_rows=20, **params)
        for x, won in rows:
            b.learn(x, won)
        leaves = np.add.reduceat(b.model.leaf.astype(int), b.model.roots)  # per tree
        assert b.fits == 1 and leaves.max() == most, (params, leaves.max())


def test_deferred_refits_wait_for_the_caller() -> None:
    trainer = Trainer(min_outcomes=1, batch_every=30, defer_refits=True)
    for x, won in population(120):  # the batch learner needs 100 rows before its first fit
        trainer.learn([{"features": {"n_download": x.get("n_download", 0.0)}, "rules_score": 0.5}], won)
    hgb = trainer.tournament.learners["batch_hgb"]
    assert hgb.fits == 0 and trainer.refits_due()
    assert trainer.refit() > 0 and hgb.fits == 1 and not trainer.refits_due()


def test_flat_trees_give_scikit_learns_probabilities() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    X = rng.random((600, 6))
    X[rng.random((600, 6)) < 0.2] = np.nan  # missing values take the learned side
    y = ((np.nan_to_num(X[:, 0], nan=0.7) + X[:, 1] * 0.5 + rng.random(600) * 0.5) > 1).astype(int)
    model = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(X, y)
    flat = FlatTrees.of(model)
    mine = np.array([1 / (1 + np.exp(-flat.raw(row))) for row in X[:200]])
    assert np.abs(mine - model.predict_proba(X[:200])[:, 1]).max() < 1e-9


# ---------------------------------------------------------------- per-stage probabilities


def test_stage_models_are_per_stage_and_calibrated_figures_are_reported() -> None:
    trainer = Trainer(min_outcomes=1)
    for x, won in population(600):
        dl = x.get("n_download", 0.0)
        snaps = [{"features": {"n_download": dl, "stage": "contacted"}, "rules_score": 0.5, "stage": "contacted"},
                 {"features": {"n_download": dl, "stage": "proposal"}, "rules_score": 0.5, "stage": "proposal"}]
        trainer.learn(snaps, won)
    serving = pickle.loads(pickle.dumps(trainer.serving()))
    probs = serving.stage_probabilities({"n_download": 3.0, "stage": "proposal"})
    assert list(probs) == ["contacted", "proposal"]  # funnel order, only stages learned
    assert probs["proposal"] > serving.stage_probabilities({"n_download": 0.0, "stage": "proposal"})["proposal"]
    report = trainer.report()["stage_models"]
    assert report["proposal"]["n"] == 600 and 0 < report["proposal"]["brier"] < 0.25
    assert sum(band["n"] for band in report["proposal"]["reliability"]) == 600
    assert StageModels().probabilities({"a": 1.0}) == {}


def test_trainer_serves_the_champion_and_reports_every_learner() -> None:
    trainer = Trainer(min_outcomes=5, batch_every=200)
    for x, won in population(1200):
        f = {"n_download": x.get("n_download", 0.0), "stage": "proposal" if "stage=proposal" in x else "contacted"}
        trainer.learn([{"features": f, "rules_score": 0.5, "stage": f["stage"]}], won)
    report = trainer.report()
    assert set(report["tournament"]["learners"]) == set(LEARNER_NAMES)
    serving = trainer.serving()
    f = {"n_download": 2.0, "stage": "proposal"}
    champion = report["tournament"]["champion"]
    expected = trainer.tournament.predict_all(vectorize(f, trainer.stage_rates))[champion]
    assert abs(serving.predict(f)[0] - expected) < 1e-12
    assert report["champion"]["roc_auc"] > 0.65


@pytest.mark.parametrize("champion", ["logreg", "gam", "batch_hgb", "stack"])
def test_serving_predicts_every_champion_as_its_learner_does(champion: str) -> None:
    """ServingModel.predict uses frozen forms (linear dicts, naive Bayes lookups, compiled trees): the
    same probability as the learner's own, the linear model's reasons, before and after a reload."""
    from models.learner import predict_explain, vectorize_labelled

    trainer = Trainer(min_outcomes=5, batch_every=200)
    for i, (x, won) in enumerate(population(900)):
        f = {"n_download": x.get("n_download", 0.0), "n_visit": float(i % 7), "f_city": ["a", "b", "c"][i % 3],
             "stage": "proposal" if "stage=proposal" in x else "contacted"}
        trainer.learn([{"features": f, "rules_score": 0.5, "stage": f["stage"]}], won)
    trainer.tournament.champion = champion
    serving = pickle.loads(pickle.dumps(trainer.serving()))
    for f in ({"n_download": 2.0, "n_visit": 3.0, "f_city": "b", "stage": "proposal"}, {"stage": "contacted"}, {}):
        x, labels = vectorize_labelled(f, serving.stage_rates, serving.encoder)
        p, reasons = serving.predict(f)
        assert abs(p - trainer.tournament.predict_all(x)[champion]) < 1e-12
        assert reasons == predict_explain(serving.model, x, labels=labels)[1]
    assert serving.predict({"n_visit": 1.0})[1]  # the linear model explains every champion's score


# ---------------------------------------------------------------- import: delimiter, row ids, streaming


MAPPING = '[lead]\nid = "@row"\norder = "n"\n[outcome]\ncolumn = "won"\npositive = "1"\n' \
          '[explicit]\n"Country" = "country"\n'


def test_semicolon_export_without_id_column(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    path.write_text("n;won;Country\n2;1;Deutschland\n1;0;France, Paris\n", encoding="utf-8")
    results = list(rows_to_events(read_rows(path, delimiter=";"), load_mapping(MAPPING)))
    assert [(r.line, r.lead_id, r.error) for r in results] == [(3, "row-3", None), (2, "row-2", None)]
    assert results[0].events[0]["props"]["fields"] == {"country": "France, Paris"}
    with pytest.raises(ValueError, match="expected one character"):
        next(read_rows(path, delimiter=";;"))


def test_long_exports_are_sorted_in_spilled_runs_with_the_same_result() -> None:
    rng = random.Random(3)
    rows = [(i + 2, {"n": str(rng.randint(0, 50)), "won": rng.choice("01"), "Country": "x"}) for i in range(230)]
    rows[7][1]["n"] = "bad"
    mapping = load_mapping(MAPPING)
    in_memory = list(rows_to_events(rows, mapping))
    spilled = list(rows_to_events(rows, mapping, spill=spill_run, run_rows=40))  # 5 runs on disk + 1 in memory
    assert spilled == in_memory and len(spilled) == 230 and in_memory[0].error


def test_rows_are_read_lazily(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("n,won,Country\n" + "".join(f"{i},1,x\n" for i in range(1000)))
    rows = read_rows(path)
    first = next(rows)  # one row read, not the file
    assert first == (2, {"n": "0", "won": "1", "Country": "x"})
    no_order = load_mapping(MAPPING.replace('order = "n"\n', ""))
    converted = rows_to_events(rows, no_order)
    assert next(converted).line == 3  # without an order column rows come out as they are read


def test_fast_auc_is_the_exact_auc() -> None:
    from models.metrics import roc_auc
    from models.tournament import fast_auc

    rng = random.Random(5)
    for _ in range(20):
        n = rng.randint(2, 300)
        scores = [round(rng.random(), 1) for _ in range(n)]  # many ties
        labels = [int(rng.random() < 0.4) for _ in range(n)]
        exact = roc_auc(scores, labels)
        assert (fast_auc(scores, labels) is None) if exact is None else abs(fast_auc(scores, labels) - exact) < 1e-12


def test_compiled_trees_and_fast_rows_give_the_numpy_walks_figures() -> None:
    """The serving path (generated code, rows from a key lookup) against the array walk of the same fit."""
    rng = np.random.default_rng(1)
    b = BatchHGB(every=300, window=600, min_rows=50)
    xs = []
    for i in range(600):
        x = {"n": float(rng.integers(0, 5)), f"src={rng.choice(['a', 'b', 'c'])}": 1.0}
        if rng.random() < 0.3:
            x[f"h={rng.integers(0, 4)}"] = 1.0
        if rng.random() < 0.2:
            del x["n"]  # missing: takes the learned side
        xs.append(x)
        b.learn(x, bool(x.get("n", 2.0) + ("src=a" in x) + rng.random() > 3))
    assert b.fits == 2
    xs += [{"src=zzz": 1.0, "never_seen": 3.0}, {}]  # unknown values and keys
    for x in xs:
        walked = b.model.raw(BatchHGB._row(x, b.columns, b.codes, b.template))
        assert abs(b.predict_proba(x) - 1 / (1 + np.exp(-walked))) < 1e-12
    clone = pickle.loads(pickle.dumps(b.frozen()))
    assert [clone.predict_proba(x) for x in xs] == [b.predict_proba(x) for x in xs]


def test_the_stacks_fused_members_give_each_members_own_figures_to_the_bit() -> None:
    """Serving reads logreg, gam and the batch learner in one pass: every probability and reason as each
    member's own frozen form gives it, in every form segment, for known and unknown keys."""
    from models.fused import FusedMembers
    from models.learner import LinearScorer
    from models.tournament import FastBinned

    rng = random.Random(3)
    trainer = Trainer(min_outcomes=5, batch_every=200)
    xs = []
    for x, won in population(900, seed=4):
        x = {**x, "fields_known": float(rng.randint(0, 9)), "age_days": rng.random() * 90,
             "big": 40 + rng.random() * 30}  # numbers on both sides of gam's log bins (50)
        xs.append(x)
        for learner in trainer.tournament.learners.values():
            if learner.name != "stack":
                learner.learn(x, won)
    serving = pickle.loads(pickle.dumps(trainer.serving()))
    hgb = serving.learners["batch_hgb"]
    assert hgb.model is not None  # the trees are part of it
    linear = LinearScorer(serving.model)
    fused = FusedMembers.of(linear, serving.learners)
    gam = FastBinned(serving.learners["gam"])
    xs += [{"never_seen": 2.0, "src=zzz": 1.0}, {}, {"fields_known": 5.0, "n_download": 60.0}]
    for x in xs:
        preds, reasons = fused.predict(x, {"n_download": "downloads"})
        assert (preds["logreg"], reasons) == linear.explain(x, labels={"n_download": "downloads"})
        assert preds["gam"] == gam.predict_proba(x) == serving.learners["gam"].predict_proba(x)
        assert preds["batch_hgb"] == hgb.predict_proba(x)
    # the served stack (and a fused member serving alone) through the fused pass and through each
    # member alone
    for champion in ("stack", "gam", "batch_hgb", "logreg"):
        serving.champion = champion
        serving.__dict__.pop("_fast", None)
        fused_served = [serving._fast_predict(x, {"n_download": "downloads"}) for x in xs]
        stamp, linear_, predictors, _, stacks = serving.__dict__["_fast"]
        serving.__dict__["_fast"] = (stamp, linear_, predictors, None, stacks)
        assert [serving._fast_predict(x, {"n_download": "downloads"}) for x in xs] == fused_served, champion


def test_the_frozen_stack_gives_the_stacks_own_figures_to_the_bit() -> None:
    """Serving blends the members with the stack's weights frozen (FastStack): the same bits as River's
    dot product and sigmoid, in every segment, for sure and unsure members, a missing member, and
    after the stack learned more (a stale frozen form is rebuilt)."""
    from models.tournament import FastStack, Stack

    rng = random.Random(11)
    stack = Stack(["logreg", "gam", "batch_hgb"])

    def case() -> tuple[dict[str, float], dict[str, float]]:
        base = {k: rng.choice([rng.random(), rng.random() ** 8, 1 - rng.random() ** 8, 0.0, 1.0, 0.5])
                for k in stack.bases if rng.random() > 0.05}
        return base, {"fields_known": float(rng.randint(0, 9))}

    for _ in range(2):
        for _ in range(2000):
            base, x = case()
            stack.learn_from(base, rng.random() < base.get("gam", 0.5), x)
        assert len(set(stack.model.weights.values())) == 9  # three members x three segments, all learned
        frozen = FastStack(stack)
        cases = [case() for _ in range(20_000)] + [({}, {}), ({"gam": 0.7}, {"fields_known": 8.0})]
        assert [frozen.predict_from(b, x) for b, x in cases] == [stack.predict_from(b, x) for b, x in cases]
    trainer = Trainer(min_outcomes=5, batch_every=200)
    for x, won in population(600, seed=5):
        trainer.learn([{"features": {"n_download": x.get("n_download", 0.0)}, "rules_score": 0.5, "stage": "new"}], won)
    trainer.tournament.champion = "stack"
    serving = trainer.serving()
    f = {"n_download": 3.0}
    serving.predict(f)
    trainer.learn([{"features": f, "rules_score": 0.5, "stage": "new"}], True)  # the shared stack learns
    serving.predict(f)
    served = serving.__dict__["_fast"][4]["stack"]
    assert served.weights == FastStack(trainer.tournament.learners["stack"]).weights  # rebuilt, not stale
