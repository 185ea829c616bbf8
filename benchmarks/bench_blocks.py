"""The worker at a steady rate, block by block: latency, each process's CPU, rescores, full collections.

    .venv/bin/python benchmarks/bench_blocks.py [--rate 2000] [--seconds 10] [--blocks 6] [--gc] [--timeline]

Against the running stack (``leadstream up``), from the tree it is run in: a scoring worker and a
trainer of their own (as ``leadstream bench`` starts them), then ``--blocks`` latency runs of
``--seconds`` each at ``--rate`` (``streams.bench.bench_latency``: new simulated leads per block, each
latency from the event's scheduled time). Per block: p50 / p95 / p99, how late the generator sent,
the CPU per event of the scorer, the trainer, Kafka, Redis (0 unless ``leadstream up`` started them)
and this process (``/proc``), and the scores the scorer made per trigger in the block (its ``/metrics``). ``--gc``: the workers log their
full garbage collections (``benchmarks/gc_pauses``), printed at the end for the scorer. The p99 of
one block moves with the machine's minute: compare trees block by block in the same minutes.
``--timeline``: each block's latency p99 and max per second of its sending (when in the block the
late events were sent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the tree it is run from

from streams import bench  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stack import running_pid  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def scored(port: int) -> dict[str, float]:
    """The scorer's scores so far per trigger (event, decay, model), from its /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r'^leadstream_scored_total\{trigger="(\w+)"\} (\S+)', text, re.M)}


def per_second(timeline: list[tuple[float, float]]) -> str:
    """p99 / max latency (ms) of the events sent in each second of a run, after the run's start
    (UTC, to read beside the workers' logs and the collections' times)."""
    start, seconds = min(t for t, _ in timeline), {}
    for sent, latency in timeline:
        seconds.setdefault(int(sent - start), []).append(latency * 1000)
    wall = time.time() - time.perf_counter() + start  # perf_counter -> epoch
    return f"from {clock(wall)}: " + "  ".join(
        f"{s}: {sorted(v)[int(len(v) * 0.99)]:.0f}/{max(v):.0f}" for s, v in sorted(seconds.items()))


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}"


async def main(args: argparse.Namespace) -> None:
    settings = bench.bench_settings(Settings.from_env(), 1, uuid.uuid4().hex[:8])
    await ensure_topics(settings)
    gc_dir = tempfile.mkdtemp(prefix="leadstream-gc-") if args.gc else None
    if gc_dir:  # the workers inherit this process's environment
        os.environ["PYTHONPATH"] = str(Path(__file__).parent / "gc_pauses")
        os.environ["LEADSTREAM_GC_LOG_DIR"] = gc_dir
    trainer, scorer = bench._start_trainer(settings), bench._start_scorer(settings, 0)
    procs = {"scorer": scorer.pid, "trainer": trainer.pid, "kafka": running_pid(settings, "kafka"),
             "redis": running_pid(settings, "redis"), "generator": os.getpid()}
    try:
        for block in range(args.blocks):
            events = bench._fresh_events(max(50, int(args.rate * args.seconds / 25)), 100 + block, f"k{block}")
            before, cpu0 = scored(settings.web_port), {name: cpu_s(pid) for name, pid in procs.items()}
            timeline: list[tuple[float, float]] = []
            f = await bench.bench_latency(settings, events, args.rate, args.seconds, timeline=timeline)
            after, cpu1 = scored(settings.web_port), {name: cpu_s(pid) for name, pid in procs.items()}
            per_event = " ".join(f"{name} {(cpu1[name] - cpu0[name]) / f['events'] * 1e6:.0f}" for name in procs)
            triggers = " ".join(f"{k} {after[k] - before.get(k, 0):.0f}" for k in after)
            print(f"block {block}: p50 {f['p50_ms']} p95 {f['p95_ms']} p99 {f['p99_ms']} ms, sends late p99 "
                  f"{f['send_late_p99_ms']} ms | CPU µs/event: {per_event} | scored: {triggers}", flush=True)
            if args.timeline:
                print("  per second, p99 / max ms: " + per_second(timeline), flush=True)
    finally:
        for worker in (scorer, trainer):
            bench.stop_worker(worker)
        await bench._cleanup(settings)
    if gc_dir:
        log = Path(gc_dir) / f"gc-{scorer.pid}.txt"
        lines = log.read_text().splitlines()[1:] if log.exists() else []
        print(f"scorer's full collections ({log}): UTC, pause ms, tracked objects, frozen")
        for line in lines:
            epoch, rest = line.split(" ", 1)
            print(clock(float(epoch)), rest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--gc", action="store_true", help="log the workers' full garbage collections")
    parser.add_argument("--timeline", action="store_true", help="each block's p99 / max per second")
    asyncio.run(main(parser.parse_args()))
