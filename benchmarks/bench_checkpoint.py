"""Checkpoint size and save/load time of the trainer after N deals with unique identities (pure, no Redis).

    .venv/bin/python benchmarks/bench_checkpoint.py [deals]
"""

from __future__ import annotations

import pickle
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.fields import Encoder  # noqa: E402
from models.learner import Trainer
from models.rules import DEFAULT_CONFIG, load_rules
from tests.test_fields import snapshot


def main(deals: int) -> None:
    trainer = Trainer(min_outcomes=20, encoder=Encoder(load_rules(DEFAULT_CONFIG.read_text()).fields))
    rng = random.Random(7)
    started = time.perf_counter()
    for i in range(deals):
        won = rng.random() < 0.4
        trainer.learn([snapshot(i, rng, won)], won)
        if (i + 1) % (deals // 4) == 0:
            t0 = time.perf_counter()
            blob = pickle.dumps(trainer)
            serving = pickle.dumps(trainer.serving())
            t1 = time.perf_counter()
            pickle.loads(blob)
            t2 = time.perf_counter()
            print(f"{i + 1:>7} deals: trainer {len(blob) / 1024:.1f} KiB, serving {len(serving) / 1024:.1f} KiB, "
                  f"save (pickle both) {(t1 - t0) * 1000:.1f} ms, load {(t2 - t1) * 1000:.1f} ms; "
                  f"learning {(time.perf_counter() - started) / (i + 1) * 1e6:.0f} µs/deal so far")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
