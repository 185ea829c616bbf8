"""The tournament's costs, measured on X Education (prints figures; asserts nothing).

    .venv/bin/python benchmarks/bench_tournament.py [--rows N] [--stream-rows N]

- per learner: µs per prediction and per learned snapshot (the batch learner's refits included);
- the trainer's and the serving checkpoint's pickle size, dump and load time after the whole history;
- a serving prediction (the champion) and the per-stage probabilities;
- with ``--stream-rows N``: peak memory (ru_maxrss) of converting a generated N-row ``;``-separated
  export in random order (sorted in runs spilled to disk), e.g. ``--stream-rows 1000000``.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.fields import Encoder  # noqa: E402
from models.learner import Trainer, vectorize, vectorize_labelled  # noqa: E402
from models.offline.evaluate import evaluate_events  # noqa: E402
from models.offline.history import load_mapping, rows_to_events  # noqa: E402
from models.rules import DEFAULT_CONFIG, load_rules  # noqa: E402
from models.tournament import Stack, make_learners, predict_with  # noqa: E402
from streams.offline import read_rows, stream_history  # noqa: E402

XEDU = ROOT.parent / "shared" / "data" / "xeducation-leads.csv"
MAPPING = ROOT / "deploy" / "mappings" / "xeducation.toml"


def examples(rows: int) -> list[dict]:
    mapping = load_mapping(MAPPING.read_text())
    events = [e for r in rows_to_events(itertools.islice(read_rows(XEDU), rows), mapping) for e in r.events]
    rules = load_rules(DEFAULT_CONFIG.read_text())
    return evaluate_events(events, rules, model_kind="logreg", keep_examples=True).examples


def per_learner(data: list[dict]) -> None:
    encoder = Encoder()
    xs = [(vectorize(e["snapshots"][-1]["features"], None, encoder), e["won"]) for e in data]
    print(f"per learner, {len(xs)} snapshots (µs per prediction / per learned snapshot, refits included):")
    for name, learner in make_learners().items():
        if isinstance(learner, Stack):
            continue
        predict = learn = 0.0
        for x, y in xs:
            t = time.perf_counter()
            learner.predict_proba(x)
            predict += time.perf_counter() - t
            t = time.perf_counter()
            learner.learn(x, y)
            learn += time.perf_counter() - t
        extra = f"; {learner.fits} refits, {learner.fit_seconds:.2f} s" if hasattr(learner, "fits") else ""
        print(f"  {name:12} {predict / len(xs) * 1e6:7.0f} / {learn / len(xs) * 1e6:7.0f}{extra}")


def checkpoint(data: list[dict]) -> None:
    trainer = Trainer(min_outcomes=50)
    t = time.perf_counter()
    for e in data:
        trainer.learn(e["snapshots"], e["won"])
    print(f"trainer: {len(data)} deals learned in {time.perf_counter() - t:.1f} s; champion {trainer.tournament.champion}")
    for name, obj in (("trainer", trainer), ("serving", trainer.serving())):
        t = time.perf_counter()
        raw = pickle.dumps(obj)
        dump = time.perf_counter() - t
        t = time.perf_counter()
        pickle.loads(raw)
        print(f"  {name} checkpoint: {len(raw) / 1e6:.2f} MB, dump {dump * 1000:.0f} ms, "
              f"load {(time.perf_counter() - t) * 1000:.0f} ms")
    serving = pickle.loads(pickle.dumps(trainer.serving()))  # as the scorers load it
    fs = [e["snapshots"][-1]["features"] for e in data[-500:]]
    serving.predict(fs[0])  # builds the frozen forms once
    print(f"  per prediction over {len(fs)} leads (µs):")
    timed("vectorize_labelled (inputs of every learner)",
          lambda f: vectorize_labelled(f, serving.stage_rates, serving.encoder), fs)
    for champion in serving.learners:
        serving.champion = champion
        timed(f"serving.predict, champion {champion}", serving.predict, fs)
        timed(f"  the learners' own predict_proba, no reasons, {champion}", lambda f: predict_with(
            serving.learners, champion, vectorize_labelled(f, serving.stage_rates, serving.encoder)[0]), fs)
    timed("stage_probabilities", serving.stage_probabilities, fs)


def timed(what: str, call, fs: list) -> None:
    t = time.perf_counter()
    for f in fs:
        call(f)
    print(f"    {what}: {(time.perf_counter() - t) / len(fs) * 1e6:.0f}")


def streaming(n: int) -> None:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.csv"
        with path.open("w") as f:
            f.write("id;n;won;Country;Visits\n")
            for i in range(n):
                f.write(f"lead-{i};{rng.randint(0, 10**9)};{rng.choice('01')};"
                        f"{rng.choice(['Deutschland', 'France', 'Italia'])};{rng.randint(0, 5)}\n")
        mapping = load_mapping('[lead]\nid = "id"\norder = "n"\n[outcome]\ncolumn = "won"\npositive = "1"\n'
                               '[explicit]\n"Country" = "country"\n[behaviour]\n"Visits" = { event = "visit", as = "count" }\n')
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        results, _ = stream_history(path, mapping, delimiter=";")
        rows = events = 0
        for r in results:
            rows += 1
            events += len(r.events)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"streaming import: {rows} rows ({path.stat().st_size / 1e6:.0f} MB), {events} events in "
              f"{time.perf_counter() - t:.0f} s; peak RSS {peak / 1024:.0f} MB (before: {before / 1024:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=9237)
    parser.add_argument("--stream-rows", type=int, default=0)
    parser.add_argument("--checkpoint-only", action="store_true", help="skip the per-learner costs")
    args = parser.parse_args()
    if args.stream_rows:
        streaming(args.stream_rows)  # first: the peak RSS is the process's
    data = examples(args.rows)
    if not args.checkpoint_only:
        per_learner(data)
    checkpoint(data)


if __name__ == "__main__":
    main()
