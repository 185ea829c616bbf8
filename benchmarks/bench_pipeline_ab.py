"""The worker of two source trees, in a burst and at a steady rate, run in turn (ABBA): a before/after
of what `leadstream bench --only pipeline` measures, on a machine whose speed moves from minute to minute.

    .venv/bin/python benchmarks/bench_pipeline_ab.py BEFORE_TREE AFTER_TREE [rounds] [--rates R[,R...]]

e.g. ``git worktree add --detach /tmp/before main`` (copy ``models/_kernels_native*.so`` into it, or run
``deploy/build_native.py`` there), then ``... /tmp/before . 4``. Needs the running stack (``leadstream
up``). Each run is ``python -m streams.cli bench --only pipeline --rates R --json FILE`` from one tree
(its own fresh workers and trainer, its own passthrough), about a minute each; the trees alternate
A B B A A B ... so that neither always runs first in a quieter or busier spell. Printed: each run's
burst (events/s, ratio to its passthrough) and latency at each rate (p50 / p99, and p99 with the
dashboard read every second), then each tree's medians. The rates' p99 moves by several times
between runs of the same code on this machine (docs/performance.md): read the runs, not only the
medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PYTHON = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"


def run(tree: str, rates: str) -> dict[str, Any]:
    """One ``bench --only pipeline`` from ``tree``; its JSON figures."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(PYTHON), "-m", "streams.cli", "bench", "--only", "pipeline", "--rates", rates,
                        "--json", out.name], cwd=tree, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def summary(figures: dict[str, Any]) -> dict[str, float]:
    """The figures compared: burst events/s and ratio, p50 / p99 per rate, p99 with the reader."""
    row = {"burst": figures["burst_1_worker"]["events_per_s"], "ratio": figures["ratio_to_passthrough"]}
    for latency in figures["latency"]:
        rate = int(latency["rate"])
        row[f"p50@{rate}"], row[f"p99@{rate}"] = latency["p50_ms"], latency["p99_ms"]
    reader = figures.get("latency_with_dashboard_reader")
    if reader:
        row[f"p99@{int(reader['rate'])}+reader"] = reader["p99_ms"]
    return row


def line(row: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:,.3g}" if k == "ratio" else f"{k} {v:,.1f}" for k, v in row.items())


def main(before: str, after: str, rounds: int, rates: str) -> None:
    trees = {"before": before, "after": after}
    rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            rows[name].append(summary(run(trees[name], rates)))
            print(f"run {r} {name:6s} {line(rows[name][-1])}", flush=True)
    for name, runs in rows.items():
        medians = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(f"median {name:6s} {line(medians)}   ({trees[name]}, {len(runs)} runs)")


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = "2000"
    if "--rates" in args:
        i = args.index("--rates")
        chosen = args[i + 1]
        del args[i:i + 2]
    if len(args) < 2:
        sys.exit(__doc__)
    main(args[0], args[1], int(args[2]) if len(args) > 2 else 2, chosen)
