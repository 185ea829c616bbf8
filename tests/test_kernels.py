"""models/kernels.py as plain Python and compiled (deploy/build_native.py): the same answers, to the bit."""

from __future__ import annotations

import math
import random
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from models import kernels
from models.learner import _FIELD, _KINDS, _LOG, _kind, model_inputs, vectorize_labelled
from models.fields import Encoder
from models.tournament import _bin

NATIVE = kernels._native()
IMPLS = [kernels] + ([NATIVE] if NATIVE is not None else [])


def test_the_compiled_kernels_are_built_from_this_source_and_served() -> None:
    if shutil.which("cc") is None or not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("no C compiler or Python headers here: the kernels run as plain Python (install.sh says so)")
    assert NATIVE is not None, "deploy/build_native.py has not built models/kernels.py (make install does)"
    assert kernels.IMPL is NATIVE
    assert NATIVE.SOURCE_DIGEST == kernels.source_digest(kernels.__file__)


def test_a_build_of_another_source_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "source_digest", lambda path: "edited-since")
    assert kernels._native() is None


def _fused_case(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any], float, int]:
    """A random fused table, model inputs hitting some of its keys, per_unit and the row's length."""
    table: dict[str, Any] = {}
    columns = 6
    for i in range(rng.randint(0, 30)):
        key = f"k{i}" if i % 4 else f"c{i}=v"
        flags, a, b, w, bins, column, code = 0, 0.0, 0.0, 0.0, None, -1, None
        if rng.random() < 0.8:
            flags |= kernels.LINEAR
            a, b = rng.gauss(0, 1), rng.choice([0.0, rng.gauss(0, 1)])
        if "=" in key and rng.random() < 0.7:
            flags |= kernels.WEIGHT
            w = rng.gauss(0, 1)
        elif rng.random() < 0.7:
            flags |= kernels.BINS
            bins = {rng.randint(-4, 120): rng.gauss(0, 1) for _ in range(40)}
            bins |= {1000 + j: rng.gauss(0, 1) for j in range(20)}
        if rng.random() < 0.5:
            flags |= kernels.COLUMN
            column, code = rng.randrange(columns), rng.choice([None, rng.random()])
        table[key] = (flags, a, b, w, bins, column, code)
    x: dict[str, Any] = {}
    for key in rng.sample(sorted(table) + ["unknown", "n=other"], k=min(len(table) + 2, rng.randint(0, 25))):
        x[key] = rng.choice([1.0, rng.uniform(-3, 60), rng.expovariate(0.01), float(rng.randint(0, 9)),
                             rng.randint(0, 70), 0.0, -0.0, 1e300])
    return table, x, rng.choice([2.0, 1.0, 0.5, 3.0]), columns


def _fused_reference(table: dict[str, Any], x: dict[str, Any], per_unit: float, row: list[Any]
                     ) -> tuple[tuple[float, float], list[tuple[str, float]], list[Any]]:
    """What the members compute apart: the linear sum of nonzero contributions, gam's sum, the row."""
    contrib = [(k, c) for k, v in x.items() if (e := table.get(k)) and e[0] & kernels.LINEAR and (c := e[1] * v + e[2])]
    gam = 0
    for k, v in x.items():
        e = table.get(k)
        if e and e[0] & kernels.WEIGHT:
            gam += e[3]
        elif e and e[0] & kernels.BINS:
            gam += e[4].get(_bin(v, per_unit), 0.0)
        if e and e[0] & kernels.COLUMN:
            row[e[5]] = v if e[6] is None else e[6]
    return (sum(c for _, c in contrib), gam), contrib, row


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_fused_pass_adds_up_as_each_member_does(impl: ModuleType) -> None:
    rng = random.Random(5)
    for _ in range(3000):
        table, x, per_unit, columns = _fused_case(rng)
        contrib: list[tuple[str, float]] = []
        row: list[Any] = [0.5] * columns
        sums = impl.fused_pass(table, x, per_unit, contrib, row)
        expected_sums, expected_contrib, expected_row = _fused_reference(table, x, per_unit, [0.5] * columns)
        assert (sums, contrib, row) == (expected_sums, expected_contrib, expected_row)
        assert all(type(v) is type(e) for v, e in zip(row, expected_row))  # an int value stays an int


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_fused_pass_with_top_keeps_what_largest_would_and_the_same_sums(impl: ModuleType) -> None:
    rng = random.Random(6)
    nans = 0
    for _ in range(3000):
        table, x, per_unit, columns = _fused_case(rng)
        if rng.random() < 0.2:  # a NaN contribution (inf - inf), somewhere in x's order
            table = table | {"nan": (kernels.LINEAR, 1.0, -math.inf, 0.0, None, -1, None)}
            items = list(x.items())
            items.insert(rng.randint(0, len(items)), ("nan", math.inf))
            x = dict(items)
        top = rng.choice([1, 2, 5, 16])
        every: list[tuple[str, float]] = []
        sums = impl.fused_pass(table, x, per_unit, every, [0.5] * columns)
        kept: list[tuple[str, float]] = []
        row: list[Any] = [0.5] * columns
        # repr: a NaN is equal to nothing, its repr to another NaN's
        assert repr(impl.fused_pass(table, x, per_unit, kept, row, top)) == repr(sums)
        assert row == _fused_reference(table, x, per_unit, [0.5] * columns)[2]
        if any(c != c for _, c in every):  # a NaN: all of them, the reasons are the sort's
            nans += 1
            assert repr(kept) == repr(every)
        else:
            assert kept == impl.largest(every, top)
        assert repr(impl.reasons(kept, {}, top)) == repr(impl.reasons(every, {}, top))
    assert nans


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fused_pass_refuses_a_number_it_cannot_bin_as_the_learner_does(impl: ModuleType, bad: float) -> None:
    table = {"n": (kernels.BINS, 0.0, 0.0, 0.0, {1: 0.5}, -1, None)}
    with pytest.raises((ValueError, OverflowError)) as raised:
        impl.fused_pass(table, {"n": bad}, 2.0, [], None)
    with pytest.raises(raised.type, match=str(raised.value)):
        _bin(bad, 2.0)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_largest_is_the_sorted_head(impl: ModuleType) -> None:
    rng = random.Random(7)
    for _ in range(5000):
        sizes = [rng.randint(-3, 3) / 2, rng.gauss(0, 1), math.inf, -math.inf]
        pairs = [(f"k{rng.randint(0, 99)}_{i}", rng.choice(sizes)) for i in range(rng.randint(0, 30))]
        pairs = [kc for kc in pairs if kc[1]]
        top = rng.choice([-1, 0, 1, 2, 3, 5, 7, 16, 17])  # 16: the most kept in the C array; 17: the sort
        assert impl.largest(pairs, top) == sorted(pairs, key=lambda kc: (-abs(kc[1]), kc[0]))[:top]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_encode_inputs_gives_vectorize_its_inputs(impl: ModuleType) -> None:
    rng = random.Random(11)
    encoder = Encoder()
    for _ in range(500):
        f: dict[str, Any] = {"stage": rng.choice(["new", "qualified"]), "created_month": str(rng.randint(1, 12)),
                             "f_country": rng.choice(["de", "fr", "united states"]),
                             "f_age": float(rng.randint(18, 70)), "f_vip": rng.choice(["true", "false"]),
                             "f_size": rng.randint(1, 500)}
        for name in ("n_visit", "d_visit", "recency_s", "stage_index", "fields_known", "pages_per_visit"):
            f[name] = rng.choice([0.0, -1.0, rng.expovariate(0.1), float(rng.randint(0, 9)), rng.randint(0, 9),
                                  math.nan])
        got_x: dict[str, Any] = {}
        got_labels: dict[str, str] = {}
        impl.encode_inputs(f, got_x, got_labels, _KINDS, _kind, encoder.__dict__.get("_memo"), encoder, _FIELD, _LOG)
        expected_x, expected_labels = encoder.encode(f)
        expected_x = {k: (math.log1p(v) if v > 0.0 else 0.0) if _kind(k) is _LOG and not isinstance(v, str) else v
                      for k, v in expected_x.items()}
        assert list(got_x) == list(expected_x) and got_labels == expected_labels
        for k, v in got_x.items():  # NaN == NaN is false: compare the bits
            assert math.isnan(v) and math.isnan(expected_x[k]) or (v, type(v)) == (float(expected_x[k]), float)


@pytest.mark.skipif(NATIVE is None, reason="the compiled kernels are not built here")
def test_features_and_model_inputs_are_the_same_compiled_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every simulated lead after each of its events, at the event's time and a month later: the
    same features in the same order (the model adds them up in that order) and the same inputs,
    whether vectorized from the features or read off the state (``model_inputs``)."""
    import orjson

    from models.events import parse_event, topic_kind_of
    from models.features import features, fold, new_state
    from models.offline.simulate import simulate

    states: dict[str, Any] = {}
    encoder = Encoder()
    for e in simulate(60, seed=3):
        event = parse_event(e["lead_id"].encode(), orjson.dumps(e), topic_kind=topic_kind_of(e["type"]))
        state = states[event.lead_id] = fold(states.get(event.lead_id) or new_state(event.lead_id), event,
                                             half_life_s=7 * 86_400)
        for now_ms in (event.ts_ms, event.ts_ms + 30 * 86_400_000):
            seen = []
            for impl in (kernels, NATIVE):
                monkeypatch.setattr(kernels, "IMPL", impl)
                f = features(state, now_ms, half_life_s=7 * 86_400)
                x, labels = vectorize_labelled(f, encoder=encoder)
                direct = model_inputs(state, now_ms, half_life_s=7 * 86_400, fields=None, encoder=encoder)
                seen.append(([(k, v, type(v)) for k, v in f.items()], list(x.items()), labels))
                assert [(k, v.hex()) for k, v in direct[0].items()] == [(k, v.hex()) for k, v in x.items()]
            assert seen[0] == seen[1]


@pytest.mark.skipif(NATIVE is None, reason="the compiled kernels are not built here (plain Python uses round itself)")
def test_round_digits_gives_rounds_double_everywhere() -> None:
    """Random values, halves and near halves at every scale, signs, zeros, non-finite, big, odd digits."""
    rng = random.Random(13)
    specials = [0.0, -0.0, math.nan, math.inf, -math.inf, 2.675, 1.005, 0.125, 0.375, -2.5e-5, 5e-6, 1e300, 2.0 ** 52,
                0.49999999999999994, 123456789.123456789]
    values = specials + [rng.choice([rng.random(), rng.uniform(-1e6, 1e6), rng.random() * 1e-4,
                                     round(rng.uniform(-50, 50), rng.randint(0, 9)) + rng.choice([0, 5e-6, 5e-5, -5e-7]),
                                     (rng.randint(0, 10 ** 6) + 0.5) / 10 ** rng.randint(0, 9)])
                         for _ in range(200_000)]
    for x in values:
        for digits in (rng.randint(0, 9), 4, 5, 6, rng.choice([-1, 16, 20])):
            got, expected = NATIVE.round_digits(x, digits), round(x, digits)
            assert got == expected or (math.isnan(got) and math.isnan(expected)), (x, digits)
            assert math.copysign(1.0, got) == math.copysign(1.0, expected), (x, digits)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_decay_all_rounds_each_count_as_the_fold_did(impl: ModuleType) -> None:
    rng = random.Random(17)
    for _ in range(2000):
        decayed = {f"t{i}": rng.choice([1.0, round(rng.random() * 9, 5), 0.0]) for i in range(rng.randint(0, 12))}
        factor = 0.5 ** (rng.random() * rng.choice([0.001, 1.0, 30.0]))
        expected = {k: round(v * factor, 5) for k, v in decayed.items()}
        impl.decay_all(decayed, factor)
        assert list(decayed.items()) == list(expected.items())


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_utc_second_is_strftime_from_1970_to_9999(impl: ModuleType) -> None:
    import time

    rng = random.Random(19)
    edges = [0, 59, 60, 86_399, 86_400, 951_782_400, 951_868_800, 4_107_456_000, 4_107_542_400, 946_684_799,
             253_402_300_799, 253_402_300_800, -1, -86_401]  # leap days, 2100 (no leap day), the ends and beyond
    for seconds in edges + [rng.randrange(0, 253_402_300_800) for _ in range(100_000)]:
        assert impl.utc_second(seconds) == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), seconds


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_walk_trees_gives_the_generated_codes_log_odds_to_the_bit(impl: ModuleType, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """The served trees (walk_trees over the flat arrays) against FlatTrees.compiled's generated code, on
    a fit with missing values (NaN: each node's learned side), categories, unseen values, and rows
    far outside the thresholds. Plain Python serves the generated code; its walk_trees is checked too."""
    from types import SimpleNamespace

    import numpy as np

    from models.tournament import BatchHGB

    rng = np.random.default_rng(7)
    b = BatchHGB(every=800, window=800, min_rows=50)
    xs = []
    for _ in range(800):
        x = {"n": float(rng.integers(0, 9)), "t": float(rng.normal(0, 3)), f"src={rng.choice(list('abcd'))}": 1.0}
        if rng.random() < 0.3:
            del x["n"]
        xs.append(x)
        b.learn(x, bool(x.get("n", 4.0) + x["t"] + ("src=a" in x) * 2 + rng.normal() > 5))
    assert b.fits == 1
    generated = b.model.compiled()
    monkeypatch.setattr(kernels, "IMPL", impl)
    assert (b.model.walker() is generated) == (impl is kernels)
    monkeypatch.setattr(kernels, "IMPL", SimpleNamespace(walk_trees=impl.walk_trees))
    walk = b.model.walker()
    rows = [[float(v) for v in BatchHGB._row(x, b.columns, b.codes, b.template)] for x in xs]
    rows += [[float(rng.choice([np.nan, -1e300, 1e300, rng.normal(0, 50)])) for _ in rows[0]] for _ in range(500)]
    assert len({generated(row) for row in rows}) > 50  # many paths, not a few leaves
    assert [walk(row) for row in rows] == [generated(row) for row in rows]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_the_stacks_sigmoid_and_logits_are_the_plain_formulas_to_the_bit(impl: ModuleType) -> None:
    """The stack's members' log-odds and the sigmoids, as models.tournament wrote them before."""
    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    def sigmoid(z: float) -> float:
        z = min(max(z, -700.0), 700.0)
        return 1.0 / (1.0 + math.exp(-z))

    rng = random.Random(9)
    odd = [0, 1, 0.0, 1.0, 1e-5, 1 - 1e-5, 1e-4, 0.5, math.nan]
    for _ in range(3000):
        weights = tuple((f"m{i}", rng.gauss(0, 2)) for i in range(rng.randint(0, 5)))
        base = {name: rng.choice(odd + [rng.random()]) for name, _ in weights if rng.random() < 0.8}
        expected = 0.0
        for name, w in weights:
            if name in base:
                expected += w * logit(base[name])
        got = impl.stack_total(weights, base)
        assert got.hex() == expected.hex() or (math.isnan(got) and math.isnan(expected))
        z = rng.choice([rng.gauss(0, 5), rng.gauss(0, 1000), math.inf, -math.inf, 701.0, -700.5])
        assert impl.sigmoid(z).hex() == sigmoid(z).hex()
    assert math.isnan(impl.sigmoid(math.nan))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_reasons_are_the_largest_contributions_named_and_rounded(impl: ModuleType) -> None:
    rng = random.Random(8)
    for _ in range(2000):
        contrib = [(f"k{i}", rng.choice([rng.gauss(0, 1), 0.5, -0.5, 1e-9])) for i in range(rng.randint(0, 40))]
        labels = {k: f"f_{k}=x" for k, _ in contrib if rng.random() < 0.3}
        top = rng.randint(0, 6)
        expected = [{"feature": labels.get(k, k), "contribution": round(c, 4)}
                    for k, c in sorted(contrib, key=lambda kc: (-abs(kc[1]), kc[0]))[:top]]
        assert impl.reasons(contrib, labels, top) == expected
