"""The serving hot spots, in Cython's pure-Python mode: plain Python here, C where compiled.

Every scored event walks its ~45 model inputs a few times: the stack's members in one pass
(:func:`fused_pass`), the inputs from the features (:func:`encode_inputs`), the reasons' top 5
(:func:`largest`), the dynamic features (:func:`dynamic_features`, :func:`decay_all`); and every
message rounds figures (:func:`round_digits`) and writes a time (:func:`utc_second`). As plain
Python each key costs about a microsecond of bytecode; compiled, the same lines run as C on the same
doubles, in the same order: the same bits (``tests/test_kernels.py`` runs both forms on the same
inputs; pytest's doctests run the plain form). ``make install`` compiles this file into
``models/_kernels_native`` (``deploy/build_native.py``); :data:`IMPL` is the compiled module when
it was built from this very source, else this module itself.
"""
from __future__ import annotations

import hashlib
import math as pymath
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import cython
from cython.cimports.libc import math as cmath  # C's log1p and isfinite where compiled, Python's math here

# Flags of a fused table entry: which members know the key.
LINEAR, WEIGHT, BINS, COLUMN = 1, 2, 4, 8


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(total=cython.double, gam=cython.double, vd=cython.double, c=cython.double, t=cython.double,
               a=cython.double, b=cython.double, w=cython.double, pu=cython.double, flags=cython.int,
               column=cython.Py_ssize_t, bin_=cython.long, e=tuple, bins=dict, top_=cython.Py_ssize_t,
               n=cython.Py_ssize_t, nan=cython.bint, kept=list)
def fused_pass(table: dict, x: dict, per_unit: float, contrib: list, row: list | None, top: int = 0) -> tuple:
    """Walk ``x`` once through a fused table (key -> ``(flags, a, b, weight, bins, column, code)``).

    Appends each nonzero linear contribution ``(key, a * value + b)`` to ``contrib`` and fills the
    trees' ``row`` (the value, or the category's code); returns the sum of the contributions and
    gam's sum of weights, each added in the order of ``x`` (as ``sum`` and ``+=`` would).

    With ``top`` (1 to 16), ``contrib`` gets only what :func:`largest` would keep of them, in its
    order (the reasons need no more: ~40 pairs not made per event), unless one is NaN: then all of
    them, as without ``top`` (:func:`largest` answers with the sort then).

    >>> table = {"src=ad": (LINEAR | WEIGHT, 0.5, 0.0, 0.25, None, -1, None),
    ...          "n": (LINEAR | BINS | COLUMN, 2.0, -1.0, 0.0, {2: 0.125, 1001: 0.5}, 0, None)}
    >>> contrib, row = [], [0.0]
    >>> fused_pass(table, {"src=ad": 1.0, "n": 1.0, "new": 3.0}, 2.0, contrib, row), contrib, row
    ((1.5, 0.375), [('src=ad', 0.5), ('n', 1.0)], [1.0])
    >>> contrib = []
    >>> fused_pass(table, {"src=ad": 1.0, "n": 1.0}, 2.0, contrib, [0.0], top=1), contrib
    ((1.5, 0.375), [('n', 1.0)])
    """
    total = 0.0
    gam = 0.0
    pu = per_unit
    top_ = top if 0 < top <= 16 else 0
    sizes = cython.declare(cython.double[16])  # with top: the kept contributions' sizes (see largest)
    kept = []
    n = 0
    nan = False
    for k, v in x.items():
        e = table.get(k)
        if e is None:
            continue
        vd = v  # a number, as a double (an int converts exactly as Python's float * int does)
        flags = e[0]  # the flags as literals below: C constants where compiled
        if flags & 1:  # LINEAR
            a = e[1]
            b = e[2]
            c = a * vd + b
            if c != 0.0:  # NaN counts, as a truthy float does
                if top_ == 0:
                    contrib.append((k, c))
                elif c != c:
                    nan = True
                elif not nan:
                    n = _keep(kept, sizes, n, top_, k, c, None)
                total += c
        if flags & 2:  # WEIGHT
            w = e[3]
            gam += w
        elif flags & 4:  # BINS: the bin as models.tournament._bin gives it
            t = pu * vd if vd < 50 else pu * cmath.log1p(vd)
            if not cmath.isfinite(t):
                int(t)  # raises as _bin does (NaN, infinity)
            if cython.compiled:
                bin_ = cython.cast(cython.long, t)  # truncates toward zero, as int() does
            else:
                bin_ = int(t)
            if not vd < 50:
                bin_ += 1000
            bins = e[4]
            hit = bins.get(bin_)
            if hit is not None:
                w = hit
                gam += w
        if flags & 8:  # COLUMN
            column = e[5]
            code = e[6]
            row[column] = v if code is None else code  # type: ignore[index]
    if nan:  # every contribution, as without top: the reasons are the sort's then
        for k, v in x.items():
            e = table.get(k)
            if e is not None and e[0] & 1:
                vd = v
                a = e[1]
                b = e[2]
                c = a * vd + b
                if c != 0.0:
                    contrib.append((k, c))
    else:
        contrib.extend(kept)
    return total, gam


@cython.cfunc
@cython.inline
@cython.locals(vd=cython.double)
def _put(out: dict, name: object, value: object, log: cython.bint, inputs: cython.bint) -> None:
    """``out[name] = value`` as a feature, or as :func:`encode_inputs` makes it a model input."""
    if not inputs:
        out[name] = value
    elif log:
        vd = value
        out[name] = cmath.log1p(vd) if vd > 0.0 else 0.0
    else:
        out[name] = value if value.__class__ is float else float(value)


@cython.locals(counts=dict, decayed=dict, statuses=dict, names=tuple, inputs=cython.bint)
def dynamic_features(f: dict, state: dict, now_ms: object, half_life_s: object, count_keys: dict,
                     stage_index: dict, stage_keys: dict | None = None) -> None:
    """The dynamic features of :func:`models.features.features` (after the explicit ones), into ``f``:
    counts and decayed counts as of ``now_ms`` (``count_keys``: each event type's two feature names),
    pages, sessions, recency, stage, activities.

    With ``stage_keys`` (each stage's one-hot key), they go into ``f`` as the model's inputs instead,
    as :func:`encode_inputs` would turn them (:func:`models.learner.model_inputs`): counts, durations
    and times log-scaled, the stage one-hot; same keys, same order, same values.

    The arithmetic on Python objects, as the plain form does (timestamps are Python ints):
    compiled, the bytecode is gone, not a single operation changes.

    >>> s = {"counts": {"visit": 2}, "decayed": {"visit": 1.5}, "decay_ref_ts": 0, "pages": [1], "sessions": [],
    ...      "visit_duration_s": 30.0, "last_touch_ts": 0, "stage": None, "stages_visited": [], "activities": {}}
    >>> f = {}
    >>> dynamic_features(f, s, 3_600_000, 3600.0, {}, {})
    >>> f["d_visit"], f["sessions"], f["recency_s"]
    (0.75, 2.0, 3600.0)
    >>> x = {}
    >>> dynamic_features(x, s, 3_600_000, 3600.0, {"visit": ("n_visit", "d_visit")}, {}, {})
    >>> x["d_visit"] == pymath.log1p(0.75), x["stages_visited"]
    (True, 0.0)
    """
    inputs = stage_keys is not None
    counts, decayed = state["counts"], state["decayed"]
    _put(f, "events_total", float(sum(counts.values())), True, inputs)
    factor = 1.0
    ref = state["decay_ref_ts"]
    if ref is not None and now_ms > ref:
        factor = 0.5 ** ((now_ms - ref) / 1000 / half_life_s)
    for event_type, n in counts.items():
        names = count_keys.get(event_type)
        if names is None:  # not a type of the contract (a state written by another version)
            names = ("n_" + event_type, "d_" + event_type)
        _put(f, names[0], float(n), True, inputs)
        _put(f, names[1], decayed.get(event_type, 0.0) * factor, True, inputs)
    _put(f, "distinct_pages", float(len(state["pages"])), True, inputs)
    visits = counts.get("visit", 0)
    _put(f, "sessions", float(max(len(state["sessions"]), visits)), True, inputs)
    _put(f, "visit_duration_s", float(state["visit_duration_s"]), True, inputs)
    if state.get("visit_pages"):
        _put(f, "pages_per_visit", state["visit_pages"] / max(1, visits), False, inputs)
    opens, replies = counts.get("email_open", 0), counts.get("email_replied", 0)
    if opens or replies:
        _put(f, "email_reply_rate", replies / max(opens, replies), False, inputs)
    if state["last_touch_ts"] is not None:
        recency = (now_ms - state["last_touch_ts"]) / 1000
        _put(f, "recency_s", recency if recency > 0.0 else 0.0, True, inputs)
    if state["stage"] is not None:
        if inputs:
            f[stage_keys[state["stage"]]] = 1.0
        else:
            f["stage"] = state["stage"]
        _put(f, "stage_index", float(stage_index[state["stage"]]), False, inputs)
        in_stage = (now_ms - state["stage_ts"]) / 1000
        _put(f, "time_in_stage_s", in_stage if in_stage > 0.0 else 0.0, True, inputs)
    _put(f, "stages_visited", float(len(state["stages_visited"])), False, inputs)
    statuses = {"open": 0, "completed": 0, "overdue": 0}
    for activity in state["activities"].values():
        statuses[activity[0]] += 1
    _put(f, "activities_open", float(statuses["open"]), False, inputs)
    _put(f, "activities_completed", float(statuses["completed"]), False, inputs)
    _put(f, "activities_overdue", float(statuses["overdue"]), False, inputs)


@cython.locals(vd=cython.double, encoded=tuple)
def encode_inputs(f: dict, x: dict, labels: dict, kinds: dict, kind_of: Any, memo: dict | None, encoder: Any,
                  field: object, log: object) -> None:
    """The loop of :func:`models.learner.vectorize_labelled`: each feature of ``f`` into ``x``.

    ``kinds`` maps a feature's name to its kind (``kind_of(name)`` decides a new one): ``field``
    (an explicit field: the ``encoder``, through its ``memo`` of string encodings), ``log``
    (a number, log-scaled) or another (a number as it is); strings go through the encoder.

    >>> x, labels = {}, {}
    >>> class Encoder:
    ...     def encode_category(self, x, labels, k, v): x[f"{k}={v}"] = 1.0
    >>> encode_inputs({"n": 3.0, "i": 2, "stage": "new"}, x, labels, {"n": "log"}, lambda k: "plain", None,
    ...               Encoder(), "field", "log")
    >>> x
    {'n': 1.3862943611198906, 'i': 2.0, 'stage=new': 1.0}
    """
    for k, v in f.items():
        kind = kinds.get(k)
        if kind is None:
            kind = kind_of(k)
        if kind is field:
            encoded = memo.get((k, v)) if memo is not None and v.__class__ is str else None
            if encoded is None:
                encoder.encode_field(x, labels, k, v)
            else:  # what encode_field would add, without the call
                x.update(encoded[0])
                if encoded[1]:
                    labels.update(encoded[1])
        elif v.__class__ is float:  # the common case first: float(v) is v itself
            if kind is log:
                vd = v
                x[k] = cmath.log1p(vd) if vd > 0.0 else 0.0
            else:
                x[k] = v
        elif not isinstance(v, str):
            x[k] = (pymath.log1p(v) if v > 0.0 else 0.0) if kind is log else float(v)
        else:
            encoder.encode_category(x, labels, k, v)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(top=cython.Py_ssize_t, n=cython.Py_ssize_t, c=cython.double, kept=list, kc=tuple)
def largest(contrib: list, top: int) -> list:
    """``sorted(contrib, key=lambda kc: (-abs(kc[1]), kc[0]))[:top]`` in one pass: the ``top``
    pairs (tuples) with the largest values in size, ties by key (keys are unique: ``x``'s).

    The kept pairs' sizes are in a C array (compiled): most pairs are refused by one comparison of
    doubles, and a kept one moves the few sizes below it (at most 16 kept; more: the sort).

    >>> pairs = [(f"k{i}", (-1) ** i * (i % 7) / 3) for i in range(40)]
    >>> largest(pairs, 5) == sorted(pairs, key=lambda kc: (-abs(kc[1]), kc[0]))[:5]
    True
    """
    if top <= 0 or top > 16:
        return sorted(contrib, key=_by_size)[:top]
    sizes = cython.declare(cython.double[16])  # sizes[i]: the size of kept[i]
    kept = []  # the best so far, best first
    n = 0
    for kc in contrib:
        c = kc[1]
        if c != c:  # NaN: no order to keep; the sort's answer
            return sorted(contrib, key=_by_size)[:top]
        n = _keep(kept, sizes, n, top, kc[0], c, kc)
    return kept


@cython.cfunc
@cython.inline
@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(size=cython.double, j=cython.Py_ssize_t, i=cython.Py_ssize_t)
def _keep(kept: list, sizes: cython.p_double, n: cython.Py_ssize_t, top: cython.Py_ssize_t, key: object,
          c: cython.double, pair: object) -> cython.Py_ssize_t:
    """The pair ``(key, c)`` (``pair``, else a new one) put in its place among the ``n`` kept (the
    largest in size first, ties by key; ``sizes`` theirs), if it is among the ``top``; the new n."""
    size = cmath.fabs(c)
    if n == top and (size < sizes[n - 1] or (size == sizes[n - 1] and key > kept[n - 1][0])):
        return n
    j = n - 1 if n == top else n  # where it goes, moved up past every smaller one
    while j > 0 and (size > sizes[j - 1] or (size == sizes[j - 1] and key < kept[j - 1][0])):
        j -= 1
    if n == top:
        kept.pop()
    else:
        n += 1
    i = n - 1
    while i > j:  # the sizes below j move down one place
        sizes[i] = sizes[i - 1]
        i -= 1
    sizes[j] = size
    kept.insert(j, pair if pair is not None else (key, c))
    return n


@cython.ccall
def sigmoid(z: cython.double) -> cython.double:
    """``1 / (1 + exp(-z))``, ``z`` kept within [-700, 700] first (no overflow; a NaN stays NaN).

    >>> sigmoid(0.0), sigmoid(-1e6) == 1 / (1 + pymath.exp(700.0))
    (0.5, True)
    """
    if z < -700.0:
        z = -700.0
    if z > 700.0:
        z = 700.0
    return 1.0 / (1.0 + cmath.exp(-z))


@cython.locals(kept=list, out=list)
def reasons(contrib: list, labels: dict, top: int) -> list:
    """The ``top`` largest contributions as the score message's reasons: each one's readable name
    (``labels``, else its key) and its value rounded to 4 decimals, the largest first.

    >>> reasons([("h=1f", -0.25), ("n_click", 1.123456), ("age_days", 0.5)], {"h=1f": "f_city=berlin"}, 2)
    [{'feature': 'n_click', 'contribution': 1.1235}, {'feature': 'age_days', 'contribution': 0.5}]
    """
    kept = largest(contrib, top)
    out = []
    for kc in kept:
        out.append({"feature": labels.get(kc[0], kc[0]), "contribution": round_digits(kc[1], 4)})
    return out


@cython.locals(total=cython.double, w=cython.double, p=cython.double, pair=tuple)
def stack_total(weights: tuple, base_p: dict) -> float:
    """The stack's weighted log-odds of its members: ``w * logit(p)`` for each ``(member, w)`` of
    ``weights`` whose P(won) is in ``base_p``, added in that order from 0.0, ``p`` kept within
    [1e-4, 1 - 1e-4] first (as :func:`models.tournament._logit`).

    >>> logit = lambda p: pymath.log(p / (1 - p))
    >>> stack_total((("a", 0.5), ("b", 2.0), ("c", 1.0)), {"a": 0.9, "b": 1.0}) == 0.5 * logit(0.9) + 2.0 * logit(1 - 1e-4)
    True
    """
    total = 0.0
    for pair in weights:
        hit = base_p.get(pair[0])
        if hit is not None:
            w = pair[1]
            p = hit
            if p < 1e-4:  # max(p, 1e-4) then min(., 1 - 1e-4): a NaN stays NaN, as there
                p = 1e-4
            if p > 1 - 1e-4:
                p = 1 - 1e-4
            total += w * cmath.log(p / (1 - p))
    return total


@cython.ccall
@cython.locals(ax=cython.double, scale=cython.double, y=cython.double, whole=cython.double, frac=cython.double)
def round_digits(x: cython.double, digits: cython.int) -> cython.double:
    """``round(x, digits)`` (0 <= digits <= 15), the same double, without its decimal string.

    Python rounds the exact decimal value of ``x`` half to even, then reads that decimal back. The
    product ``|x| * 10 ** digits`` is rounded to the nearest double, which is monotonic, and below
    2 ** 50 every half (``k + 0.5``) is a double: the product lands on the same side of each half as
    the exact value, or on the half itself. So its nearest whole number is Python's rounding, and
    dividing that by the exact power of ten reads it back. On a half (a tie, or rounded onto one),
    for NaN, infinities and big values: Python's own. As plain Python this is the builtin ``round``;
    ``tests/test_kernels.py`` compares the compiled form with it.
    """
    if not cython.compiled or digits < 0 or digits > 15 or not cmath.isfinite(x):
        return round(x, digits)
    ax = cmath.fabs(x)
    scale = 1.0
    for _ in range(digits):  # 10 ** digits, exact
        scale *= 10.0
    y = ax * scale
    if y >= 2.0 ** 50:
        return round(x, digits)
    whole = cmath.floor(y)
    frac = y - whole  # exact: whole >= y / 2 or whole == 0
    if frac == 0.5:
        return round(x, digits)
    if frac > 0.5:
        whole += 1.0
    return cmath.copysign(whole / scale, x)


@cython.locals(decayed=dict, factor=cython.double)
def decay_all(decayed: dict, factor: float) -> None:
    """Every decayed count times ``factor``, rounded to 5 decimals (``models.features._fold_decay``).

    >>> d = {"visit": 2.0, "click": 0.3}
    >>> decay_all(d, 0.5); d
    {'visit': 1.0, 'click': 0.15}
    """
    for k in decayed:
        decayed[k] = round_digits(cython.cast(cython.double, decayed[k]) * factor, 5)


@cython.locals(secs=cython.longlong, days=cython.longlong, rest=cython.longlong, z=cython.longlong,
               era=cython.longlong, doe=cython.longlong, yoe=cython.longlong, doy=cython.longlong,
               mp=cython.longlong, year=cython.longlong, month=cython.longlong, day=cython.longlong)
def utc_second(seconds: int) -> str:
    """``time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))`` for 1970 to 9999 (the event
    times :func:`models.events.check_ts` lets in), by the civil calendar's arithmetic (H. Hinnant's
    ``civil_from_days``) instead of a C library call and a format string.

    >>> utc_second(0), utc_second(951_782_400), utc_second(253_402_300_799)
    ('1970-01-01T00:00:00', '2000-02-29T00:00:00', '9999-12-31T23:59:59')
    """
    if not cython.compiled or not 0 <= seconds < 253_402_300_800:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    secs = seconds
    days = secs // 86_400
    rest = secs - days * 86_400
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d}T{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(s=cython.double, v=cython.double, t=cython.double, node=cython.Py_ssize_t, r=cython.Py_ssize_t,
               go_left=cython.bint)
def walk_trees(baseline: cython.double, feature: cython.longlong[::1], threshold: cython.double[::1],
               missing_left: cython.uchar[::1], left: cython.longlong[::1], right: cython.longlong[::1],
               leaf: cython.uchar[::1], value: cython.double[::1], roots: cython.longlong[::1], row: list) -> cython.double:
    """The trees' log-odds for ``row`` (a list of floats in the fitted column layout; last, so that a
    ``functools.partial`` binds the rest), walking the flat
    node arrays of :class:`models.tournament.FlatTrees`: ``row[feature] <= threshold`` goes left, and
    where missing values go left, ``not (v > threshold)`` (NaN fails every comparison); the leaves
    added to ``baseline`` tree by tree, as the generated code of ``FlatTrees.compiled`` adds them.

    >>> import numpy as np
    >>> arrays = (np.array(a, dtype=t) for a, t in (([0, 0, 0], np.int64), ([1.5, 0, 0], float),
    ...           ([1, 0, 0], np.uint8), ([1, 1, 2], np.int64), ([2, 1, 2], np.int64), ([0, 1, 1], np.uint8),
    ...           ([0.0, -1.0, 2.0], float), ([0], np.int64)))
    >>> fl, th, ml, le, ri, lf, va, ro = arrays
    >>> [walk_trees(0.5, fl, th, ml, le, ri, lf, va, ro, [v]) for v in (1.0, 2.0, float("nan"))]
    [-0.5, 2.5, -0.5]
    """
    s = baseline
    for r in range(roots.shape[0]):
        node = roots[r]
        while not leaf[node]:
            v = row[feature[node]]
            t = threshold[node]
            if missing_left[node]:
                go_left = not (v > t)
            else:
                go_left = v <= t
            node = left[node] if go_left else right[node]
        s += value[node]
    return float(s)  # a Python float in the plain form too (not numpy's)


def _by_size(kc: tuple) -> tuple:
    return -abs(kc[1]), kc[0]


def source_digest(path: str | Path) -> str:
    """The digest a compiled module records of the source it was built from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _native() -> ModuleType | None:
    """The compiled module, if it was built from this very file (a stale build is not used)."""
    try:
        from models import _kernels_native as native  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(native, "SOURCE_DIGEST", None) != source_digest(__file__):
        return None
    return native


IMPL: Any = None if cython.compiled else (_native() or sys.modules[__name__])
