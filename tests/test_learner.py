"""The River model and trainer: River-style shared checks, metrics, promotion gate, stage rates."""

import pickle
import random

from models.learner import MODEL_KINDS, StageRates, Trainer, make_model, vectorize
from models.metrics import Prequential, roc_auc


def population(n, seed=1):
    rng = random.Random(seed)
    for _ in range(n):
        dl = rng.random() < 0.4
        prop = rng.random() < 0.4
        won = rng.random() < (0.85 if dl and prop else 0.15)
        f = {"n_download": float(dl * rng.randint(1, 4)), "stage": "proposal" if prop else "contacted"}
        if rng.random() < 0.5:  # features come and go
            f["f_country"] = rng.choice(["de", "fr", "in"])
        yield f, won


def test_every_model_kind_handles_emerging_and_disappearing_features_and_pickles():
    for kind in MODEL_KINDS[1:]:  # the River kinds; the tournament's learners: tests/test_tournament.py
        model = make_model(kind)
        for f, won in population(200):
            model.learn_one(vectorize(f), won)
        p = model.predict_proba_one({"never_seen": 1.0}).get(True, 0.0)
        assert 0.0 <= p <= 1.0
        clone = pickle.loads(pickle.dumps(model))
        x = vectorize({"n_download": 2.0, "stage": "proposal"})
        assert clone.predict_proba_one(x) == model.predict_proba_one(x)


def test_trainer_learns_the_pattern_prequentially():
    trainer = Trainer(min_outcomes=10)
    for f, won in population(1500):
        trainer.learn([{"features": f, "rules_score": 0.5, "stage": f["stage"]}], won)
    report = trainer.report()
    assert report["challenger"]["roc_auc"] > 0.7  # the best possible ranking of this population is 0.743
    assert report["rules"]["roc_auc"] == 0.5  # a constant score ranks nothing
    assert set(report["per_stage"]) == {"proposal", "contacted"}
    assert report["stage_rates"]["proposal"]["win_rate"] > report["stage_rates"]["contacted"]["win_rate"]
    assert trainer.version > 0 and trainer.serving().ready()


def test_stage_rates_are_smoothed_per_stage():
    rates = StageRates()
    rates.update(["new", "contacted", "proposal"], won=True)
    rates.update(["new", "contacted"], won=False)
    assert rates.rate("proposal") == 2 / 3 and rates.rate("new") == 0.5 and rates.rate("closing") == 0.5


def test_running_auc_matches_exact_auc():
    rng = random.Random(3)
    pairs = [(rng.random(), rng.random() < 0.4) for _ in range(2000)]
    scores = [min(0.999, p * 0.5 + 0.5 * y) for p, y in pairs]
    m = Prequential()
    for s, (_, y) in zip(scores, pairs):
        m.update(s, int(y))
    assert abs(m.auc() - roc_auc(scores, [int(y) for _, y in pairs])) < 0.002


def test_pairs_counted_from_the_histograms_equal_the_count_kept_on_arrival():
    """Prequential counts its Mann-Whitney pairs from the histograms when asked: bit for bit the count
    once kept on every update (each new score against the histograms so far), checkpoints and copies too."""
    import pickle

    rng = random.Random(7)
    for bins in (200, 1000):
        m = Prequential(bins=bins)
        pos, neg, kept = [0] * bins, [0] * bins, 0.0
        for i in range(3000):
            p = rng.choice([rng.random(), round(rng.random(), 2), 0.0, 1.0])  # ties and both ends
            y = int(rng.random() < 0.3 + 0.4 * p)
            m.update(p, y)
            b = min(int(p * bins), bins - 1)
            if y:
                kept += sum(neg[:b]) + neg[b] / 2
                pos[b] += 1
            else:
                kept += sum(pos[b + 1:]) + pos[b] / 2
                neg[b] += 1
            if i % 500 == 499:
                assert m.auc() == kept / (sum(pos) * sum(neg))
                assert pickle.loads(pickle.dumps(m)).pairs == kept == m.copy().pairs


def test_the_served_probability_is_the_models_own():
    """predict_explain scales features its own (faster) way: the probability must be River's."""
    import random

    from models.learner import make_model, predict_explain

    model, rng = make_model(), random.Random(0)
    for i in range(300):
        x = {"n_click": rng.random() * 3, "stage=new": 1.0, "age_days": rng.random() * 100} if i % 2 else \
            {"n_click": rng.random(), "stage=proposal": 1.0}
        model.learn_one(x, i % 3 == 0)
    for _ in range(20):
        x = {"n_click": rng.random() * 3, "stage=new": 1.0, "age_days": rng.random() * 10, "h=1f": 1.0}
        assert abs(predict_explain(model, x)[0] - model.predict_proba_one(x)[True]) < 1e-12


def _lead_states(seed, leads=60):
    """Every state of ``leads`` simulated leads, event by event, as the rules-only stream folds them."""
    import orjson

    from models.events import parse_event, topic_kind_of
    from models.offline.simulate import simulate
    from models.rules import DEFAULT_CONFIG, load_rules
    from models.scoring import Scorer, step

    rules = load_rules(DEFAULT_CONFIG.read_text())
    states, scorer = {}, Scorer(rules)
    for e in simulate(leads, seed=seed):
        ev = parse_event(e["lead_id"].encode(), orjson.dumps(e), topic_kind=topic_kind_of(e["type"]))
        r = step(states.get(ev.lead_id), ev, scorer, scored_at_ms=0, stage_snapshots=[])
        states[ev.lead_id] = r.state
        if r.training:
            yield "training", r.training
        if r.state is not None:
            yield "state", r.state


def _odd_variant(state, rng):
    """``state`` with what simulated leads never have: odd fields (private, hashed numbers, lists,
    -0.0, huge numbers), no creation time, no stage, no touch."""
    import copy

    odd = copy.deepcopy(state)
    extra = {"email": "a@b.c", "Revenue": rng.choice([1e20, -0.0, 3, 2.5]), "tags": ["A", 1], "Notes": "  Mixed Case ",
             "vip": rng.random() < 0.5, "job_title": rng.choice(["CEO", "intern", "Astronaut"]), "age": "41"}
    odd["fields"].update(rng.sample(sorted(extra.items()), k=rng.randint(1, len(extra))))
    for key in rng.sample(["created_ts", "first_ts", "last_touch_ts", "stage"], k=rng.randint(0, 4)):
        odd[key] = None
    return odd


def _bits(x):
    return [(k, float.hex(v)) for k, v in x.items()]


def test_model_inputs_equal_the_vectorized_features_key_for_key_and_bit_for_bit():
    """The model's sums run in the inputs' order: model_inputs must give vectorize's keys in its order."""
    from models.features import features
    from models.fields import Encoder
    from models.learner import model_inputs, vectorize_labelled
    from models.rules import DEFAULT_CONFIG, load_rules

    rules = load_rules(DEFAULT_CONFIG.read_text())
    rng = random.Random(4)
    encoder, rates, checked = Encoder(rules.fields), StageRates(), 0
    for kind, item in _lead_states(seed=11):
        if kind == "training":  # the vocabularies and rates move as deals close (the memo must follow)
            encoder.learn(item["snapshots"][-1]["features"])
            rates.update([s["stage"] for s in item["snapshots"] if s["stage"]], item["won"])
            continue
        for state in (item, _odd_variant(item, rng)):
            now = (state["last_ts"] or 0) + rng.choice([0, -5_000, 86_400_000 * rng.randint(1, 90)])
            expected = vectorize_labelled(features(state, now, half_life_s=rules.half_life_s, fields=rules.fields),
                                          rates, encoder)
            for _ in range(2):  # computed, then remembered
                got = model_inputs(state, now, half_life_s=rules.half_life_s, fields=rules.fields,
                                   stage_rates=rates, encoder=encoder)
                assert _bits(got[0]) == _bits(expected[0]) and got[1] == expected[1]
                checked += 1
    assert checked > 2000 and encoder.vocab, (checked, encoder.vocab)


def test_an_encoders_memos_stay_out_of_its_checkpoint():
    from models.features import new_state
    from models.fields import ENCODER_MEMOS, Encoder
    from models.learner import model_inputs

    encoder = Encoder()
    state = new_state("l1") | {"first_ts": 0, "fields": {"city": "Berlin", "industry": "retail"}}
    expected = model_inputs(state, 0, half_life_s=60, fields=None, encoder=encoder)
    assert set(ENCODER_MEMOS) <= set(encoder.__dict__)  # both were filled
    clone = pickle.loads(pickle.dumps(encoder))
    assert not set(ENCODER_MEMOS) & set(clone.__dict__)
    assert model_inputs(state, 0, half_life_s=60, fields=None, encoder=clone) == expected
