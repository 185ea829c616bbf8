"""The pure step of two source trees in one process, passes alternated: a fair before/after on a shared machine.

    .venv/bin/python benchmarks/bench_step_ab.py BEFORE_TREE AFTER_TREE [passes] [--no-gc]

e.g. ``git worktree add --detach /tmp/step-before main`` then ``... /tmp/step-before .``. Each tree's
``models`` and ``streams`` are imported apart (the first tree's modules stay alive in its closures),
so both run in the same minutes and share the machine's load. The loop is the after tree's
``streams.bench.step_pass`` over 300 simulated leads (8,670 events in batches of 500), with the rules alone, with the model the
simulated outcomes trained (its champion) and with each other champion forced (``logreg``, ``gam``, ``batch_hgb``,
``naive_bayes``), as the previous rounds measured it. Every pass starts from the same empty store, so
a batch does the same work in every pass: each figure is the sum of each batch's best CPU time
(``time.process_time``) over ``passes``, per event (a burst of load spoils a batch of one pass, not
the figure); ``--no-gc`` leaves the garbage collector off (the code's own cost, without the collections
that the two trees' heaps make dearer than one worker's).
"""

from __future__ import annotations

import copy
import gc
import sys
from collections.abc import Callable
from typing import Any

import orjson
from trees import import_tree

Runner = Callable[[Any, Any], list[float]]


def load(tree: str) -> tuple[dict[str, Any], Runner, Any]:
    """Import ``tree``'s modules afresh; its step cases (name -> serving model) and a timed pass."""
    modules = import_tree(tree, ("models.events", "models.features", "models.rules", "models.scoring",
                                 "models.offline.simulate", "streams.bench"),
                          fallbacks={"models.offline.simulate": "models.simulate"})  # models/offline/ since the ninth round
    mods = {n.rsplit(".", 1)[-1]: m for n, m in modules.items() if n.startswith("models.")}
    bench = modules["streams.bench"]
    rules_text = mods["rules"].DEFAULT_CONFIG.read_text()
    events = mods["simulate"].simulate(300, seed=99)
    rules = mods["rules"].load_rules(rules_text)
    model = bench._trained_model(rules_text, events)
    raw = [(e["lead_id"].encode(), orjson.dumps(e), mods["events"].topic_kind_of(e["type"])) for e in events]
    cases: dict[str, Any] = {"rules": None, f"model ({model.champion})": model}
    for champion in ("logreg", "naive_bayes", "gam", "batch_hgb", "stack"):  # naive_bayes before the fourth round, gam after
        if champion != model.champion and champion in model.learners:
            forced = copy.copy(model)
            forced.__dict__.pop("_fast", None)  # frozen forms are built for the champion asked
            forced.champion = champion
            cases[f"{champion} forced"] = forced
    parse_event, copy_state = mods["events"].parse_event, mods["features"].copy_state
    scorer_of, step = mods["scoring"].Scorer, mods["scoring"].step

    def run(step_pass: Any, serving: Any) -> list[float]:
        """µs of CPU per event of each batch: ``streams.bench.step_pass`` on this tree's functions."""
        return step_pass(raw, scorer_of(rules, serving), parse=parse_event, copy=copy_state, step_fn=step)

    return cases, run, bench


def main(before: str, after: str, passes: int, gc_on: bool = True) -> None:
    trees = {"before": load(before), "after": load(after)}
    step_pass = trees["after"][2].step_pass  # one loop for both trees (the before tree may predate it)
    best: dict[tuple[str, str], list[float]] = {}
    if not gc_on:
        gc.disable()
    for i in range(passes):
        for tree in (trees if i % 2 == 0 else reversed(trees)):  # neither tree always goes first
            cases, run, _ = trees[tree]
            for name, serving in cases.items():
                spent = run(step_pass, serving)
                best[tree, name] = list(map(min, best.get((tree, name), spent), spent))
    names = list(trees["before"][0]) + [n for n in trees["after"][0] if n not in trees["before"][0]]
    for name in names:  # a case one tree lacks (another champion, a learner it has not) shows "-"
        b, a = sum(best.get(("before", name), [])), sum(best.get(("after", name), []))
        before_text = f"{b:6.1f} µs/event" if b else "-".rjust(13)
        after_text = f"{a:6.1f} µs/event" + (f" ({a / b - 1:+.0%})" if b else "") if a else "-"
        print(f"{name:22s} before {before_text}   after {after_text}")
    print(f"CPU time per event, each batch's best of {passes} alternated passes, GC {'on' if gc_on else 'off'}: "
          f"before {before}, after {after}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-gc"]
    main(args[0], args[1], int(args[2]) if len(args) > 2 else 6, gc_on="--no-gc" not in sys.argv)
