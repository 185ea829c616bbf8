"""The field policy: private fields never reach snapshots, training messages or checkpoints; the model is bounded."""

from __future__ import annotations

import pickle
import random
import time

import orjson
import pytest

from models.events import STAGES, Event
from models.fields import Encoder, FieldPolicy, TopValues, parse_policy, public
from models.learner import Trainer, vectorize
from models.rules import DEFAULT_CONFIG, ConfigError, load_rules
from models.scoring import Scorer, step

# bytes: the pickled trainer (the model, metrics, vocabularies, and since issue 11 the per-stage models: ~100 KiB;
# since logreg learns with AdaGrad, one squared-gradient sum per weight: 363-377 KiB from 10,000 to 100,000 deals)
CHECKPOINT_BOUND = 448 * 1024
# bytes: five learners (the Hoeffding tree capped at 2 MiB by River's own estimate), their figures, per-stage models
TOURNAMENT_CHECKPOINT_BOUND = 3 * 1024 * 1024
RULES = load_rules(DEFAULT_CONFIG.read_text())


def identity(i: int) -> dict[str, str]:
    """A lead's personal data: every value unique to the lead."""
    return {"email": f"person{i}@lead-mail.example", "name": f"Givenname{i} Familyname{i}",
            "company": f"Companyname {i} GmbH", "work_phone": f"+49-170-{i:07d}", "referral_code": f"refcode-{i}"}


def snapshot(i: int, rng: random.Random, won: bool) -> dict:
    """A small synthetic snapshot, as if a scorer had built it without applying the policy (the worst case)."""
    stage = rng.choice(STAGES)
    f = {f"f_{k}": v for k, v in identity(i).items()}
    f |= {"f_industry": rng.choice(["software", "retail", "manufacturing"]), "f_age": float(rng.randint(20, 64)),
          "f_city": f"city{rng.randint(0, 5000)}", "f_newsletter": rng.choice(["true", "false"]),
          "n_visit": float(rng.randint(0, 9) + 3 * won), "d_visit": rng.random() * 5, "stage": stage,
          "created_month": str(rng.randint(1, 12)), "events_total": 5.0}
    return {"features": f, "rules_score": 0.5, "stage": stage}


# The single online learner over 100,000 deals; the tournament (five learners, each with overall and
# per-stage figures, the per-stage models, the recent window the champion is chosen on) over 10,000, as it
# costs ~3 ms per deal: its size must not grow between 5,000 and 10,000 deals either.
@pytest.mark.parametrize(("kind", "deals", "bound"), [("logreg", 100_000, CHECKPOINT_BOUND),
                                                      ("tournament", 10_000, TOURNAMENT_CHECKPOINT_BOUND)])
def test_100k_deals_with_unique_identities_keep_the_checkpoint_bounded_and_free_of_them(kind, deals, bound):
    trainer = Trainer(min_outcomes=20, kind=kind, encoder=Encoder(RULES.fields))
    rng = random.Random(7)
    sizes = {}
    started = time.perf_counter()
    checkpoints = (deals // 2, deals) if kind == "tournament" else (deals // 10, deals)
    for i in range(deals):
        won = rng.random() < 0.4
        trainer.learn([snapshot(i, rng, won)], won)
        if i + 1 in checkpoints:
            sizes[i + 1] = len(pickle.dumps(trainer))
    took = time.perf_counter() - started
    blobs = {"trainer": pickle.dumps(trainer), "serving": pickle.dumps(trainer.serving()),
             "report": orjson.dumps(trainer.report())}
    first, last = checkpoints
    print(f"\n{kind}: {deals:,} deals learned in {took:.1f} s; trainer checkpoint {sizes[first] / 1024:.1f} KiB after "
          f"{first:,}, {sizes[last] / 1024:.1f} KiB after {last:,}; serving {len(blobs['serving']) / 1024:.1f} KiB")
    assert sizes[last] < bound and len(blobs["serving"]) < bound
    assert sizes[last] < sizes[first] * 1.25  # no growth with the number of leads
    for name, blob in blobs.items():
        for marker in (b"lead-mail", b"Givenname", b"Familyname", b"Companyname", b"GmbH", b"+49-170", b"refcode",
                       b"givenname", b"companyname"):
            assert marker not in blob, f"{marker!r} in the {name}"
        for i in random.Random(1).sample(range(deals), 200):
            assert not any(v.encode() in blob for v in identity(i).values()), (name, i)
    assert trainer.n_won + trainer.n_lost == deals and trainer.champion_metrics.auc() > 0.6


def test_the_feature_space_is_bounded_whatever_the_fields():
    enc = Encoder(FieldPolicy(hash_buckets=64))
    keys: set[str] = set()
    for i in range(5_000):
        f = {f"f_field{i % 300}": f"value{i}", f"f_num{i % 300}": float(i), "stage": "new", f"weird{i}": f"x{i}"}
        keys |= set(vectorize(f, encoder=enc))
    assert len(keys) <= 2 * 64 + 1  # one-hot buckets + numeric buckets + stage=new


def test_private_fields_never_reach_snapshots_or_the_training_message():
    scorer = Scorer(RULES)
    fields = identity(1) | {"city": "Berlin", "industry": "software", "notes": "met Maria at the fair",
                            "contact": "maria.schmidt@example.com", "do_not_email": True}
    events = [Event("e1", "l1", "lead_created", 1_000, {"fields": fields}),
              Event("e2", "l1", "stage_changed", 2_000, {"stage": "proposal"}),
              Event("e3", "l1", "deal_won", 3_000, {})]
    state, snaps = None, []
    for e in events:
        r = step(state, e, scorer, scored_at_ms=0, stage_snapshots=snaps)
        state = r.state
        if r.stage_snapshot:
            snaps.append(r.snapshot)
    training = orjson.dumps(r.training)
    private = [v for k, v in identity(1).items() if k != "referral_code"] + ["met Maria", "maria.schmidt"]
    for value in private:
        assert value.encode() not in training
    # Not private: kept as features (an undeclared string is hashed by the model, not in the message).
    assert b"berlin" in training and b"do_not_email" in training and b"refcode-1" in training
    assert state["fields"]["email"] == identity(1)["email"]  # kept in the lead's state for people


def test_declared_kinds_encode_as_declared():
    policy = parse_policy({"declared": {"size": "numeric", "vip": "boolean", "email": "categorical",
                                        "tier": {"kind": "categorical", "values": ["gold"]},
                                        "plan": {"kind": "categorical", "top": 1, "min_count": 2}}})
    enc = Encoder(policy)
    x, _ = enc.encode({"f_size": "12", "f_vip": "yes", "f_email": "x@y.z", "f_tier": "Silver", "f_plan": "pro"})
    assert x == {"f_size": 12.0, "f_vip=true": 1.0, "f_email=other": 1.0, "f_tier=other": 1.0, "f_plan=other": 1.0}
    for plan in ["pro", "pro", "basic"]:
        enc.learn({"f_plan": plan})
    assert enc.encode({"f_plan": "pro"})[0] == {"f_plan=pro": 1.0}
    assert enc.encode({"f_plan": "basic"})[0] == {"f_plan=other": 1.0}


def test_top_values_stay_bounded_and_keep_the_frequent_ones():
    t = TopValues(capacity=64)
    rng = random.Random(3)
    for i in range(20_000):
        t.add("frequent" if i % 3 == 0 else f"once{i}" if rng.random() < 0.5 else rng.choice("abc"))
    assert len(t.counts) == 64 and t.top(4, 2)[:1] == ["frequent"]


def test_default_private_names_and_public():
    p = FieldPolicy()
    assert all(p.is_private(n) for n in ("email", "E-Mail", "first_name", "Phone", "company", "billing_address"))
    assert not any(p.is_private(n) for n in ("company_size", "country", "do_not_email", "has_phone", "industry"))
    assert public({"f_email": "a", "f_country": "de", "n_visit": 1.0}, p) == {"f_country": "de", "n_visit": 1.0}
    assert p.with_private(["country"]).is_private("country")


@pytest.mark.parametrize("cfg, message", [
    ({"declared": {"age": "number"}}, "[fields.declared].age = 'number': expected one of categorical"),
    ({"hash_buckets": 3}, "[fields].hash_buckets = 3: expected a whole number in 16..65536"),
    ({"private": "email"}, "[fields].private = 'email': expected a list of field names"),
    ({"declared": {"x": {"kind": "numeric", "top": 3}}}, "[fields.declared].x: values, top and min_count"),
    ({"declared": {"x": {"kind": "categorical", "top": 0}}}, "[fields.declared].x.top = 0: expected a whole number"),
    ({"buckets": 5}, "[fields].buckets: unknown key"),
])
def test_bad_policy_fails_with_the_key_and_the_expected_form(cfg, message):
    text = DEFAULT_CONFIG.read_text().split("[fields]")[0] + "\n" + _toml_fields(cfg)
    with pytest.raises(ConfigError, match=None) as err:
        load_rules(text)
    assert message in str(err.value)


def test_points_for_a_private_field_are_refused():
    text = DEFAULT_CONFIG.read_text() + '\n[explicit.email]\n"*" = 5\n'
    with pytest.raises(ConfigError, match=r"\[explicit.email\]: field 'email' is private"):
        load_rules(text)


def _toml_fields(cfg: dict) -> str:
    lines = ["[fields]"]
    for k, v in cfg.items():
        if k != "declared":
            lines.append(f"{k} = {orjson.dumps(v).decode()}")
    if "declared" in cfg:
        lines.append("[fields.declared]")
        for k, v in cfg["declared"].items():
            if isinstance(v, dict):
                inner = ", ".join(f"{a} = {orjson.dumps(b).decode()}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {orjson.dumps(v).decode()}")
    return "\n".join(lines) + "\n"
