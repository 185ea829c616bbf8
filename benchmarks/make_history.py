"""Write a simulated one-row-per-lead export (CSV) for timing ``leadstream evaluate`` at scale.

    .venv/bin/python benchmarks/make_history.py 40000 /tmp/sim-40k.csv
    .venv/bin/leadstream evaluate /tmp/sim-40k.csv --mapping benchmarks/simulated.toml
    .venv/bin/python benchmarks/make_history.py 40000 /tmp/sim-40k-shift.csv --shift-at 0.5   # concept drift

Each lead of :func:`models.offline.simulate.simulate_population` (seed 1) becomes one row in the shape of the
X Education export (one row per lead, about 5 events each): its explicit fields, its visits, time on
site and page views per visit, its downloads and its outcome (empty: still open), in arrival order.
Deterministic: same N, same file. ``--shift-at F``: the market shifts after that fraction of the leads
(:data:`models.offline.simulate.SHIFTED_MARKET`): a history with concept drift.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.offline.simulate import simulate_population  # noqa: E402

FIELDS = ("country", "city", "industry", "job_title", "company_size", "source", "newsletter_opt_in")


def main(leads: int, out: Path, seed: int = 1, shift_at: float | None = None) -> None:
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "n", "won", *FIELDS, "visits", "seconds", "pages_per_visit", "downloads"])
        for n, lead in enumerate(simulate_population(leads, seed, shift_at=shift_at)):
            kinds = Counter(e["type"] for e in lead.events)
            seconds = sum(e["props"].get("duration_s", 0) for e in lead.events if e["type"] == "visit")
            won = {"won": "1", "lost": "0"}.get(lead.outcome or "", "")
            per_visit = round(kinds["page_view"] / kinds["visit"], 2) if kinds["visit"] else 0
            w.writerow([lead.lead_id, n, won, *(lead.fields.get(k, "") for k in FIELDS),
                        kinds["visit"], seconds, per_visit, kinds["download"]])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("leads", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shift-at", type=float, default=None,
                        help="fraction of the leads after which the market shifts (concept drift)")
    args = parser.parse_args()
    main(args.leads, args.out, shift_at=args.shift_at)
