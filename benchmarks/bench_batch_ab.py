"""The worker's batch path of two source trees in one process, batch by batch alternated: a fair
before/after of ``EventPipeline.handle_batch`` on a shared machine.

    .venv/bin/python benchmarks/bench_batch_ab.py BEFORE_TREE AFTER_TREE [events_per_batch] [passes]

e.g. ``git worktree add --detach /tmp/batch-before main`` (copy ``models/_kernels_native*.so`` into
it, or run ``deploy/build_native.py`` there), then ``... /tmp/batch-before . 8 5``. Needs the running
Redis (``leadstream up``); flushes databases 12 and 13. Each tree's ``models`` and ``streams`` are
imported apart, each with its own pipeline on its own database and a model trained on 300 simulated
leads, on one uvloop event loop as the worker's. The stream is 400 simulated leads' events in time
order (leads interleaved, as live traffic), cut in batches of ``events_per_batch`` (2,000 events/s
gives ~8); each batch goes to both pipelines, which goes first alternating. Printed: each pass's CPU
per event (``time.process_time`` around ``handle_batch``, the first 4,000 events left out: the lead
cache warms up), then the medians. The two trees share the machine's minutes, so their ratio holds
where the absolute figures move with the machine's load.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any

import orjson
import uvloop
from trees import import_tree

WARMUP_EVENTS = 4000


def load(tree: str, redis_db: int) -> dict[str, Any]:
    """Import ``tree``'s modules afresh; its modules and a serving model trained with them."""
    mods: dict[str, Any] = import_tree(tree, ("streams.pipeline", "streams.bench", "streams.state", "streams.clients",
                                              "streams.settings", "models.rules", "models.scoring", "models.events"))
    rules_text = mods["models.rules"].DEFAULT_CONFIG.read_text()
    # Trained (and pickled, as a scorer loads it) while this tree's classes are the imported ones.
    mods["model"] = mods["streams.bench"]._trained_model(rules_text)
    mods["rules"] = mods["models.rules"].load_rules(rules_text)
    mods["redis_db"] = redis_db
    return mods


def pipeline_of(tree: dict[str, Any]) -> Any:
    settings = tree["streams.settings"].Settings.from_env()
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{tree['redis_db']}"
    client = tree["streams.clients"].redis_client(dataclasses.replace(settings, redis_url=url))
    return tree["streams.pipeline"].EventPipeline(
        tree["streams.state"].LeadStore(client), tree["models.scoring"].Scorer(tree["rules"], tree["model"]),
        topic_kinds={"web": "web", "crm": "crm"}, max_event_bytes=settings.max_event_bytes)


def stream(tree: dict[str, Any]) -> list[tuple[str, int, int, bytes, bytes]]:
    """(topic kind, partition, offset, key, value) of 400 simulated leads' events in time order."""
    events = sorted(tree["streams.bench"]._fresh_events(400, 5, "ab"), key=lambda e: e["ts"])
    offsets: dict[tuple[str, int], int] = {}
    raw = []
    for e in events:
        kind = tree["models.events"].topic_kind_of(e["type"])
        partition = tree["streams.clients"].key_hash(e["lead_id"].encode()) % 8
        offset = offsets[kind, partition] = offsets.get((kind, partition), -1) + 1
        raw.append((kind, partition, offset, e["lead_id"].encode(), orjson.dumps(e)))
    return raw


async def run(trees: list[dict[str, Any]], per_batch: int, passes: int) -> None:
    pipelines = [pipeline_of(t) for t in trees]
    raw = stream(trees[-1])
    figures: list[list[float]] = [[], []]
    try:
        for p in range(passes):
            for pipeline in pipelines:  # every pass from an empty store and an empty lead cache
                await pipeline.store.client.flushdb()
                pipeline.forget_written()
            msgs = [[t["streams.pipeline"].Message(*r, 0) for r in raw] for t in trees]
            spent, counted = [0.0, 0.0], 0
            for start in range(0, len(raw), per_batch):
                order = (0, 1) if (start // per_batch) % 2 == 0 else (1, 0)
                for k in order:
                    t0 = time.process_time()
                    await pipelines[k].handle_batch(msgs[k][start:start + per_batch])
                    pipelines[k].acknowledged()
                    if start >= WARMUP_EVENTS:
                        spent[k] += time.process_time() - t0
                if start >= WARMUP_EVENTS:
                    counted += len(msgs[0][start:start + per_batch])
            for k in (0, 1):
                figures[k].append(spent[k] / counted * 1e6)
            print(f"pass {p}: before {figures[0][-1]:.1f}, after {figures[1][-1]:.1f} µs of CPU per event "
                  f"({counted} events in batches of {per_batch})", flush=True)
    finally:
        for pipeline in pipelines:
            await pipeline.store.client.flushdb()
            await pipeline.store.client.aclose()
    before, after = statistics.median(figures[0]), statistics.median(figures[1])
    print(f"median: before {before:.1f}, after {after:.1f} µs of CPU per event ({after / before - 1:+.1%})")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    per_batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    passes = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    trees = [load(sys.argv[1], 12), load(sys.argv[2], 13)]
    uvloop.run(run(trees, per_batch, passes))


if __name__ == "__main__":
    main()
